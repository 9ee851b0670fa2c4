"""cmdp_distill.py: the paper's reward and loss terms against hand-computed values, and the script end to end."""

import json
import math
import re

import pytest
import torch

import cmdp_distill as cmdp
from conftest import read_metrics, run_script, step_without_and_with_checkpointing
from conftest import tiny_run_args as conftest_tiny_run_args


def test_modified_reward_is_the_papers():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    costs = torch.tensor([0.01, 0.02, 0.06, 0.5, 0.05])  # the last sits exactly on the budget: satisfied
    # R~ = R within the budget, -(n + phi(y)) outside it, phi(y) = the response's cost
    c = costs.double()  # R~ is float64: n + phi keeps phi's digits
    assert cmdp.modified_rewards(rewards, costs, budget=0.05, penalty=20.0).tolist() == [
        1,
        0,
        -(20 + c[2]),
        -(20 + c[3]),
        1,
    ]
    assert cmdp.modified_rewards(rewards, costs, budget=0.05, penalty=0.0).tolist() == [1, 0, -c[2], -c[3], 1]
    assert cmdp.modified_rewards(rewards, costs, budget=1.0, penalty=3.0).tolist() == rewards.tolist()
    # a violator is always worse than any satisfying response, and a larger violation is worse still
    shaped = cmdp.modified_rewards(rewards, costs, 0.05, 20.0)
    assert shaped[2] > shaped[3] and shaped[2:4].max() < shaped[[0, 1, 4]].min()


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    assert torch.allclose(
        cmdp.group_advantages(rewards, 4, norm_std=False), torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    )
    std = torch.tensor([1.0, 0.0, -1.0, 0.0]).std()  # unbiased, as torch.std
    expected = torch.tensor([1.0, 0.0, -1.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(cmdp.group_advantages(rewards, 4, norm_std=True)[:4], expected)
    assert (cmdp.group_advantages(rewards, 4, norm_std=True)[4:] == 0).all()  # identical rewards: no signal


@pytest.mark.parametrize("norm_std", [False, True])
def test_a_group_of_identical_violators_gets_exactly_zero_advantage(norm_std):
    """-(20 + 0.0612) eight times: in float32 the group mean lands a rounding step off the values, and dividing by
    a std of ~1e-6 turned that into advantages of +-0.63 for the whole group."""
    for penalty, cost in ((20.0, 0.0612), (20.0, 0.0613), (1.0, 0.0701), (20.0, 1.234567)):
        shaped = cmdp.modified_rewards(torch.zeros(8), torch.full((8,), cost), 0.05, penalty)
        assert (cmdp.group_advantages(shaped, 8, norm_std) == 0).all(), (penalty, cost)


def test_advantages_of_a_tiny_spread_are_the_float64_formula():
    """Eight violators whose costs differ by 1e-5 in all: the advantages are the formula's, evaluated in float64 on
    the float32 costs the script has, not float32 rounding of -(20 + cost)."""
    import numpy as np

    costs = (0.0612 + 1e-5 * torch.linspace(0, 1, 8)).float()
    rewards = torch.tensor([0.0, 1.0] * 4)
    shaped = cmdp.modified_rewards(rewards, costs, 0.05, 20.0)
    reference = -(20.0 + costs.numpy().astype(np.float64))
    assert shaped.tolist() == reference.tolist()  # every digit of each cost kept
    for norm_std in (False, True):
        centred = reference - reference.mean()
        expected = centred / (reference.std(ddof=1) + 1e-6) if norm_std else centred
        got = cmdp.group_advantages(shaped, 8, norm_std).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
        assert got[0] > 0 > got[-1]  # the cheapest violator is the best of the group


def test_policy_loss_gradient_matches_naive_reinforce():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    actions = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    advantages = torch.tensor([0.5, -1.0, 2.0])
    logprobs = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    loss, clipped = cmdp.policy_loss(
        logprobs, logprobs.detach(), advantages, mask, clip_coef=0.2, num_tokens=int(mask.sum())
    )
    (grad,) = torch.autograd.grad(loss, logits)
    naive = 0.0  # -1/N sum_{i,t} A_i log pi(a_it), term by term
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                naive = naive - advantages[i] * torch.log_softmax(logits[i, t], -1)[actions[i, t]]
    (naive_grad,) = torch.autograd.grad(naive / mask.sum(), logits)
    assert torch.allclose(grad, naive_grad, atol=1e-6) and clipped == 0
    assert torch.allclose(loss, torch.tensor(-(0.5 * 3 - 1.0 * 5 + 2.0 * 3) / 11))  # ratio 1: -sum_i A_i T_i / N
    # a ratio outside [1-eps, 1+eps] in the direction of the advantage is clipped: no gradient from it
    logprobs = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    loss2, clipped2 = cmdp.policy_loss(logprobs, logprobs.detach() - 1.0, advantages, mask, 0.2, int(mask.sum()))
    (grad2,) = torch.autograd.grad(loss2, logits)
    assert clipped2 > 0 and torch.all(grad2[:, :, :][mask == 0] == 0)
    assert torch.all(grad2[2] == 0)  # advantage > 0 and ratio e > 1.2: every token of row 2 clipped


def test_explicit_term_weighs_each_violator_one_over_the_steps_tokens():
    phi = torch.tensor([0.2, 0.01, 0.5, 0.03], requires_grad=True)
    violated = torch.tensor([True, False, True, False])
    loss = cmdp.explicit_cost_loss(phi, violated, num_tokens=40, coef=0.5)  # 4 of the step's responses, N = 40 tokens
    assert torch.allclose(loss, torch.tensor(0.5 * (0.2 + 0.5) / 40))
    loss.backward()
    assert phi.grad.tolist() == pytest.approx(
        [0.5 / 40, 0.0, 0.5 / 40, 0.0]
    )  # violators only, 1/N each, as (I)'s tokens
    # it fades as violations become rare: one violator pulls with 1/N, not with the whole weight
    one = torch.tensor([0.2, 0.01, 0.01, 0.01], requires_grad=True)
    cmdp.explicit_cost_loss(one, torch.tensor([True, False, False, False]), num_tokens=40, coef=1.0).backward()
    assert one.grad[0].item() == pytest.approx(1 / 40) and one.grad[1:].abs().sum() == 0
    assert cmdp.explicit_cost_loss(phi, torch.zeros(4, dtype=torch.bool), 40, 1.0) == 0


@pytest.mark.parametrize("constraint, budget", [("mean", 0.45), ("sum", 1.0)])
def test_loss_is_the_derivative_of_the_modified_objective_at_every_length(constraint, budget):
    """The script's own loss, policy_loss (I) + explicit_cost_loss (II) on its modified rewards and group advantages,
    is B/N times -grad J_n, J_n(theta) = sum_y pi(y) R~(y), R~(y) = -(n + phi_theta(y)) for violators, on responses
    of 1, 2 and 3 tokens (N/B = 2.3) whose per-token costs are the exact reverse KL to a teacher. The batch holds
    each response 64 pi(y) times, an exact expectation, so a term weighted by 1/B instead of 1/N shows."""
    import common
    from conftest import exact_response_batch

    e = exact_response_batch()
    theta, n = e["theta"], 20.0

    def reward(y):
        return float(y[0] == 0)

    def phi_of(token_costs):
        return token_costs.sum() if constraint == "sum" else token_costs.mean()

    objective = 0.0
    for y in e["responses"]:
        phi = phi_of(e["response_costs"](theta, y))
        objective = objective + e["response_logprob"](theta, y).exp() * (reward(y) if phi <= budget else -(n + phi))
    (exact,) = torch.autograd.grad(-objective, theta)

    mask, logprobs = e["mask"], e["logprobs"](theta)  # (B, 3) each
    phi = common.sequence_costs(e["token_costs"](theta), mask, constraint)  # (B,) as in the script
    violated = phi.detach() > budget
    assert 0 < violated.sum() < 64 and ((phi.detach() - budget).abs() > 0.02).all()  # both kinds, none on the edge
    rewards = torch.tensor([reward(y) for y in e["batch_responses"]])
    advantages = cmdp.group_advantages(cmdp.modified_rewards(rewards, phi.detach(), budget, n), 64, norm_std=False)
    num_tokens = int(mask.sum())
    pg_loss, _ = cmdp.policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, num_tokens)
    cost_loss = cmdp.explicit_cost_loss(phi, violated, num_tokens, coef=1.0)
    (got,) = torch.autograd.grad(pg_loss + cost_loss, theta, retain_graph=True)
    torch.testing.assert_close(got * num_tokens / 64, exact, rtol=1e-5, atol=1e-8)
    # term (II) moves the gradient by far more than the tolerance, so its weight is what was checked
    (explicit,) = torch.autograd.grad(cost_loss, theta)
    assert explicit.abs().max() * num_tokens / 64 > 1e-2


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    seen = [i for step in range(5) for i in cmdp.batch_indices(step, 4, 20, seed=7)]
    assert sorted(seen) == list(range(20))
    assert cmdp.batch_indices(6, 4, 20, seed=7) == cmdp.batch_indices(6, 4, 20, seed=7)
    assert cmdp.batch_indices(0, 4, 20, seed=7) != cmdp.batch_indices(0, 4, 20, seed=8)


def tiny_run_args(toy, out, *extra):
    return conftest_tiny_run_args("cmdp_distill.py", toy, out, *extra)


@pytest.mark.slow
def test_help_shows_the_papers_flags(tmp_path):
    proc = run_script("cmdp_distill.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for flag in (
        "--budget",
        "--penalty",
        "--explicit-coef",
        "--constraint",
        "{sum,mean,prefix}",
        "--diagnostic-interval",
        "--track",
        "--learning-rate",
    ):
        assert flag in proc.stdout, flag
    assert "default: 20.0" in proc.stdout  # n = 20, the paper's penalty


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "0"], "--budget must be > 0"),
        (["--budget", "-0.1"], "--budget must be > 0"),
        (["--budget", "nan"], "--budget must be a finite number, got nan"),
        (["--budget", "inf"], "--budget must be a finite number, got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--penalty", "-inf"], "--penalty must be a finite number, got -inf"),
        (["--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--penalty", "-1"], "--penalty and --explicit-coef must be >= 0"),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--prompts-per-step", "3", "--group-size", "4", "--micro-batch-size", "8"], "must divide"),
        (["--diagnostic-interval", "-1"], "--diagnostic-interval must be >= 0"),
        (["--student", "/no/such/model"], "does not exist"),
        (["--dataset", "/no/such/file.jsonl"], "neither a known name"),
        (["--resume", "/no/such/checkpoint"], "not a checkpoint folder"),
    ],
)
def test_bad_input_is_rejected_with_one_sentence(flags, message):
    import tyro

    import common

    args = tyro.cli(cmdp.Args, args=flags)
    with pytest.raises(common.InputError, match=re.escape(message)) as info:
        cmdp.check_args(args)
    assert "\n" not in common.one_sentence(info.value)


@pytest.mark.slow
def test_bad_input_exits_with_one_sentence_before_anything_runs(tmp_path):
    proc = run_script("cmdp_distill.py", "--budget", "nan", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == "--budget must be a finite number, got nan."
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tokenizer_mismatch_is_rejected(tiny_toy, tmp_path):
    from transformers import AutoTokenizer
    import shutil

    other = tmp_path / "other_student"
    shutil.copytree(tiny_toy / "student", other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    words = vocab["model"]["vocab"]
    a, b = "apples", "books"
    words[a], words[b] = words[b], words[a]  # same strings, swapped ids
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    assert (
        AutoTokenizer.from_pretrained(other).get_vocab()[a]
        != AutoTokenizer.from_pretrained(tiny_toy / "student").get_vocab()[a]
    )
    proc = run_script(*tiny_run_args(tiny_toy, tmp_path / "runs", "--student", str(other)), cwd=tmp_path)
    assert proc.returncode != 0 and "tokenizers differ" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_steps_end_to_end(tiny_toy, tmp_path):
    proc = run_script(
        *tiny_run_args(
            tiny_toy, tmp_path / "runs", "--num-steps", "2", "--save-interval", "1", "--diagnostic-interval", "1"
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["budget"] == 0.0001 and config["args"]["num_steps"] == 2 and "torch" in config
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in (
        "train/reward",
        "train/shaped_reward",
        "train/mean_kl",
        "train/cost",
        "train/csr",
        "train/response_tokens",
        "losses/policy_loss",
        "losses/explicit_cost_loss",
        "losses/grad_norm",
        "losses/pg_grad_norm",
        "losses/kl_grad_norm",
        "losses/cos_total_pg",
        "losses/cos_total_kl",
        "perf/tokens_per_s",
        "perf/generate_s",
        "perf/score_s",
        "perf/update_s",
        "eval/accuracy",
        "eval/mean_kl",
        "eval/csr",
    ):
        assert math.isfinite(records[2][key]), key
    assert (
        records[1]["train/mean_kl"] > 0.0001 and records[1]["train/csr"] == 0
    )  # the tiny student violates the tiny budget ...
    assert records[1]["train/shaped_reward"] < -20  # ... so every response gets -(n + phi)
    # (II) with every response violating: beta sum_i phi(y_i) / N = beta x the mean cost / the mean response length
    assert cmdp.Args().explicit_coef == 20.0  # the default weight of (II), which this run uses
    assert records[1]["losses/explicit_cost_loss"] == pytest.approx(
        20.0 * records[1]["train/cost"] / records[1]["train/response_tokens"], rel=1e-4
    )
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and all(s["shaped_reward"] == pytest.approx(-(20 + s["cost"])) for s in samples)
    import common

    for step in (1, 2):
        model = common.load_model(str(run_dir / f"checkpoint-{step}"), torch.device("cpu"), torch.float32)
        assert model.config.model_type == "llama"
    assert common.load_trainer_state(run_dir / "checkpoint-2")["step"] == 2
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.slow
def test_the_enforced_constraint_decides_cost_and_csr(tiny_toy, tmp_path):
    """One step under each form (main() in this process: one import of torch for the three runs)."""
    import tyro

    costs = {}
    for constraint in ("sum", "mean", "prefix"):
        flags = ("--num-steps", "1", "--eval-interval", "0", "--constraint", constraint, "--budget", "0.05")
        run_dir = cmdp.main(tyro.cli(cmdp.Args, args=tiny_run_args(tiny_toy, tmp_path / constraint, *flags)[1:]))
        record = read_metrics(run_dir)[1]
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        costs[constraint] = record["train/cost"]
        for s in samples:  # each response's reward follows the enforced cost
            assert s["shaped_reward"] == pytest.approx(-(20 + s["cost"]) if s["cost"] > 0.05 else s["reward"])
    assert costs["mean"] == pytest.approx(
        read_metrics(next((tmp_path / "mean").iterdir()))[1]["train/mean_kl"], rel=1e-5
    )
    assert costs["sum"] > 5 * costs["mean"]  # responses of ~12 tokens: the total is ~12x the mean
    assert costs["prefix"] >= costs["mean"] - 1e-6  # the worst prefix mean is at least the full mean


@pytest.mark.slow
def test_resume_continues_exactly(tiny_toy, tmp_path):
    import safetensors.torch

    straight = run_script(
        *tiny_run_args(tiny_toy, tmp_path / "a", "--num-steps", "4", "--eval-interval", "0"), cwd=tmp_path
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script(
        *tiny_run_args(tiny_toy, tmp_path / "b", "--num-steps", "2", "--eval-interval", "0"), cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = run_script(
        *tiny_run_args(
            tiny_toy,
            tmp_path / "b",
            "--num-steps",
            "4",
            "--eval-interval",
            "0",
            "--resume",
            str(run_b / "checkpoint-2"),
        ),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_a,) = (tmp_path / "a").iterdir()
    a = safetensors.torch.load_file(run_a / "checkpoint-4" / "model.safetensors")
    b = safetensors.torch.load_file(run_b / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_a = [(r["step"], r.get("train/reward"), r.get("train/mean_kl")) for r in read_metrics(run_a)]
    steps_b = [(r["step"], r.get("train/reward"), r.get("train/mean_kl")) for r in read_metrics(run_b)]
    assert steps_a == steps_b  # same trajectory, each step logged once


@pytest.mark.slow
def test_resume_refuses_a_changed_batch_and_takes_the_requested_learning_rate(tiny_toy, tmp_path):
    import common

    first = run_script(
        *tiny_run_args(tiny_toy, tmp_path / "runs", "--num-steps", "1", "--eval-interval", "0"), cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = str(run_dir / "checkpoint-1")
    for flags, name in (
        (["--seed", "2"], "--seed"),
        (["--group-size", "2", "--micro-batch-size", "4"], "--group-size"),
        (["--prompts-per-step", "4"], "--prompts-per-step"),
    ):
        proc = run_script(
            *tiny_run_args(tiny_toy, tmp_path / "runs", "--num-steps", "2", "--resume", checkpoint, *flags),
            cwd=tmp_path,
        )
        assert (
            proc.returncode != 0
            and f"the checkpoint was trained with {name}" in proc.stderr
            and "Traceback" not in proc.stderr
        )
    proc = run_script(
        *tiny_run_args(
            tiny_toy,
            tmp_path / "runs",
            "--num-steps",
            "2",
            "--eval-interval",
            "0",
            "--resume",
            checkpoint,
            "--learning-rate",
            "0.005",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: learning rate 0.005 (the checkpoint ran at 0.01)" in proc.stdout
    state = common.load_trainer_state(run_dir / "checkpoint-2")
    assert all(group["lr"] == 0.005 for group in state["optimizer"]["param_groups"])


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_update(tiny_toy, tmp_path):
    """--gradient-checkpointing recomputes activations in the backward; the update is the same (checkpointed layers
    drop the KV cache, so the update's forward runs every prompt in full instead of sharing a group's prompt cache)."""
    import safetensors.torch

    weights = step_without_and_with_checkpointing(tiny_toy, tmp_path, "model.safetensors")
    start = safetensors.torch.load_file(tiny_toy / "student" / "model.safetensors")
    for name, plain in weights[""].items():
        assert (plain - start[name]).abs().max() > 0.5e-3, name  # the step moved every tensor (AdamW: by about lr)
        # 1% of the step: the uncached forward sums in another order, and AdamW amplifies that noise where a
        # gradient is near 0 (1.1e-6 seen once at the default beta 20); a wrong update moves elements by ~lr
        torch.testing.assert_close(weights["--gradient-checkpointing"][name], plain, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_short_run_learns_to_meet_the_budget(tiny_toy, tmp_path):
    """Ten steps of the script itself, with the paper's weighting (beta = 1): the share of responses within the
    budget (CSR) rises and term (II), the explicit gradient of phi on violators, falls. The tiny models' output layers
    are scaled by 10 so that their KL is large enough to learn from, and every step samples the same problem, so
    that the trend is not prompt noise."""
    import common

    for name in ("student", "teacher"):
        model = common.load_model(str(tiny_toy / name), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10)
        model.save_pretrained(tmp_path / name)
        common.load_tokenizer(str(tiny_toy / name)).save_pretrained(tmp_path / name)
    (tmp_path / "one.jsonl").write_text((tiny_toy / "train.jsonl").read_text().splitlines()[0] + "\n")
    proc = run_script(
        "cmdp_distill.py",
        "--student",
        str(tmp_path / "student"),
        "--teacher",
        str(tmp_path / "teacher"),
        "--dataset",
        str(tmp_path / "one.jsonl"),
        "--eval-dataset",
        str(tiny_toy / "test.jsonl"),
        "--prompts-per-step",
        "2",
        "--group-size",
        "8",
        "--micro-batch-size",
        "16",
        "--max-new-tokens",
        "12",
        "--eval-limit",
        "4",
        "--output-dir",
        str(tmp_path / "runs"),
        "--budget",
        "0.25",
        "--learning-rate",
        "3e-4",
        "--num-steps",
        "10",
        "--eval-interval",
        "0",
        "--save-interval",
        "0",
        "--diagnostic-interval",
        "0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    steps = [r for r in read_metrics(run_dir) if "train/csr" in r]
    first, last = steps[:3], steps[-4:]

    def mean(records, key):
        return sum(r[key] for r in records) / len(records)

    assert mean(last, "train/csr") > mean(first, "train/csr") + 0.3
    assert mean(last, "losses/explicit_cost_loss") < 0.5 * mean(first, "losses/explicit_cost_loss")


@pytest.mark.slow
def test_the_loop_divides_both_terms_by_the_steps_response_tokens(tiny_toy, tmp_path):
    """What the derivative test above assumes of main(): terms (I) and (II) of every micro-batch are divided by the
    same count, the step's response tokens (a term (II) divided by the step's responses, B, weighed L times more)."""
    from conftest import loss_normalisers

    calls = loss_normalisers(cmdp, "explicit_cost_loss", tiny_toy, tmp_path / "runs", "--micro-batch-size", "4")
    assert len(calls) == 2  # 2 prompts x 4 responses in micro-batches of 4
    for pg_count, cost_count, tokens in calls:
        assert pg_count == cost_count == tokens and tokens > 8  # several tokens per response
