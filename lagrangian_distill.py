"""Soft-Lagrangian distillation baselines: task reward minus a multiplier times the mean KL to a teacher.

The baselines that Zimmer et al., arXiv 2509.22921, compare against; definitions in ../shared/METHOD.md 2.5.
The same loop as cmdp_distill.py: `diff cmdp_distill.py lagrangian_distill.py` shows only the method.

    loss = -1/|tokens| sum_{i,t} A_i log pi_theta(y_it|s_it) + lambda * 1/N sum_i KLbar(y_i),   A_i = R_i - mean_group(R)
    dual ascent after each step: lambda <- max(0, lambda + eta * (mean_i KLbar(y_i) - d))
This bounds the *mean* KL over responses, where the CMDP method bounds each response's: compare their CSR.
Choices where the paper is silent (ours), each with its flag: the exact per-token reverse KL as in
cmdp_distill.py; the penalty is a differentiable loss term, not part of the reward; lambda starts at
--lambda-init and moves by --lambda-lr (0 = fixed); advantages centred per group (--norm-adv-std).

    python lagrangian_distill.py --budget 0.05                            # dual ascent
    python lagrangian_distill.py --lambda-init 0.1 --lambda-lr 0          # fixed lambda (GKD-GRPO style)
    python lagrangian_distill.py --lambda-init 0 --lambda-lr 0            # GRPO: task reward only
    python lagrangian_distill.py --kd-only --lambda-init 1 --lambda-lr 0  # on-policy KD (reverse KL, GKD/MiniLLM)
    python lagrangian_distill.py --student Qwen/Qwen2.5-Math-1.5B-Instruct --teacher Qwen/Qwen2.5-Math-7B-Instruct \\
        --dataset gsm8k --max-new-tokens 1024 --micro-batch-size 8 --learning-rate 1e-6 --gradient-checkpointing
"""

import functools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

import common
import toy_math


@dataclass
class Args:
    """Soft-Lagrangian distillation (task reward - lambda * mean KL, fixed or dual-ascent lambda) of a student LLM."""

    exp_name: str = os.path.basename(__file__).removesuffix(".py")
    """name of the experiment (the run folder is {output_dir}/{exp_name}__{seed}__{unix_time})"""
    seed: int = 1
    """seed of the data order, of sampling (derived per step) and of torch/numpy/random"""
    student: str = "toy"
    """student to train: hub id, local folder, .gguf file, or 'toy' (built on first use)"""
    teacher: str = "toy"
    """frozen teacher with the student's tokenizer: hub id, local folder, .gguf file, or 'toy'"""
    dataset: str = "toy"
    """training problems: 'toy', 'gsm8k', 'math500' or a .jsonl/.json file (train split of named ones)"""
    eval_dataset: str | None = None
    """held-out problems for the periodic eval; None: the test split of --dataset"""
    output_dir: str = "runs"
    """parent folder of run folders"""
    num_steps: int = 120
    """optimizer steps (one batch of prompts_per_step x group_size responses each)"""
    eval_interval: int = 40
    """evaluate every N steps (and at step 0 and the end); 0 = only at the start and the end"""
    eval_limit: int = 200
    """held-out problems per eval (greedy)"""
    save_interval: int = 60
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    resume: str | None = None
    """checkpoint folder to resume from (weights, optimizer, step; data order and sampling seeds follow)"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """compute dtype, 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32' or 'bfloat16': the teacher's weights and
    the student's forward passes (autocast); the student's weights and AdamW state stay float32"""
    trust_remote_code: bool = False
    """allow models whose code lives in their hub repository (runs that code)"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass (less memory, ~30% slower)"""
    prompts_per_step: int = 16
    """distinct prompts per step"""
    group_size: int = 8
    """responses sampled per prompt (G >= 2; advantages are relative to the group)"""
    micro_batch_size: int = 64
    """sequences per forward/backward (and per generation batch); must divide prompts_per_step x group_size"""
    max_new_tokens: int = 64
    """response length cap in tokens (toy responses are ~25 tokens; 1024 for GSM8K, 2048+ for MATH)"""
    temperature: float = 1.0
    """sampling temperature for the training responses (the KL is always at temperature 1)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    update_epochs: int = 1
    """optimizer steps on each batch; > 1 reuses it with the PPO-clipped ratio"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (only active when update_epochs > 1)"""
    norm_adv_std: bool = False
    """divide group-relative advantages by the group's std (GRPO) instead of centring only (Dr. GRPO)"""
    kl_chunk_size: int = 1024
    """positions per chunk in the exact KL (bounds the memory of the vocabulary-wide softmax)"""
    budget: float = 0.05
    """KL budget d in nats per token: a response satisfies the constraint iff its mean per-token KL <= d"""

    # Algorithm specific arguments
    lambda_init: float = 1.0
    """lambda >= 0 at step 0: weight of the mean per-token KL over all responses in the loss"""
    lambda_lr: float = 10.0
    """eta >= 0: dual-ascent step size on (mean KL - budget) after each step; 0 = fixed lambda (soft relaxation)"""
    kd_only: bool = False
    """drop the task reward: pure on-policy distillation minimising lambda * reverse KL (GKD / MiniLLM style)"""


# ALGO LOGIC: the method as pure functions
def dual_update(lagrange_multiplier: float, mean_kl: float, budget: float, lr: float) -> float:
    """Projected dual ascent on the mean-KL constraint: lambda <- max(0, lambda + lr * (mean KL - budget))."""
    return max(0.0, lagrange_multiplier + lr * (mean_kl - budget))


def group_advantages(rewards: torch.Tensor, group_size: int, norm_std: bool) -> torch.Tensor:
    """A_i = R_i - mean of its group (B,), optionally / (group std + 1e-6); groups are consecutive rows."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if norm_std:
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-6)
    return advantages.view(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef: float, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level clipped policy-gradient loss summed over (B, T) and divided by the batch's token count.

    With logprobs == old_logprobs (first epoch) the ratio is 1 and the gradient is -A_i grad log pi.
    Returns (loss, number of clipped tokens).
    """
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    mask = mask.to(logprobs.dtype)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    return loss, ((clipped > unclipped).to(mask.dtype) * mask).sum()


def lagrangian_kl_weights(num_responses: int, lagrange_multiplier: float) -> torch.Tensor:
    """Per-response weight (B,) of KLbar(y) in the loss: lambda / B on every response (lambda * mean KLbar)."""
    return torch.full((num_responses,), lagrange_multiplier / num_responses)


def kl_penalty_loss(kl: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i KLbar(y_i) from per-token KL (B, T), response mask (B, T) and weights (B,); differentiable."""
    mean_kl = (kl * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,) KLbar(y)
    return (weights * mean_kl).sum()


# TRY NOT TO MODIFY: argument checks, loading, data order
def check_args(args: Args) -> None:
    """Reject bad values with one sentence each, before anything loads."""
    if args.budget <= 0:
        raise SystemExit(f"--budget must be > 0 nats per token, got {args.budget}.")
    if args.group_size < 2:
        raise SystemExit(f"--group-size must be >= 2 (advantages are relative to the group), got {args.group_size}.")
    for name in ("num_steps", "prompts_per_step", "micro_batch_size", "max_new_tokens", "update_epochs", "kl_chunk_size", "eval_limit"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if (args.prompts_per_step * args.group_size) % args.micro_batch_size:
        raise SystemExit(f"--micro-batch-size {args.micro_batch_size} must divide --prompts-per-step x --group-size = {args.prompts_per_step * args.group_size}.")
    if args.learning_rate <= 0 or args.temperature <= 0:
        raise SystemExit(f"--learning-rate and --temperature must be > 0, got {args.learning_rate} and {args.temperature}.")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}.")
    if args.resume and not (Path(args.resume) / "trainer_state.pt").is_file():
        raise SystemExit(f"--resume {args.resume!r} is not a checkpoint folder (it has no trainer_state.pt).")
    for flag, value in (("--student", args.student), ("--teacher", args.teacher)):
        if value != "toy":
            common.check_model_path(value, flag)
    for value in (args.dataset, args.eval_dataset or args.dataset):
        common.check_dataset(value)
    if args.lambda_init < 0 or args.lambda_lr < 0:
        raise SystemExit(f"--lambda-init and --lambda-lr must be >= 0, got {args.lambda_init} and {args.lambda_lr}.")


def batch_indices(step: int, batch_size: int, num_problems: int, seed: int) -> list[int]:
    """Problems of a step: a fresh seeded permutation per epoch, so the order is a function of (seed, step)."""
    positions = [divmod(i, num_problems) for i in range(step * batch_size, (step + 1) * batch_size)]  # (epoch, position)
    orders = {epoch: np.random.default_rng([seed, epoch]).permutation(num_problems) for epoch, _ in positions}
    return [int(orders[epoch][position]) for epoch, position in positions]


def main(args: Args) -> Path:
    check_args(args)
    student_path = args.resume or toy_math.resolve(args.student, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher")
    train_path = toy_math.resolve(args.dataset, "train")
    eval_path = toy_math.resolve(args.eval_dataset or args.dataset, "test")
    train_problems = common.load_problems(train_path, "train")
    eval_problems = common.load_problems(eval_path, "test")[: args.eval_limit]
    tokenizer = common.load_tokenizer(student_path, args.trust_remote_code)
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))

    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    # float32 master weights: in bf16, Adam steps of lr ~1e-6 round to nothing; the compute still runs in dtype
    student = common.load_model(student_path, device, torch.float32, args.trust_remote_code)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.config.use_cache = True  # generation wants the KV cache even with gradient checkpointing
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=0.0)
    start_step, lagrange_multiplier = 0, args.lambda_init
    if args.resume:
        state = common.load_trainer_state(args.resume)
        optimizer.load_state_dict(state["optimizer"])
        start_step, lagrange_multiplier = state["step"], state["lagrange_multiplier"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        run_dir = Path(args.resume).parent
        for name in ("metrics.jsonl", "samples.jsonl"):
            common.truncate_jsonl(run_dir / name, start_step)
        common.make_run_dir(args, run_dir, config_name=f"config_resume_{start_step}.json")
    else:
        run_dir = common.make_run_dir(args)
    print(f"run folder: {run_dir}", flush=True)

    batch_size = args.prompts_per_step * args.group_size
    student_head, teacher_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight

    def run_eval(step: int) -> dict:
        with autocast():
            _, summary = common.evaluate(student, tokenizer, eval_problems, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.micro_batch_size, teacher=teacher, budget=args.budget,
                                         kl_chunk_size=args.kl_chunk_size, seed=args.seed)
        record = {"step": step, **{f"eval/{k}": summary[k] for k in ("accuracy", "mean_kl", "csr", "mean_response_tokens")}}
        print(" | ".join([f"eval step {step}"] + [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in record.items() if k != "step"]), flush=True)
        return record

    if start_step == 0:
        common.append_jsonl(run_dir / "metrics.jsonl", run_eval(0))
    for step in tqdm(range(start_step, args.num_steps), desc="steps", initial=start_step, total=args.num_steps):
        step_start = time.time()
        # 1. sample G responses per prompt from the student (seeded by (seed, step), so resumes are exact)
        problems = [train_problems[i] for i in batch_indices(step, args.prompts_per_step, len(train_problems), args.seed)]
        problems = [p for p in problems for _ in range(args.group_size)]  # (B*G,), groups are consecutive
        prompts = [common.render_prompt(tokenizer, p["question"]) for p in problems]
        torch.manual_seed(args.seed * 1_000_003 + step)
        with autocast():
            pairs = common.generate(student, tokenizer, prompts, args.max_new_tokens, args.temperature, args.micro_batch_size)
        responses = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
        generate_seconds = time.time() - step_start

        # 2. score: task reward and per-token reverse KL to the teacher on the student's own tokens
        rewards = torch.tensor([float(common.is_correct(r, p["answer"])) for r, p in zip(responses, problems)])  # (B*G,)
        micro_batches = []
        with torch.no_grad(), autocast():
            for i in range(0, batch_size, args.micro_batch_size):
                mb = common.pad_sequences(pairs[i : i + args.micro_batch_size], tokenizer.pad_token_id, device)
                # the teacher's final hidden states are kept for the update (H/V of its logits' size), so the
                # teacher runs once per step; its logits only ever exist a chunk at a time
                mb["teacher_hidden"] = common.final_hidden(teacher, mb)[:, :-1]  # (b, L-1, H_T)
                kl, logprobs, teacher_logprobs = common.kl_from_hidden(
                    common.final_hidden(student, mb)[:, :-1], student_head, mb["teacher_hidden"], teacher_head,
                    mb["input_ids"][:, 1:], args.kl_chunk_size)  # each (b, L-1)
                mb["old_logprobs"] = logprobs
                mb["kl_mean"] = common.masked_mean(kl, mb["response_mask"], dim=1)  # (b,) KLbar(y)
                micro_batches.append(mb)
        kl_means = torch.cat([mb["kl_mean"] for mb in micro_batches]).float().cpu()  # (B*G,)
        num_tokens = int(sum(mb["response_mask"].sum() for mb in micro_batches))
        score_seconds = time.time() - step_start - generate_seconds

        # ALGO LOGIC: 3. task reward (none for KD), group-relative advantages, lambda-weighted KL on every response
        task_rewards = torch.zeros_like(rewards) if args.kd_only else rewards  # (B*G,)
        shaped_rewards = task_rewards - lagrange_multiplier * kl_means  # (B*G,) the Lagrangian, logged only
        advantages = group_advantages(task_rewards, args.group_size, args.norm_adv_std).to(device)  # (B*G,)
        kl_weights = lagrangian_kl_weights(batch_size, lagrange_multiplier).to(device)  # (B*G,)

        # 4. policy loss and update: token-level policy gradient + lambda * mean KL, then the dual step
        student.train()
        for epoch in range(args.update_epochs):
            optimizer.zero_grad(set_to_none=True)
            pg_total, kl_loss_total, clipped_tokens = 0.0, 0.0, 0.0
            for j, mb in enumerate(micro_batches):
                rows = slice(j * args.micro_batch_size, (j + 1) * args.micro_batch_size)
                with autocast():
                    kl, logprobs, _ = common.kl_from_hidden(
                        common.final_hidden(student, mb)[:, :-1], student_head, mb["teacher_hidden"], teacher_head,
                        mb["input_ids"][:, 1:], args.kl_chunk_size)  # (b, L-1), differentiable
                pg_loss, clipped = policy_loss(logprobs, mb["old_logprobs"], advantages[rows], mb["response_mask"], args.clip_coef, num_tokens)
                kl_loss = kl_penalty_loss(kl, mb["response_mask"], kl_weights[rows])
                (pg_loss + kl_loss).backward()
                pg_total, kl_loss_total, clipped_tokens = pg_total + pg_loss.item(), kl_loss_total + kl_loss.item(), clipped_tokens + clipped.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm).item()
            optimizer.step()
        used_multiplier, lagrange_multiplier = lagrange_multiplier, dual_update(lagrange_multiplier, kl_means.mean().item(), args.budget, args.lambda_lr)
        update_seconds = time.time() - step_start - generate_seconds - score_seconds

        # 5. log / eval / save
        step_seconds = time.time() - step_start
        response_lengths = torch.tensor([len(r) for _, r in pairs], dtype=torch.float)
        record = {
            "step": step + 1,
            "train/reward": rewards.mean().item(),
            "train/accuracy": rewards.mean().item(),
            "train/modified_reward": shaped_rewards.mean().item(),
            "train/mean_kl": kl_means.mean().item(),
            "train/csr": (kl_means <= args.budget).float().mean().item(),
            "dual/lambda": used_multiplier,
            "train/response_tokens": response_lengths.mean().item(),
            "train/truncated": (response_lengths >= args.max_new_tokens).float().mean().item(),
            "losses/policy_loss": pg_total,
            "losses/kl_loss": kl_loss_total,
            "losses/clipfrac": clipped_tokens / max(num_tokens, 1),
            "losses/grad_norm": grad_norm,
            "perf/tokens_per_s": num_tokens / step_seconds,
            "perf/generate_s": generate_seconds,
            "perf/score_s": score_seconds,
            "perf/update_s": update_seconds,
        }
        print(f"step {step + 1} | reward {record['train/reward']:.3f} | modified {record['train/modified_reward']:.3f} | "
              f"kl {record['train/mean_kl']:.4f} | csr {record['train/csr']:.3f} | len {record['train/response_tokens']:.1f} | "
              f"pg {pg_total:.4f} | kl_loss {kl_loss_total:.4f} | gnorm {grad_norm:.3f} | {record['perf/tokens_per_s']:.0f} tok/s", flush=True)
        if args.eval_interval and (step + 1) % args.eval_interval == 0 or step + 1 == args.num_steps:
            record.update(run_eval(step + 1))
        common.append_jsonl(run_dir / "metrics.jsonl", record)
        group = slice(0, args.group_size)  # the first prompt's group
        common.append_jsonl(run_dir / "samples.jsonl", [
            {"step": step + 1, "prompt": prompts[i], "response": responses[i], "gold": problems[i]["answer"], "reward": rewards[i].item(),
             "mean_kl": kl_means[i].item(), "modified_reward": shaped_rewards[i].item()} for i in range(group.start, group.stop)])
        if args.save_interval and (step + 1) % args.save_interval == 0 or step + 1 == args.num_steps:
            trainer_state = {"step": step + 1, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                             "lagrange_multiplier": lagrange_multiplier}
            common.save_checkpoint(run_dir / f"checkpoint-{step + 1}", student, tokenizer, trainer_state, args)
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
