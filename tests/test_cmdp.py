"""cmdp_distill.py: the method's pure functions against hand-computed values, and the script end to end."""

import json
import math

import pytest
import torch

import cmdp_distill as cmdp
from conftest import run_script
from conftest import tiny_run_args as conftest_tiny_run_args


def test_modified_reward_matches_its_definition():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    costs = torch.tensor([0.01, 0.02, 0.06, 0.5, 0.05])  # the last sits exactly on the budget: satisfied
    assert cmdp.modified_rewards(rewards, costs, budget=0.05, penalty=1.0).tolist() == [1.0, 0.0, -1.0, -1.0, 1.0]
    assert cmdp.modified_rewards(rewards, costs, budget=0.05, penalty=0.0).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert cmdp.modified_rewards(rewards, costs, budget=1.0, penalty=3.0).tolist() == rewards.tolist()


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    assert torch.allclose(cmdp.group_advantages(rewards, 4, norm_std=False), torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    std = torch.tensor([1.0, 0.0, -1.0, 0.0]).std()  # unbiased, as torch.std
    expected = torch.tensor([1.0, 0.0, -1.0, 0.0]) / (std + 1e-6)
    assert torch.allclose(cmdp.group_advantages(rewards, 4, norm_std=True)[:4], expected)
    assert (cmdp.group_advantages(rewards, 4, norm_std=True)[4:] == 0).all()  # identical rewards: no signal


def test_sequence_costs_mean_and_prefix():
    costs = torch.tensor([[0.0, 0.3, 0.0, 0.0, 9.9], [0.1, 0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # padding after 4 tokens must be ignored
    assert torch.allclose(cmdp.sequence_costs(costs, mask, "mean"), torch.tensor([0.075, 0.1]))
    # prefix means of row 0: 0, 0.15, 0.1, 0.075 -> worst 0.15
    assert torch.allclose(cmdp.sequence_costs(costs, mask, "prefix"), torch.tensor([0.15, 0.1]))


def test_token_cost_estimators():
    kl = torch.tensor([[0.2]])
    logprobs, teacher_logprobs = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert cmdp.token_costs(kl, logprobs, teacher_logprobs, "exact") is kl
    assert torch.allclose(cmdp.token_costs(kl, logprobs, teacher_logprobs, "k1"), torch.tensor([[0.5]]))
    assert torch.allclose(cmdp.token_costs(kl, logprobs, teacher_logprobs, "k3"), torch.tensor([[math.exp(-0.5) - 1 + 0.5]]))


def test_policy_loss_gradient_matches_naive_reinforce():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    actions = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    advantages = torch.tensor([0.5, -1.0, 2.0])
    logprobs = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    loss, clipped = cmdp.policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_coef=0.2, num_tokens=int(mask.sum()))
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


def test_violator_kl_term_only_sees_violators():
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    weights = cmdp.violator_kl_weights(torch.tensor([True, False, True]), coef=0.5)
    assert weights.tolist() == [0.25, 0.0, 0.25]
    loss = cmdp.kl_penalty_loss(kl, mask, weights)
    assert torch.allclose(loss, torch.tensor(0.5 * (0.2 + 2.0) / 2))  # beta_v * mean KLbar over violators
    loss.backward()
    assert torch.all(kl.grad[1] == 0) and kl.grad[0, 2] == 0  # non-violator and padding get no gradient
    assert torch.allclose(kl.grad[0, :2], torch.tensor([0.125, 0.125]))
    assert cmdp.violator_kl_weights(torch.zeros(3, dtype=torch.bool), 0.5).sum() == 0


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    seen = [i for step in range(5) for i in cmdp.batch_indices(step, 4, 20, seed=7)]
    assert sorted(seen) == list(range(20))
    assert cmdp.batch_indices(6, 4, 20, seed=7) == cmdp.batch_indices(6, 4, 20, seed=7)
    assert cmdp.batch_indices(0, 4, 20, seed=7) != cmdp.batch_indices(0, 4, 20, seed=8)


def tiny_run_args(toy, out, *extra):
    return conftest_tiny_run_args("cmdp_distill.py", toy, out, *extra)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_help_exits_zero(tmp_path):
    proc = run_script("cmdp_distill.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--budget" in proc.stdout and "--violator-kl-coef" in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--budget", "-0.1"], "--budget must be > 0"),
    (["--penalty", "-1"], "--penalty and --violator-kl-coef must be >= 0"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--prompts-per-step", "3", "--group-size", "4", "--micro-batch-size", "8"], "must divide"),
    (["--student", "/no/such/model"], "does not exist"),
    (["--dataset", "/no/such/file.jsonl"], "neither a known name"),
    (["--resume", "/no/such/checkpoint"], "not a checkpoint folder"),
])
def test_bad_input_is_rejected_with_one_sentence(tmp_path, flags, message):
    proc = run_script("cmdp_distill.py", *flags, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()  # failed before any run started


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
    assert AutoTokenizer.from_pretrained(other).get_vocab()[a] != AutoTokenizer.from_pretrained(tiny_toy / "student").get_vocab()[a]
    proc = run_script(*tiny_run_args(tiny_toy, tmp_path / "runs", "--student", str(other)), cwd=tmp_path)
    assert proc.returncode != 0 and "tokenizers differ" in proc.stderr and "Traceback" not in proc.stderr


def test_two_steps_end_to_end(tiny_toy, tmp_path):
    proc = run_script(*tiny_run_args(tiny_toy, tmp_path / "runs", "--num-steps", "2", "--save-interval", "1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["budget"] == 0.0001 and config["args"]["num_steps"] == 2 and "torch" in config
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("train/reward", "train/modified_reward", "train/accuracy", "train/mean_kl", "train/csr", "train/response_tokens",
                "losses/policy_loss", "losses/kl_loss", "losses/grad_norm", "perf/tokens_per_s", "perf/generate_s",
                "perf/score_s", "perf/update_s", "eval/accuracy", "eval/mean_kl", "eval/csr"):
        assert math.isfinite(records[2][key]), key
    assert records[1]["train/mean_kl"] > 0.0001  # the tiny student violates the tiny budget ...
    assert records[1]["losses/kl_loss"] > 0  # ... so the KL feedback on violators is active
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2 * 4
    import common

    for step in (1, 2):
        model = common.load_model(str(run_dir / f"checkpoint-{step}"), torch.device("cpu"), torch.float32)
        assert model.config.model_type == "llama"
    assert common.load_trainer_state(run_dir / "checkpoint-2")["step"] == 2
    assert not list(run_dir.glob("*.tmp"))


def test_resume_continues_exactly(tiny_toy, tmp_path):
    import safetensors.torch

    straight = run_script(*tiny_run_args(tiny_toy, tmp_path / "a", "--num-steps", "4", "--eval-interval", "0"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script(*tiny_run_args(tiny_toy, tmp_path / "b", "--num-steps", "2", "--eval-interval", "0"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = run_script(*tiny_run_args(tiny_toy, tmp_path / "b", "--num-steps", "4", "--eval-interval", "0",
                                        "--resume", str(run_b / "checkpoint-2")), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_a,) = (tmp_path / "a").iterdir()
    a = safetensors.torch.load_file(run_a / "checkpoint-4" / "model.safetensors")
    b = safetensors.torch.load_file(run_b / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_a = [(r["step"], r.get("train/reward"), r.get("train/mean_kl")) for r in read_metrics(run_a)]
    steps_b = [(r["step"], r.get("train/reward"), r.get("train/mean_kl")) for r in read_metrics(run_b)]
    assert steps_a == steps_b  # same trajectory, each step logged once
