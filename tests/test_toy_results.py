"""benchmark/toy_results.py aggregates a sweep correctly: CSR at every budget from each response's cost, greedy and
sampled, mean ± std over seeds, the run's own budget in bold, unfinished runs skipped. Evaluations are pre-made,
so no model runs."""

import importlib.util
import json

import numpy as np
import pytest

from conftest import ROOT


def load_toy_results():
    spec = importlib.util.spec_from_file_location("toy_results", ROOT / "benchmark" / "toy_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUESTIONS = ["Ann has 2 pens.", "Bo has 3 pens.", "Cy has 4 pens.", "Di sells 5 pens."]  # the last has a "sells" step


def fake_eval(folder, costs, correct):
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text(
        "".join(
            json.dumps(dict(question=q, cost=k, mean_kl=k, correct=c)) + "\n"
            for q, k, c in zip(QUESTIONS, costs, correct)
        )
    )
    (folder / "summary.json").write_text(
        json.dumps(dict(accuracy=float(np.mean(correct)), mean_kl=float(np.mean(costs))))
    )


def fake_run(sweep, exp_name, seed, budget, greedy, sampled, steps=4, finished=True, lam=None):
    run = sweep / f"{exp_name}__{seed}__0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps(dict(args=dict(exp_name=exp_name, seed=seed, budget=budget, num_steps=steps)))
    )
    (run / f"checkpoint-{steps if finished else steps // 2}").mkdir()
    records = [
        {
            "step": s,
            "train/reward": 0.5,
            "train/mean_kl": 0.1 / s,
            "train/csr": 0.5,
            "perf/generate_s": 10.0,
            "perf/score_s": 10.0,
            "perf/update_s": 10.0,
            **({"dual/lambda": lam * s} if lam is not None else {}),
        }
        for s in range(1, steps + 1)
    ]
    records[-1]["eval/accuracy"] = 0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        fake_eval(run / "eval_greedy", *greedy)
        fake_eval(run / "eval_sampled", *sampled)


@pytest.mark.slow  # seconds each; the fast tier keeps the quicker ones
def test_tables_from_a_fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for decoding in ("greedy", "sampled"):
        fake_eval(sweep / f"eval_teacher_{decoding}", [0.0, 0.0, 0.0, 0.0], [1, 1, 1, 0])
        fake_eval(sweep / f"eval_student_{decoding}", [0.01, 0.03, 0.07, 0.21], [1, 0, 0, 0])
    fake_run(
        sweep, "cmdp_d0.05", 1, 0.05, ([0.01, 0.01, 0.04, 0.22], [1, 1, 0, 0]), ([0.01, 0.09, 0.09, 0.09], [1, 0, 0, 0])
    )
    fake_run(
        sweep, "cmdp_d0.05", 2, 0.05, ([0.01, 0.06, 0.06, 0.07], [1, 1, 1, 0]), ([0.01, 0.01, 0.01, 0.09], [1, 1, 0, 0])
    )
    fake_run(
        sweep, "cmdp_d0.05", 3, 0.05, ([9.0] * 4, [0] * 4), ([9.0] * 4, [0] * 4), finished=False
    )  # crashed: must not count
    fake_run(sweep, "cmdp_d0.1", 1, 0.1, ([0.09] * 4, [1, 1, 1, 1]), ([0.2] * 4, [0] * 4))
    fake_run(sweep, "fixed_l0.1", 1, 0.05, ([0.5] * 4, [1] * 4), ([0.5] * 4, [1] * 4), lam=0.1)
    toy_results = load_toy_results()
    toy_results.main(sweep, tmp_path / "docs")

    blocks = (sweep / "results.md").read_text().split("### ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "Budget 0.05 (CSR: fraction of responses with cost <= 0.05)",
        "Budget 0.1 (CSR: fraction of responses with cost <= 0.1)",
        'Greedy responses on the 1 problems with a "sells" step and on the 3 others '
        "(CSR at the run's own budget; budget-free runs at 0.05)",
    ]
    rows = [line for line in blocks[0].splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| teacher (reference)",
        "| student (reference)",
        "| cmdp_d0.05",
        "| fixed_l0.1",
    ]
    assert rows[1] == "| student (reference) | - | 0.250 | 0.250 | 0.500 | 0.500 | 0.250 | 0.080 | - | - |"
    # two finished seeds: greedy accuracy 0.5 and 0.75, sampled 0.25 and 0.5; greedy CSR at 0.05 (own budget, bold)
    # 0.75 and 0.25, sampled 0.25 and 0.75; greedy correct and within 0.05: 2 and 1 of 4; mean KL 0.07 and 0.05;
    # 3 x 10 s per step for 4 steps = 2 minutes
    assert (
        rows[2] == "| cmdp_d0.05 | 2 | 0.625 ± 0.125 | 0.375 ± 0.125 | **0.500 ± 0.250** | **0.500 ± 0.250** | "
        "0.375 ± 0.125 | 0.060 ± 0.010 | 4 | 2.0 |"
    )
    assert (
        rows[3] == "| fixed_l0.1 | 1 | 1.000 | 1.000 | 0.000 | 0.000 | 0.000 | 0.500 | 4 | 2.0 |"
    )  # a budget-free baseline, at every budget
    rows = [line for line in blocks[1].splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| teacher (reference)",
        "| student (reference)",
        "| cmdp_d0.1",
        "| fixed_l0.1",
    ]
    assert rows[2] == "| cmdp_d0.1 | 1 | 1.000 | 0.000 | **1.000** | **0.000** | 1.000 | 0.090 | 4 | 2.0 |"
    # the "sells" problem (the last) against the others, greedy, at each run's own budget (0.05 for budget-free runs)
    rows = [line for line in blocks[2].splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == [
        "| student (reference) | 0.000 | 0.333 | 0.000 | 0.667 | 0.210 | 0.030 |",
        (
            "| cmdp_d0.05 | 0.000 ± 0.000 | 0.833 ± 0.167 | 0.000 ± 0.000 | 0.667 ± 0.333 | "
            "0.145 ± 0.075 | 0.035 ± 0.025 |"
        ),
        "| cmdp_d0.1 | 1.000 | 1.000 | 1.000 | 1.000 | 0.090 | 0.090 |",
        "| fixed_l0.1 | 1.000 | 1.000 | 0.000 | 0.000 | 0.500 | 0.500 |",
    ]
    if importlib.util.find_spec("matplotlib") is None:  # optional plotting dependency: the tables alone are checked
        return
    assert (tmp_path / "docs" / "accuracy_vs_csr.png").stat().st_size > 0
    assert (tmp_path / "docs" / "training_curves.png").stat().st_size > 0
