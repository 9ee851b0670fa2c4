"""lagrangian_distill.py: the dual update and penalised loss, and the script end to end (lambda survives resume)."""

import math
import re

import pytest
import torch

import lagrangian_distill as lagr
from conftest import read_metrics, run_script, tiny_run_args


@pytest.mark.parametrize(
    "multiplier, mean_cost, budget, lr, expected",
    [
        (0.0, 0.2, 0.05, 1.0, 0.15),  # violation from lambda = 0: rises by eta * 0.15
        (0.5, 0.0, 0.05, 100.0, 0.0),  # a large step on slack: projected to 0, never negative
        (2.0, 0.05, 0.05, 3.0, 2.0),  # on the budget: unchanged
        (1.0, 0.3, 0.05, 0.5, 1.125),
    ],
)
def test_dual_update_is_projected_gradient_ascent(multiplier, mean_cost, budget, lr, expected):
    assert lagr.dual_update(multiplier, mean_cost, budget, lr) == pytest.approx(expected)


def test_dual_update_direction():
    assert lagr.dual_update(1.0, 0.10, 0.05, 2.0) == pytest.approx(1.1)  # violation: rises
    assert lagr.dual_update(1.0, 0.01, 0.05, 2.0) == pytest.approx(0.92)  # slack: falls
    assert lagr.dual_update(1.0, 0.01, 0.05, 100.0) == 0.0  # ... but not below 0
    assert lagr.dual_update(1.0, 0.50, 0.05, 0.0) == 1.0  # eta 0 (--method fixed and kd): lambda stays


@pytest.mark.parametrize(
    "method, lambda_init, lambda_lr, expected",
    [
        ("dual", None, None, (1.0, 10.0)),
        ("dual", 0.5, 2.0, (0.5, 2.0)),
        ("fixed", None, None, (1.0, 0.0)),
        ("fixed", 0.1, None, (0.1, 0.0)),
        ("grpo", None, None, (0.0, 0.0)),
        ("kd", None, None, (1.0, 0.0)),
    ],
)
def test_each_method_is_one_lambda_schedule(method, lambda_init, lambda_lr, expected):
    assert lagr.lambda_schedule(method, lambda_init, lambda_lr) == expected


def test_lagrangian_penalty_is_lambda_times_each_cost_over_the_steps_tokens():
    costs = torch.tensor([0.2, 0.5, 2.0], requires_grad=True)  # 3 of a step's responses, N = 40 tokens
    loss = lagr.lagrangian_penalty(costs, 0.3, num_tokens=40)
    assert torch.allclose(loss, torch.tensor(0.3 * (0.2 + 0.5 + 2.0) / 40))
    loss.backward()
    assert torch.allclose(costs.grad, torch.full((3,), 0.3 / 40))  # every response penalised, satisfied or not


@pytest.mark.parametrize("constraint", ["mean", "sum"])
def test_loss_is_the_derivative_of_reward_minus_lambda_cost_at_every_length(constraint):
    """policy_loss + lagrangian_penalty is B/N times -grad of sum_y pi(y) R(y) - lambda sum_y pi(y) cost_theta(y),
    the penalty differentiated through the cost and not through the sampling (pi held fixed there, as in GKD), on
    responses of 1, 2 and 3 tokens in a batch that is an exact expectation (tests/conftest.py): lambda weighs cost
    against reward whatever the lengths."""
    import common
    from conftest import exact_response_batch

    e = exact_response_batch()
    theta, lam = e["theta"], 0.7

    def reward(y):
        return float(y[0] == 0)

    objective = 0.0
    for y in e["responses"]:
        token_costs = e["response_costs"](theta, y)
        cost = token_costs.sum() if constraint == "sum" else token_costs.mean()
        objective = objective + e["response_logprob"](theta, y).exp() * reward(y)
        objective = objective - lam * e["response_logprob"](theta, y).exp().detach() * cost
    (exact,) = torch.autograd.grad(-objective, theta)

    mask, logprobs = e["mask"], e["logprobs"](theta)
    costs = common.sequence_costs(e["token_costs"](theta), mask, constraint)  # (B,)
    rewards = torch.tensor([reward(y) for y in e["batch_responses"]])
    advantages = lagr.group_advantages(rewards, 64, norm_std=False)
    num_tokens = int(mask.sum())
    pg_loss, _ = lagr.policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, num_tokens)
    penalty = lagr.lagrangian_penalty(costs, lam, num_tokens)
    (got,) = torch.autograd.grad(pg_loss + penalty, theta, retain_graph=True)
    torch.testing.assert_close(got * num_tokens / 64, exact, rtol=1e-5, atol=1e-8)
    (penalty_grad,) = torch.autograd.grad(penalty, theta)
    assert penalty_grad.abs().max() * num_tokens / 64 > 1e-2  # the penalty's weight is what was checked


@pytest.mark.slow
def test_the_loop_divides_both_terms_by_the_steps_response_tokens(tiny_toy, tmp_path):
    from conftest import loss_normalisers

    flags = ("--method", "fixed", "--lambda-init", "0.5", "--micro-batch-size", "4")
    calls = loss_normalisers(lagr, "lagrangian_penalty", tiny_toy, tmp_path / "runs", *flags)
    assert len(calls) == 2
    for pg_count, cost_count, tokens in calls:
        assert pg_count == cost_count == tokens and tokens > 8


def run_args(toy, out, *extra):
    return tiny_run_args("lagrangian_distill.py", toy, out, *extra)


@pytest.mark.slow
def test_help_exits_0(tmp_path):
    proc = run_script("lagrangian_distill.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "{dual,fixed,grpo,kd}" in proc.stdout and "--lambda-lr" in proc.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lambda-init", "-1"], "--lambda-init must be >= 0 and --lambda-lr > 0"),
        (["--lambda-lr", "0"], "--lambda-init must be >= 0 and --lambda-lr > 0"),
        (["--method", "kd", "--lambda-lr", "10"], "--method kd keeps lambda fixed; drop --lambda-lr"),
        (["--method", "fixed", "--lambda-lr", "1"], "--method fixed keeps lambda fixed; drop --lambda-lr"),
        (["--method", "grpo", "--lambda-init", "1"], "--method grpo has lambda = 0"),
        (["--budget", "nan"], "--budget must be a finite number, got nan"),
        (["--lambda-init", "inf"], "--lambda-init must be a finite number, got inf"),
        (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    ],
)
def test_contradictory_or_bad_flags_are_refused(flags, message):
    import tyro

    import common

    with pytest.raises(common.InputError, match=re.escape(message)):
        lagr.check_args(tyro.cli(lagr.Args, args=flags))


@pytest.mark.slow
def test_two_steps_then_resume_restores_lambda(tiny_toy, tmp_path):
    proc = run_script(
        *run_args(tiny_toy, tmp_path / "runs", "--num-steps", "2", "--lambda-init", "0.5", "--lambda-lr", "10"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in (
        "train/reward",
        "train/mean_kl",
        "train/cost",
        "train/csr",
        "losses/policy_loss",
        "losses/lagrangian_penalty",
        "dual/lambda",
        "eval/csr",
    ):
        assert math.isfinite(records[2][key]), key
    assert (
        math.isfinite(records[1]["losses/pg_grad_norm"]) and records[1]["losses/kl_grad_norm"] > 0
    )  # diagnostics on step 0, every 10
    lambdas = [records[1]["dual/lambda"], records[2]["dual/lambda"]]
    assert lambdas[0] == 0.5 and lambdas[1] == pytest.approx(
        lagr.dual_update(0.5, records[1]["train/cost"], 0.0001, 10)
    )
    assert records[1]["losses/lagrangian_penalty"] == pytest.approx(
        0.5 * records[1]["train/cost"] / records[1]["train/response_tokens"], rel=1e-4
    )  # lambda * sum_i cost(y_i) / N
    saved = torch.load(run_dir / "checkpoint-2" / "trainer_state.pt", weights_only=True)["lagrange_multiplier"]
    assert saved == pytest.approx(lagr.dual_update(lambdas[1], records[2]["train/cost"], 0.0001, 10)) and saved > 0.5
    proc = run_script(
        *run_args(
            tiny_toy,
            tmp_path / "runs",
            "--num-steps",
            "3",
            "--lambda-init",
            "0.5",
            "--lambda-lr",
            "10",
            "--resume",
            str(run_dir / "checkpoint-2"),
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[3]["dual/lambda"] == pytest.approx(saved)


@pytest.mark.slow
def test_grpo_and_kd_methods(tiny_toy, tmp_path):
    proc = run_script(*run_args(tiny_toy, tmp_path / "grpo", "--num-steps", "1", "--method", "grpo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "grpo").iterdir()
    record = read_metrics(run_dir)[1]
    assert record["dual/lambda"] == 0 and record["losses/lagrangian_penalty"] == 0  # GRPO: no KL term at all
    assert record["losses/kl_grad_norm"] == 0 and record["train/mean_kl"] > 0  # ... but the KL is still measured
    proc = run_script(*run_args(tiny_toy, tmp_path / "kd", "--num-steps", "3", "--method", "kd"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "kd").iterdir()
    records = read_metrics(run_dir)[1:]
    # KD keeps lambda at 1 even though the tiny student's cost is far over the tiny budget (dual ascent would move it)
    assert [r["dual/lambda"] for r in records] == [1.0, 1.0, 1.0]
    assert all(r["losses/policy_loss"] == 0 for r in records)
    assert records[0]["losses/lagrangian_penalty"] == pytest.approx(
        records[0]["train/cost"] / records[0]["train/response_tokens"], rel=1e-4
    )
    assert records[0]["losses/pg_grad_norm"] == 0 and records[0]["losses/cos_total_kl"] == pytest.approx(1.0)
