"""benchmark/claim_sweep.py and claim_results.py: the chunks hold the runs the results page describes, drivers in
two shells never run the same run, and the committed tables are exactly what the committed result files give."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep, results = load("claim_sweep"), load("claim_results")


def test_final_chunk_runs_the_tuning_commands_with_five_seeds():
    tuned = {name: method for name, _, method in sweep.chunk_runs("tune-cmdp") + sweep.chunk_runs("tune-lagrangian")}
    runs = sweep.chunk_runs("final-d0.05")
    assert sorted({seed for _, seed, _ in runs}) == [1, 2, 3, 4, 5]
    assert sorted({name for name, _, _ in runs}) == sorted(sweep.FINAL)
    assert all(method == tuned[name] for name, _, method in runs)  # the setting chosen is the setting run
    assert len(runs) == len(set((name, seed) for name, seed, _ in runs)) == 5 * len(sweep.FINAL)


def test_grids_are_the_issue_sizes():
    names = [name for name, _, _ in sweep.chunk_runs("tune-lagrangian")]
    assert sum(n.startswith("fixed_") for n in names) >= 8 and sum(n.startswith("dual_") for n in names) == 6
    cmdp = [method for _, _, method in sweep.chunk_runs("tune-cmdp")]
    assert sum("--constraint sum" in m for m in cmdp) == 2 and len(cmdp) == 14
    assert "--budget 0.975" in next(m for m in cmdp if "--constraint sum" in m)  # d x 19.5 tokens
    lrs = [method for _, _, method in sweep.chunk_runs("lr-ablation")]
    assert [m.split("--learning-rate ")[1] for m in lrs] == list(sweep.LRS)


def test_select_filters_by_seed_and_name_and_refuses_unknown_names():
    runs = sweep.select("final-d0.05", seeds=[2, 3], only=["fixed_l0.5", "cmdp_n1_centred_b1"])
    assert [(name, seed) for name, seed, _ in runs] == [
        ("cmdp_n1_centred_b1", 2),
        ("fixed_l0.5", 2),
        ("cmdp_n1_centred_b1", 3),
        ("fixed_l0.5", 3),
    ]  # the chunk's order (seed by seed), not the order given
    assert sweep.select("tune-cmdp") == sweep.chunk_runs("tune-cmdp")
    with pytest.raises(SystemExit, match="fixed_l9 not among tune-lagrangian's runs"):
        sweep.select("tune-lagrangian", only=["fixed_l0.5", "fixed_l9"])


def test_a_run_locked_by_a_live_driver_is_skipped_and_a_stale_lock_is_taken(tmp_path):
    assert sweep.take_lock(tmp_path, "cmdp_x", 1)
    assert (tmp_path / "locks" / "cmdp_x__1").read_text() == str(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "locks" / "fixed_y__2").write_text(str(other.pid))  # held by a live process
        assert not sweep.take_lock(tmp_path, "fixed_y", 2)
    finally:
        other.kill()
        other.wait()
    assert sweep.take_lock(tmp_path, "fixed_y", 2)  # its process has ended: the lock is stale
    assert (tmp_path / "locks" / "fixed_y__2").read_text() == str(os.getpid())


def test_pareto_front_and_settle_step():
    points = [(0.9, 0.99, "a"), (0.95, 0.98, "b"), (0.93, 0.97, "c"), (0.97, 0.85, "d")]
    assert [p[2] for p in results.pareto(points)] == ["a", "b", "d"]  # c is dominated by b
    evals = [
        dict(step=s, **{"eval/accuracy": a})
        for s, a in [(0, 0.8), (50, 0.99), (100, 0.9), (150, 0.98), (200, 0.99), (250, 0.98)]
    ]
    assert results.settle_step(dict(in_run_evals=evals), "eval/accuracy") == 150  # 0.9 at step 100 is 0.08 off
    assert results.setting("cmdp_n20_centred_b1_lr3e-05") == dict(n="20", adv="centred", beta="1", lr="3e-05")


def test_metrics_count_correct_and_within_budget():
    r = dict(
        correct=np.array([1, 1, 0, 1.0]),
        mean_kl=np.array([0.01, 0.2, 0.01, 0.05]),
        in_run_evals=[{"step": 0, "eval/accuracy": 1.0, "eval/csr": 1.0}],
    )
    m = results.metrics(r, 0.05)
    assert (m["acc"], m["csr"], m["both"]) == (0.75, 0.75, 0.5)  # 0.05 is within 0.05


@pytest.mark.skipif(not (ROOT / "benchmark/results/claim/tables.md").exists(), reason="no committed claim results")
def test_committed_tables_are_what_the_committed_results_give(tmp_path):
    copy = tmp_path / "claim"
    shutil.copytree(ROOT / "benchmark/results/claim", copy)
    subprocess.run(
        [sys.executable, "benchmark/claim_results.py", "--results", str(copy), "--out", str(tmp_path / "plots")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "CMDP_DISTILL_CACHE": str(tmp_path / "none")},
    )
    assert (copy / "tables.md").read_text() == (ROOT / "benchmark/results/claim/tables.md").read_text()
    assert json.loads((copy / "chosen.json").read_text()) == json.loads(
        (ROOT / "benchmark/results/claim/chosen.json").read_text()
    )
