"""Shared fixtures: a tiny toy build (seconds) whose tokenizer, models and data stand in for real ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory) -> Path:
    """A toy build with 1-layer width-64 models trained for a few steps: {train,test}.jsonl, teacher/, student/."""
    import toy_math

    args = toy_math.Args(
        cache_dir=str(tmp_path_factory.mktemp("toy") / "tiny"),
        num_train=256,
        num_test=16,
        teacher_layers=1,
        teacher_width=64,
        teacher_steps=3,
        student_layers=1,
        student_width=64,
        student_steps=2,
        batch_size=8,
        lr=3e-3,
        report_limit=8,
    )
    return toy_math.build(args)


def run_script(*argv: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return proc


def run_distributed(argv: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    """A script as a user runs it: plain python for one process, torchrun --standalone for several."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float order in both runs (torchrun's default too)
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    return subprocess.run(
        [*launcher, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def tiny_run_args(script: str, toy: Path, out: Path, *extra: str) -> list[str]:
    """Command line of a training script on the tiny toy build: 2 prompts x 4 responses, 12 new tokens."""
    return [
        script,
        "--student",
        str(toy / "student"),
        "--teacher",
        str(toy / "teacher"),
        "--dataset",
        str(toy / "train.jsonl"),
        "--eval-dataset",
        str(toy / "test.jsonl"),
        "--prompts-per-step",
        "2",
        "--group-size",
        "4",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "12",
        "--eval-limit",
        "4",
        "--output-dir",
        str(out),
        "--budget",
        "0.0001",
        "--learning-rate",
        "1e-2",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_without_and_with_checkpointing(toy: Path, tmp_path: Path, weights_file: str, *extra: str) -> dict:
    """One step of cmdp_distill.py on the tiny toy build (learning rate 1e-3, no eval), without and with
    --gradient-checkpointing: {"" or "--gradient-checkpointing": the tensors of checkpoint-1/weights_file}."""
    import safetensors.torch

    weights = {}
    for flag in ("", "--gradient-checkpointing"):
        out = tmp_path / (flag or "plain")
        proc = run_script(
            *tiny_run_args(
                "cmdp_distill.py",
                toy,
                out,
                "--num-steps",
                "1",
                "--eval-interval",
                "0",
                "--learning-rate",
                "1e-3",
                *extra,
                *([flag] if flag else []),
            ),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = out.iterdir()
        weights[flag] = safetensors.torch.load_file(run_dir / "checkpoint-1" / weights_file)
    return weights
