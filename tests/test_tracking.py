"""Experiment tracking: TensorBoard event files beside metrics.jsonl for every run, and Weights & Biases (syncing them)
with --track."""

import importlib.util
import os
import re

import pytest

from conftest import read_metrics, run_script, tiny_run_args


@pytest.mark.slow
@pytest.mark.parametrize("script", ["cmdp_distill.py", "lagrangian_distill.py"])
def test_training_writes_tensorboard_events_with_the_metrics_keys(tiny_toy, tmp_path, script):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_script(
        *tiny_run_args(script, tiny_toy, tmp_path / "runs", "--num-steps", "2", "--diagnostic-interval", "1"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = {key for record in read_metrics(run_dir) for key in record if key != "step"}
    assert tags == logged  # the same keys as metrics.jsonl, e.g. train/csr, losses/kl_grad_norm, eval/accuracy
    assert {"train/reward", "train/csr", "losses/pg_grad_norm", "eval/accuracy"} <= tags
    record = read_metrics(run_dir)[2]
    assert [(e.step, e.value) for e in events.Scalars("train/reward")][-1] == (2, pytest.approx(record["train/reward"]))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is optional: pip install wandb==0.31.0")
def test_track_logs_to_weights_and_biases_offline(tiny_toy, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    import subprocess
    import sys

    from conftest import ROOT

    argv = tiny_run_args(
        "cmdp_distill.py", tiny_toy, tmp_path / "runs", "--num-steps", "2", "--track", "--wandb-project", "cmdp-test"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / argv[0]), *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))  # the run's event log, ready for `wandb sync`


def test_track_without_wandb_is_refused_before_anything_loads(monkeypatch):
    import tyro

    import cmdp_distill
    import common

    find = importlib.util.find_spec  # an environment without wandb: find_spec("wandb") answers None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    with pytest.raises(common.InputError, match=re.escape("pip install wandb==0.31.0")):
        cmdp_distill.check_args(tyro.cli(cmdp_distill.Args, args=["--track"]))
