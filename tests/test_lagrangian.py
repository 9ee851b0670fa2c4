"""lagrangian_distill.py: the dual update and penalised loss, and the script end to end (lambda survives resume)."""

import math

import pytest
import torch

import lagrangian_distill as lagr
from conftest import read_metrics, run_script, tiny_run_args


@pytest.mark.parametrize("multiplier, mean_cost, budget, lr", [(0.0, 0.2, 0.05, 1.0), (0.5, 0.0, 0.05, 100.0), (2.0, 0.05, 0.05, 3.0), (1.0, 0.3, 0.05, 0.0)])
def test_dual_update_is_projected_gradient_ascent(multiplier, mean_cost, budget, lr):
    new = lagr.dual_update(multiplier, mean_cost, budget, lr)
    assert new == max(0.0, multiplier + lr * (mean_cost - budget))
    assert new >= 0.0  # never negative, even with a large step on slack


def test_dual_update_direction():
    assert lagr.dual_update(1.0, 0.10, 0.05, 2.0) == pytest.approx(1.1)  # violation: rises
    assert lagr.dual_update(1.0, 0.01, 0.05, 2.0) == pytest.approx(0.92)  # slack: falls
    assert lagr.dual_update(1.0, 0.01, 0.05, 100.0) == 0.0  # ... but not below 0
    assert lagr.dual_update(1.0, 0.50, 0.05, 0.0) == 1.0  # lr 0: fixed lambda (soft relaxation)


def test_lagrangian_penalty_is_lambda_times_mean_cost_over_all_responses():
    phi = torch.tensor([0.2, 0.5, 2.0], requires_grad=True)  # 3 of a step's B = 6 responses
    loss = lagr.lagrangian_cost_loss(phi, 0.3, batch_size=6)
    assert torch.allclose(loss, torch.tensor(0.3 * (0.2 + 0.5 + 2.0) / 6))
    loss.backward()
    assert torch.allclose(phi.grad, torch.full((3,), 0.3 / 6))  # every response penalised, satisfied or not


def run_args(toy, out, *extra):
    return tiny_run_args("lagrangian_distill.py", toy, out, *extra)


def test_help_and_bad_input(tmp_path):
    proc = run_script("lagrangian_distill.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--lambda-lr" in proc.stdout and "--kd-only" in proc.stdout and "--constraint" in proc.stdout
    proc = run_script("lagrangian_distill.py", "--lambda-init", "-1", cwd=tmp_path)
    assert proc.returncode != 0 and "--lambda-init and --lambda-lr must be >= 0" in proc.stderr and "Traceback" not in proc.stderr


def test_two_steps_then_resume_restores_lambda(tiny_toy, tmp_path):
    proc = run_script(*run_args(tiny_toy, tmp_path / "runs", "--num-steps", "2", "--lambda-init", "0.5", "--lambda-lr", "10"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("train/reward", "train/mean_kl", "train/cost", "train/csr", "losses/policy_loss", "losses/kl_loss", "dual/lambda", "eval/csr"):
        assert math.isfinite(records[2][key]), key
    assert math.isfinite(records[1]["losses/pg_grad_norm"]) and records[1]["losses/kl_grad_norm"] > 0  # diagnostics on step 0, every 10
    lambdas = [records[1]["dual/lambda"], records[2]["dual/lambda"]]
    assert lambdas[0] == 0.5 and lambdas[1] == pytest.approx(lagr.dual_update(0.5, records[1]["train/cost"], 0.0001, 10))
    assert records[1]["losses/kl_loss"] == pytest.approx(0.5 * records[1]["train/cost"], rel=1e-4)  # lambda * mean cost
    saved = torch.load(run_dir / "checkpoint-2" / "trainer_state.pt", weights_only=True)["lagrange_multiplier"]
    assert saved == pytest.approx(lagr.dual_update(lambdas[1], records[2]["train/cost"], 0.0001, 10)) and saved > 0.5
    proc = run_script(*run_args(tiny_toy, tmp_path / "runs", "--num-steps", "3", "--lambda-init", "0.5", "--lambda-lr", "10",
                                "--resume", str(run_dir / "checkpoint-2")), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[3]["dual/lambda"] == pytest.approx(saved)


def test_grpo_and_kd_only_modes(tiny_toy, tmp_path):
    proc = run_script(*run_args(tiny_toy, tmp_path / "grpo", "--num-steps", "1", "--lambda-init", "0", "--lambda-lr", "0"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "grpo").iterdir()
    record = read_metrics(run_dir)[1]
    assert record["dual/lambda"] == 0 and record["losses/kl_loss"] == 0 and record["losses/kl_grad_norm"] == 0  # GRPO: no KL term at all
    assert record["train/mean_kl"] > 0  # ... but the KL is still measured and logged
    proc = run_script(*run_args(tiny_toy, tmp_path / "kd", "--num-steps", "1", "--kd-only", "--lambda-init", "1", "--lambda-lr", "0"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "kd").iterdir()
    record = read_metrics(run_dir)[1]
    assert record["losses/policy_loss"] == 0 and record["losses/kl_loss"] == pytest.approx(record["train/mean_kl"], rel=1e-4)
    assert record["losses/pg_grad_norm"] == 0 and record["losses/cos_total_kl"] == pytest.approx(1.0)
