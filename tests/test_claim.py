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


def test_final_chunk_runs_the_chosen_tuning_commands_and_the_papers_setting_with_five_seeds(tmp_path, monkeypatch):
    chosen = {"0.05": {"cmdp": "cmdp_n1_centred_b20", "dual": "dual_eta100_l0", "fixed": "fixed_l10"}}
    (tmp_path / "chosen.json").write_text(json.dumps(chosen))
    monkeypatch.setattr(sweep, "RESULTS", tmp_path)
    tuned = {name: method for name, _, method in sweep.chunk_runs("tune-d0.05") + sweep.chunk_runs("refine-d0.05")}
    runs = sweep.chunk_runs("final-d0.05")
    assert sorted({seed for _, seed, _ in runs}) == [1, 2, 3, 4, 5]
    assert {name for name, _, _ in runs} == {*chosen["0.05"].values(), sweep.PAPER, sweep.PAPER_SUM}
    assert all(method == tuned[name] for name, _, method in runs)  # the setting chosen is the setting run
    assert len(runs) == len(set((name, seed) for name, seed, _ in runs)) == 5 * 5
    for paper in (sweep.PAPER, sweep.PAPER_SUM):  # the paper's n and beta, centred, in both constraint forms
        assert "--penalty 20 --explicit-coef 1" in tuned[paper] and "--norm-adv-std" not in tuned[paper]
    assert "--constraint sum" in tuned[sweep.PAPER_SUM] and "--constraint" not in tuned[sweep.PAPER]
    chosen["0.05"]["fixed"] = "fixed_l8.5"  # a setting of the refinement is run with its own command
    (tmp_path / "chosen.json").write_text(json.dumps(chosen))
    assert {m for name, _, m in sweep.chunk_runs("final-d0.05") if name == "fixed_l8.5"} == {tuned["fixed_l8.5"]}
    monkeypatch.setattr(sweep, "RESULTS", tmp_path / "none")
    with pytest.raises(SystemExit, match="no settings chosen at d = 0.1 yet"):
        sweep.chunk_runs("final-d0.1")


def test_grids_bracket_the_papers_weighting_and_tune_every_method():
    runs = sweep.chunk_runs("tune-d0.05")
    names = [name for name, _, _ in runs]
    assert len(names) == len(set(names)) == 31
    assert sum(n.startswith("fixed_") for n in names) == 9 and sum(n.startswith("dual_") for n in names) == 6
    cmdp = {name: method for name, _, method in runs if name.startswith("cmdp")}
    betas = {float(m.split("--explicit-coef ")[1].split()[0]) for m in cmdp.values()}
    assert min(betas) < 1 < 19.5 <= max(betas)  # the paper's beta = 1 and the earlier weight, ~ the mean length
    for n in ("1", "20"):  # the beta grid at both penalties
        assert {b for b in sweep.BETAS} == {k.split("_b")[1] for k in cmdp if k.startswith(f"cmdp_n{n}_centred")}
    sums = [m for m in cmdp.values() if "--constraint sum" in m]
    assert len(sums) == 2 and all("--budget 0.975" in m for m in sums)  # d x 19.5 tokens
    lrs = [method for _, _, method in sweep.chunk_runs("lr-ablation")]
    assert [m.split("--learning-rate ")[1] for m in lrs] == list(sweep.LRS)
    assert names[0] == sweep.PAPER  # a chunk cut short has the paper's setting


def test_the_refinement_steps_either_side_of_each_familys_best_and_repeats_nothing():
    tuned = {name for name, _, _ in sweep.chunk_runs("tune-d0.05")}
    refined = {name: method for name, _, method in sweep.chunk_runs("refine-d0.05")}
    assert not tuned & set(refined)
    assert {name.split("_")[0] for name in refined} == {"cmdp", "cmdpsum", "fixed", "dual"}  # every family alike
    assert refined["fixed_l8.5"] == "lagrangian_distill.py --method fixed --lambda-init 8.5"
    assert "--constraint sum --budget 0.975" in refined["cmdpsum_n20_std_b3"]


def knob(name):
    """A tuning run's name as (its family's other settings, the value of the knob the refinement steps)."""
    head, _, value = name.rpartition("_b" if name.startswith("cmdp") else "_l")
    if name.startswith("dual"):  # dual_eta{eta}_l{lambda_0}: the knob is eta, lambda_0 is the other setting
        head, value = "dual_l" + value, name.split("_")[1].removeprefix("eta")
    return head, float(value)


def test_every_chosen_setting_at_d005_lies_inside_the_values_its_family_tried():
    """The committed sweep's refinement did its job: each family's best on validation has a tried value of its knob
    on either side (an end of the grid would leave a better setting possibly untried)."""
    chosen = json.loads((sweep.RESULTS / "chosen.json").read_text())["0.05"]
    tried = [
        p.name.split("__")[0] for chunk in ("tune-d0.05", "refine-d0.05") for p in (sweep.RESULTS / chunk).iterdir()
    ]
    assert knob("dual_eta10000_l10") == ("dual_l10", 10000.0) and knob("cmdp_n1_centred_b14") == ("cmdp_n1_centred", 14)
    for family, name in chosen.items():
        head, value = knob(name)
        values = [v for h, v in map(knob, tried) if h == head]
        assert min(values) < value < max(values), f"{family}: {name} at the end of {sorted(values)}"


def test_in_run_evals_use_the_validation_split_in_every_chunk(tmp_path):
    train = tmp_path / "data" / "train_fit.jsonl"
    command = sweep.command("fixed_l10", 3, "lagrangian_distill.py --method fixed --lambda-init 10", tmp_path, train)
    assert f"--eval-dataset {tmp_path / 'data' / 'val.jsonl'}" in command and "--seed 3" in command


def test_select_filters_by_seed_and_name_and_refuses_unknown_names():
    runs = sweep.select("tune-d0.05", only=["fixed_l10", "cmdp_n1_centred_b1"])
    assert [(name, seed) for name, seed, _ in runs] == [("fixed_l10", 1), ("cmdp_n1_centred_b1", 1)]  # chunk order
    assert sweep.select("tune-d0.05") == sweep.chunk_runs("tune-d0.05")
    assert sweep.select("tune-d0.05", seeds=[2]) == []
    with pytest.raises(SystemExit, match="fixed_l9 not among tune-d0.05's runs"):
        sweep.select("tune-d0.05", only=["fixed_l10", "fixed_l9"])


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
    assert results.setting("cmdp_n20_centred_b0.3_lr3e-05") == dict(n="20", adv="centred", beta="0.3", lr="3e-05")


def result(correct, mean_kl, tokens, command="python cmdp_distill.py --budget 0.05"):
    r = dict(correct=np.array(correct, dtype=float), mean_kl=np.array(mean_kl), response_tokens=np.array(tokens))
    r.update(sum_kl=r["mean_kl"] * r["response_tokens"], command=command)
    return dict(r, in_run_evals=[{"step": 0, "eval/accuracy": 1.0, "eval/csr": 1.0}])


def test_metrics_count_correct_and_within_budget_at_full_precision():
    r = result([1, 1, 0, 1], [0.01, 0.2, 0.01, 0.0500001], [20, 20, 20, 20])
    m = results.metrics(r, 0.05)
    assert (m["acc"], m["csr"], m["both"]) == (0.75, 0.5, 0.25)  # 0.0500001 is over 0.05: no rounding to 6 places
    assert m["csr_own"] == m["csr"]


def test_the_sum_form_is_also_scored_on_its_own_per_response_budget():
    # a short response may carry more KL per token: within 0.05 x 19.5 = 0.975 nats in all, over 0.05 per token
    r = result([1, 1], [0.09, 0.04], [10, 30], command="python cmdp_distill.py --constraint sum --budget 0.975")
    m = results.metrics(r, 0.05)
    assert m["csr"] == 0.5 and m["csr_own"] == 0.5  # per token: only the second; summed: 0.9 and 1.2 nats
    r = result([1, 1], [0.09, 0.03], [10, 30], command="python cmdp_distill.py --constraint sum --budget 0.975")
    assert results.metrics(r, 0.05)["csr_own"] == 1.0 and results.metrics(r, 0.05)["csr"] == 0.5


def test_spread_is_the_sample_standard_deviation():
    assert results.std([0.9, 0.92, 0.94]) == pytest.approx(0.02)  # population std would be 0.0163
    assert results.cell([0.9, 0.92, 0.94]) == "0.920 ± 0.020" and results.cell([0.5]) == "0.500"


def test_selection_breaks_ties_by_csr_then_accuracy_then_mean_kl():
    def ms(both, csr, acc, kl):
        return [dict(both=both, csr=csr, acc=acc, kl=kl)]

    rows = [("a", ms(0.9, 0.92, 0.98, 0.02)), ("b", ms(0.9, 0.95, 0.95, 0.02)), ("c", ms(0.89, 0.99, 0.99, 0.01))]
    assert results.choose(rows) == ("b", 0.9)  # a and b tie on correct-and-within: b has the higher CSR
    rows = [("a", ms(0.9, 0.95, 0.98, 0.02)), ("b", ms(0.9, 0.95, 0.98, 0.01))]
    assert results.choose(rows)[0] == "b"  # then the lower mean KL


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


@pytest.mark.parametrize("budget", ["0.1", "0.013"])
def test_other_budgets_train_cmdp_with_n_1_and_20_and_dual_ascent_for_their_budget(budget):
    runs = sweep.chunk_runs(f"tune-d{budget}")
    names = [name for name, _, _ in runs]
    assert all(name.endswith(f"_d{budget}") for name in names) and len(names) == len(set(names)) == 16
    assert {n.split("_")[1] for n in names if n.startswith("cmdp_")} == {"n1", "n20"}
    assert sum(n.startswith("dual_") for n in names) == 6 and not any(n.startswith("fixed_") for n in names)
    sums = [m for _, _, m in runs if "--constraint sum" in m]
    assert sums and all(f"--budget {float(budget) * 19.5:g}" in m for m in sums)
    assert all(f"--budget {budget}" in m for _, _, m in runs if "--constraint sum" not in m)
