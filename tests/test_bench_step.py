"""benchmark/bench_step.py: its pure parts (argument checks, the median of the timed steps, the ratio, reading our
metrics.jsonl, the table) and its one-sentence exit without TRL. No model runs and TRL is never imported."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "benchmark" / "bench_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_record(step, generate, score, update, tokens=20.0):
    return {
        "step": step,
        "perf/generate_s": generate,
        "perf/score_s": score,
        "perf/update_s": update,
        "train/response_tokens": tokens,
    }


def test_defaults_are_the_reference_measurement():
    args = load_bench().parse_args([])
    assert (args.steps, args.skip, args.works) == (10, 2, ["kd", "grpo", "cmdp"])
    assert (args.prompts_per_step, args.group_size, args.micro_batch_size, args.max_new_tokens) == (16, 8, 64, 64)
    assert args.toy_dir is None and args.threads is None and args.out == "runs/bench_step.json"


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "2"],
        ["--steps", "3", "--skip", "3"],
        ["--skip", "-1"],
        ["--works", "ppo"],
        ["--threads", "0"],
        ["--group-size", "1"],
        ["--micro-batch-size", "48"],
        ["--learning-rate", "0"],
    ],
)
def test_bad_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        load_bench().parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip()  # argparse's message names the flag


def test_timed_median_skips_the_warm_up_steps():
    bench = load_bench()
    times = [9.0, 5.0, 1.0, 3.0, 2.0, 100.0]  # steps 1-2 are warm-up; median of 1, 3, 2, 100 is 2.5
    assert bench.timed_median(times, 2) == 2.5
    assert bench.timed_median(times[:5], 2) == 2.0
    assert bench.timed_median(times, 0) == 4.0
    with pytest.raises(ValueError):
        bench.timed_median([1.0, 2.0], 2)


def test_ratio_is_ours_over_trl():
    bench = load_bench()
    assert bench.ratio(1.0, 2.0) == 0.5
    assert bench.ratio(1.5, 1.0) == 1.5
    assert bench.ratio(1.0, None) is None


def test_our_step_time_is_the_sum_of_the_phases_of_the_training_steps():
    bench = load_bench()
    records = [
        {"step": 0, "eval/accuracy": 0.5},  # the step-0 eval record has no perf keys
        step_record(2, 0.5, 0.25, 0.25, tokens=30.0),
        step_record(1, 9.0, 9.0, 9.0, tokens=99.0),
        {**step_record(3, 1.0, 0.5, 0.5, tokens=10.0), "eval/accuracy": 0.7},
        step_record(4, 1.0, 1.0, 1.0, tokens=20.0),
    ]
    summary = bench.summarize_ours(records, skip=1)
    assert summary["step_times"] == [27.0, 1.0, 2.0, 3.0]  # in step order
    assert summary["median_s"] == 2.0
    assert (
        summary["median_generate_s"] == 1.0 and summary["median_score_s"] == 0.5 and summary["median_update_s"] == 0.5
    )
    assert summary["mean_response_tokens"] == 20.0  # over the timed steps 2-4


def test_table_has_both_sides_the_ratio_lengths_and_the_machine():
    bench = load_bench()
    ours = dict(
        median_s=1.0, median_generate_s=0.5, median_score_s=0.25, median_update_s=0.25, mean_response_tokens=20.0
    )
    trl = bench.summarize_trl(
        dict(step_times=[5.0, 5.0, 2.0, 2.0], response_tokens=[1.0, 1.0, 21.0, 23.0], logged_step_times=[]), skip=2
    )
    results = [
        dict(
            title="on-policy KD",
            command="lagrangian_distill.py --method kd",
            trl_trainer="DistillationTrainer",
            ours=ours,
            trl=trl,
            ratio=bench.ratio(1.0, trl["median_s"]),
        ),
        dict(title="CMDP distillation", command="cmdp_distill.py", trl_trainer=None, ours=ours, trl=None, ratio=None),
    ]
    machine = dict(
        cpu="Test CPU",
        cores=2,
        torch_threads=1,
        torch="2.13.0",
        transformers="5.23.0",
        trl="1.16.0",
        git_commit="abc",
        dirty=False,
    )
    settings = dict(steps=4, skip=2, prompts_per_step=16, group_size=8, max_new_tokens=64)
    table = bench.format_tables(results, machine, settings)
    assert "| 2.000 | 1.000 | 0.500 | 22.0 / 20.0 |" in table
    assert "| - | 1.000 | - | - / 20.0 |" in table
    assert "| `cmdp_distill.py` | 0.500 | 0.250 | 0.250 | 1.000 |" in table
    assert "median of steps 3-4" in table and "Test CPU, 2 cores, 1 torch threads" in table and "TRL 1.16.0" in table


def test_missing_trl_exits_with_the_install_command(monkeypatch):
    bench = load_bench()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit, match=r"pip install -r requirements-bench\.txt"):
        bench.require_trl()


def test_importing_the_benchmark_imports_neither_trl_nor_torch():
    code = (
        f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', {str(BENCH)!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "print('trl' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_exits_0():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--steps" in proc.stdout
