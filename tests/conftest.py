"""Shared fixtures: a tiny toy build (seconds) whose tokenizer, models and data stand in for real ones."""

import json
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
