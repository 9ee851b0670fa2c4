"""benchmark/toy_results.py aggregates a sweep correctly: per-budget CSR from each response's KL, mean ± std
over seeds, the run's own budget in bold, unfinished runs skipped. Evaluations are pre-made, so no model runs."""

import importlib.util
import json

import numpy as np

from conftest import ROOT


def load_toy_results():
    spec = importlib.util.spec_from_file_location("toy_results", ROOT / "benchmark" / "toy_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_eval(folder, kls, correct):
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(dict(mean_kl=k, correct=c)) + "\n" for k, c in zip(kls, correct)))
    (folder / "summary.json").write_text(json.dumps(dict(accuracy=float(np.mean(correct)), mean_kl=float(np.mean(kls)))))


def fake_run(sweep, exp_name, seed, budget, kls, correct, steps=4, finished=True, lam=None):
    run = sweep / f"{exp_name}__{seed}__0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dict(args=dict(exp_name=exp_name, seed=seed, budget=budget, num_steps=steps))))
    (run / f"checkpoint-{steps if finished else steps // 2}").mkdir()
    records = [{"step": s, "train/mean_kl": 0.1 / s, "train/csr": 0.5, "perf/generate_s": 10.0, "perf/score_s": 10.0, "perf/update_s": 10.0,
                **({"dual/lambda": lam * s} if lam is not None else {})} for s in range(1, steps + 1)]
    records.append({"step": steps, "eval/accuracy": 0.5})  # the periodic eval lines have no train keys
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        fake_eval(run / "eval_final", kls, correct)


def test_table_from_a_fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fake_eval(sweep / "eval_teacher", [0.0, 0.0, 0.0, 0.0], [1, 1, 1, 0])
    fake_eval(sweep / "eval_student", [0.01, 0.03, 0.07, 0.21], [1, 0, 0, 0])
    fake_run(sweep, "cmdp_d0.05", 1, 0.05, [0.01, 0.01, 0.04, 0.22], [1, 1, 0, 0])  # CSR 0.5 / 0.75 / 0.75
    fake_run(sweep, "cmdp_d0.05", 2, 0.05, [0.01, 0.06, 0.06, 0.07], [1, 1, 1, 0])  # CSR 0.25 / 0.25 / 1.0
    fake_run(sweep, "cmdp_d0.05", 3, 0.05, [9.0] * 4, [0] * 4, finished=False)  # crashed: must not count
    fake_run(sweep, "fixed_l0.1", 1, 0.05, [0.5] * 4, [1] * 4, lam=0.1)
    toy_results = load_toy_results()
    toy_results.main(sweep, tmp_path / "docs")

    lines = (sweep / "results.md").read_text().splitlines()
    assert lines[0].startswith("| method | budget | seeds | accuracy | mean KL | CSR at 0.02 | CSR at 0.05 | CSR at 0.1 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| teacher (reference)", "| student (reference)", "| cmdp_d0.05", "| fixed_l0.1"]
    assert lines[3] == "| student (reference) | - | - | 0.250 | 0.080 | 0.250 | 0.500 | 0.750 | - | - |"
    # two finished seeds: accuracy 0.5 and 0.75; mean KL 0.07 and 0.05; CSR at 0.05 (own budget, bold) 0.75 and 0.25
    assert lines[4] == ("| cmdp_d0.05 | 0.05 | 2 | 0.625 ± 0.125 | 0.060 ± 0.010 | 0.375 ± 0.125 | **0.500 ± 0.250** | "
                        "0.875 ± 0.125 | 4 | 2.0 |")
    assert lines[5] == "| fixed_l0.1 | - | 1 | 1.000 | 0.500 | 0.000 | 0.000 | 0.000 | 4 | 2.0 |"
    if importlib.util.find_spec("matplotlib") is None:  # optional plotting dependency: the table alone is checked
        return
    assert (tmp_path / "docs" / "accuracy_vs_csr.png").stat().st_size > 0
    assert (tmp_path / "docs" / "mean_kl_over_training.png").stat().st_size > 0
