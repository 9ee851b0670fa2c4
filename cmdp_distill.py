"""CMDP distillation: maximise a verifiable task reward on-policy while every response's KL to a teacher stays under a budget.

Zimmer et al., arXiv 2509.22921: a Sauté-style modified reward, no Lagrange multiplier, no teacher at deployment;
definitions in ../shared/METHOD.md 1 and 2.1-2.4. The teacher only scores the student's own tokens.

    c_t = KL(pi_theta(.|s_t) || pi_T(.|s_t))      exact reverse KL over the tokenizer's ids, per token
    phi(y) = cost(y):  sum_t c_t (--constraint sum, the paper's) | 1/T sum_t c_t (mean) | max prefix mean (prefix)
    R~(x, y) = R(x, y)  if phi(y) <= d,  else -(n + phi(y))                     modified reward, n = --penalty
    A_i = R~_i - mean_group(R~)                                                 group-relative advantage
    loss = -1/|tokens| sum_{i,t} A_i log pi_theta(y_it|s_it)                    (I)  policy gradient, R~ detached
           + beta * 1/B sum_{i: phi(y_i) > d} phi(y_i)                          (II) explicit grad of phi, violators only
Choices where the paper is silent (ours), each with its flag:
1. phi(y) is the response's own cost; beta = --explicit-coef (1: the paper's form; 0: policy gradient only).
2. The budget bounds the mean per-token KL, in nats/token (--constraint mean, the default); sum: nats per response.
3. Advantages centred per group, not divided by its std (--norm-adv-std); no reference-model KL term.
4. c_t exact in float32 at temperature 1 (--cost-estimator k1|k3: sampled-token estimators).
5. Learning rate, batch and steps from a measured sweep on the toy task (README "Choosing the learning rate").

    python cmdp_distill.py --budget 0.05    # offline toy task (teacher and student built on first use)
    torchrun --nproc_per_node 8 cmdp_distill.py --student Qwen/Qwen2.5-Math-1.5B --teacher Qwen/Qwen2.5-Math-7B-Instruct \\
        --dataset gsm8k --constraint sum --budget 0.35 --max-new-tokens 1024 --micro-batch-size 8 --learning-rate 1e-6
"""

import functools
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

import common
import toy_math


@dataclass
class Args:
    """CMDP distillation (the paper's Sauté-style modified reward) of a student LLM under a per-response KL budget."""

    exp_name: str = os.path.basename(__file__).removesuffix(".py")
    """name of the experiment (the run folder is {output_dir}/{exp_name}__{seed}__{unix_time})"""
    seed: int = 1
    """seed of the data order, of sampling (derived per step and generation chunk) and of torch/numpy/random"""
    student: str = "toy"
    """student to train: hub id, local folder, .gguf file, or 'toy' (built on first use)"""
    teacher: str = "toy"
    """frozen teacher with the student's tokenizer: hub id, local folder, .gguf file, or 'toy'"""
    dataset: str = "toy"
    """training problems: 'toy', 'gsm8k' or a .jsonl/.json file (train split; 'math500' and 'gsm_symbolic[_p1|_p2]' have only a test split: use them as --eval-dataset)"""
    eval_dataset: str | None = None
    """held-out problems for the periodic eval; None: the test split of --dataset"""
    output_dir: str = "runs"
    """parent folder of run folders"""
    num_steps: int = 400
    """optimizer steps (one batch of prompts_per_step x group_size responses each; 400: CMDP's accuracy flattens by
    step 300-400 on the toy task, README "Longer runs")"""
    eval_interval: int = 100
    """evaluate every N steps (and at step 0 and the end); 0 = only at the start and the end"""
    eval_limit: int = 200
    """held-out problems per eval (greedy)"""
    save_interval: int = 100
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    resume: str | None = None
    """checkpoint folder to resume from (weights, optimizer, step; data order and sampling seeds follow)"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)"""
    wandb_project: str = "cmdp-distill"
    """W&B project (with --track)"""
    wandb_entity: str | None = None
    """W&B entity, a user or team (with --track); None: your default"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ... (under torchrun: cuda:LOCAL_RANK)"""
    dtype: str = "auto"
    """compute dtype, 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32' or 'bfloat16': the teacher's weights and
    the student's forward passes (autocast); the student's weights and AdamW state stay float32"""
    trust_remote_code: bool = False
    """allow models whose code lives in their hub repository (runs that code)"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass (less memory, ~30% slower)"""
    lora_rank: int = 0
    """LoRA rank r of adapters trained in place of the student's weights (PEFT; 0 = full fine-tuning); the LoRA
    learning rate is typically ~10x the full fine-tuning one (docs/scaling.md)"""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the adapter's update is scaled by alpha / r)"""
    lora_target_modules: tuple[str, ...] = common.LORA_TARGETS
    """modules that get adapters: PEFT names (suffixes); never the output layer or the embeddings (the exact KL reads
    the output layer's weight)"""
    prompts_per_step: int = 16
    """distinct prompts per step, all ranks together (each rank gets prompts_per_step / world_size whole groups)"""
    group_size: int = 8
    """responses sampled per prompt (G >= 2; advantages are relative to the group)"""
    micro_batch_size: int = 64
    """sequences per forward/backward and per generation batch; must divide the responses per rank"""
    max_new_tokens: int = 64
    """response length cap in tokens (toy responses are ~20 tokens; 1024 for GSM8K, 2048+ for MATH)"""
    temperature: float = 1.0
    """sampling temperature for the training responses (the KL is always at temperature 1)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant); the toy task's, from a measured sweep (README); ~1e-6 for 1.5B models"""
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
    """KL budget d > 0: a response satisfies the constraint iff its cost <= d (nats per token for --constraint mean
    and prefix, nats per response for sum); pick it from a pilot KD run (README "Choosing the budget")"""
    constraint: Literal["sum", "mean", "prefix"] = "mean"
    """cost of a response: 'sum' of its per-token KLs (the paper's), their 'mean', or the largest 'prefix' mean"""
    warmup_steps: int = 0
    """off-policy KD warm-up: steps of supervised training on teacher samples before RL (0 = none; for base students)"""
    warmup_learning_rate: float = 1e-5
    """AdamW learning rate of the warm-up (its own optimizer)"""
    diagnostic_interval: int = 10
    """every N steps, the gradient norm of each loss term on one micro-batch (losses/*_grad_norm); 0 = never"""

    # Algorithm specific arguments
    penalty: float = 20.0
    """n >= 0: a violating response's reward is -(n + phi(y)) (the paper uses 20; R is in {0, 1})"""
    explicit_coef: float = 1.0
    """beta >= 0: weight of term (II), the explicit gradient of phi on violators, each weighted 1/B (1 = the paper)"""
    cost_estimator: Literal["exact", "k1", "k3"] = "exact"
    """per-token cost c_t: exact KL over the vocabulary, or the sampled-token k1 / k3 estimators"""


# ALGO LOGIC: the method as pure functions
def token_costs(kl: torch.Tensor, logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token cost c_t (B, T): exact reverse KL, k1 = log p_s(y_t) - log p_T(y_t), or k3 (Schulman)."""
    if estimator == "exact":
        return kl
    log_ratio = teacher_logprobs - logprobs
    return -log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio


def modified_rewards(rewards: torch.Tensor, costs: torch.Tensor, budget: float, penalty: float) -> torch.Tensor:
    """The paper's modified reward (B,): R where phi(y) = cost <= d, -(n + phi(y)) where the budget is exceeded."""
    return torch.where(costs <= budget, rewards, -(penalty + costs))


def group_advantages(rewards: torch.Tensor, group_size: int, norm_std: bool) -> torch.Tensor:
    """A_i = R_i - mean of its group (B,), optionally / (group std + 1e-6); groups are consecutive rows."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if norm_std:
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-6)
    return advantages.view(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef: float, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Term (I): token-level clipped policy-gradient loss summed over (B, T), divided by the batch's token count.

    With logprobs == old_logprobs (first epoch) the ratio is 1 and the gradient is -A_i grad log pi.
    Returns (loss, number of clipped tokens).
    """
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    mask = mask.to(logprobs.dtype)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    return loss, ((clipped > unclipped).to(mask.dtype) * mask).sum()


def explicit_cost_loss(phi: torch.Tensor, violated: torch.Tensor, batch_size: int, coef: float) -> torch.Tensor:
    """Term (II): beta * 1/B sum over violating responses of phi(y) (B_local,), differentiable, teacher detached.

    Each violator weighs 1/B (B: all responses of the step), so the term fades as violations become rare.
    """
    return coef * (phi * violated.to(phi.dtype)).sum() / batch_size


# TRY NOT TO MODIFY: argument checks, loading, data order
def check_args(args: Args) -> None:
    """Reject bad values with one sentence each, before anything loads."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.budget <= 0:
        raise SystemExit(f"--budget must be > 0 (nats per token, or per response with --constraint sum), got {args.budget}.")
    if args.group_size < 2:
        raise SystemExit(f"--group-size must be >= 2 (advantages are relative to the group), got {args.group_size}.")
    for name in ("num_steps", "prompts_per_step", "micro_batch_size", "max_new_tokens", "update_epochs", "kl_chunk_size", "eval_limit"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    for name in ("warmup_steps", "diagnostic_interval", "eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.prompts_per_step % world_size:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of processes ({world_size}), so that each group stays on one rank.")
    if (args.prompts_per_step // world_size * args.group_size) % args.micro_batch_size:
        raise SystemExit(f"--micro-batch-size {args.micro_batch_size} must divide the responses per process, --prompts-per-step x --group-size / processes = {args.prompts_per_step // world_size * args.group_size}.")
    if args.learning_rate <= 0 or args.warmup_learning_rate <= 0 or args.temperature <= 0:
        raise SystemExit(f"--learning-rate, --warmup-learning-rate and --temperature must be > 0, got {args.learning_rate}, {args.warmup_learning_rate} and {args.temperature}.")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track logs to Weights & Biases, which is not installed: pip install wandb==0.31.0.")
    if args.resume:
        if not (Path(args.resume) / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume {args.resume!r} is not a checkpoint folder (it has no trainer_state.pt).")
        saved = json.loads((Path(args.resume) / "args.json").read_text())
        for name in ("seed", "prompts_per_step", "group_size", "dataset"):  # they fix the data order and the batches
            if saved.get(name) != getattr(args, name):
                raise SystemExit(f"--resume: the checkpoint was trained with --{name.replace('_', '-')} {saved.get(name)}, not {getattr(args, name)}; resume with the same value (or start a new run).")
    for flag, value in (("--student", args.student), ("--teacher", args.teacher)):
        if value != "toy":
            common.check_model_path(value, flag)
    if (args.student == "toy") != (args.teacher == "toy"):
        raise SystemExit(f"--student {args.student} and --teacher {args.teacher}: the toy models only fit each other (their tokenizer is the toy's); pass both or neither.")
    common.check_dataset(args.dataset, "train")
    common.check_dataset(args.eval_dataset or args.dataset, "test")
    common.check_lora_args(args.lora_rank, args.lora_alpha, args.lora_target_modules, args.student)
    if args.penalty < 0 or args.explicit_coef < 0:
        raise SystemExit(f"--penalty and --explicit-coef must be >= 0, got {args.penalty} and {args.explicit_coef}.")


def batch_indices(step: int, batch_size: int, num_problems: int, seed: int) -> list[int]:
    """Problems of a step: a fresh seeded permutation per epoch, so the order is a function of (seed, step)."""
    positions = [divmod(i, num_problems) for i in range(step * batch_size, (step + 1) * batch_size)]  # (epoch, position)
    orders = {epoch: np.random.default_rng([seed, epoch]).permutation(num_problems) for epoch, _ in positions}
    return [int(orders[epoch][position]) for epoch, position in positions]


def main(args: Args) -> Path | None:
    check_args(args)
    rank, world_size, device = common.init_distributed(args.device)
    if rank != 0:
        common.barrier()  # rank 0 builds the toy task first, if it must
    student_path = args.resume or toy_math.resolve(args.student, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher")
    train_problems = common.load_problems(toy_math.resolve(args.dataset, "train"), "train")
    eval_problems = common.load_problems(toy_math.resolve(args.eval_dataset or args.dataset, "test"), "test")[: args.eval_limit]
    if rank == 0:
        common.barrier()
    tokenizer = common.load_tokenizer(student_path, args.trust_remote_code)
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))

    common.seed_everything(args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    # float32 master weights: in bf16, Adam steps of lr ~1e-6 round to nothing; the compute still runs in dtype
    student = common.load_model(student_path, device, torch.float32, args.trust_remote_code)
    student = common.add_lora(student, args.lora_rank, args.lora_alpha, args.lora_target_modules)  # rank 0: unchanged
    common.disable_dropout(student)  # the update's forward must score the policy that sampled
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code).eval().requires_grad_(False)
    vocab = common.vocab_size(tokenizer, student, teacher)  # ids compared by the KL: the tokenizer's, not padding rows
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable()
    student.config.use_cache = True  # generation wants the KV cache even with gradient checkpointing; scoring passes use_cache=False
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    start_step, run_dir, logger = 0, None, None
    if args.resume:
        state = common.load_trainer_state(args.resume)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the requested learning rate, not the one saved with the optimizer
            if group["lr"] != args.learning_rate and rank == 0:
                print(f"resume: learning rate {args.learning_rate} (the checkpoint ran at {group['lr']})", flush=True)
            group["lr"] = args.learning_rate
        start_step = state["step"]
    if rank == 0:
        if args.resume:
            run_dir = Path(args.resume).parent
            for name in ("metrics.jsonl", "samples.jsonl"):
                common.truncate_jsonl(run_dir / name, start_step)
            common.make_run_dir(args, run_dir, config_name=f"config_resume_{start_step}.json")
        else:
            run_dir = common.make_run_dir(args)
        logger = common.RunLogger(run_dir, args, resume_step=start_step if args.resume else None)
        print(f"run folder: {run_dir}", flush=True)

    batch_size = args.prompts_per_step * args.group_size  # B: responses per step over all ranks
    responses_per_rank = batch_size // world_size
    student_head, teacher_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight

    def run_eval(step: int) -> dict:
        """Greedy eval on the held-out problems (split across ranks; counts summed)."""
        with autocast():
            records, _ = common.evaluate(student, tokenizer, eval_problems[rank::world_size], max_new_tokens=args.max_new_tokens,
                                         batch_size=args.micro_batch_size, teacher=teacher, budget=args.budget,
                                         constraint=args.constraint, kl_chunk_size=args.kl_chunk_size, seed=args.seed)
        sums = common.all_reduce(torch.tensor([[1.0, r["correct"], r["mean_kl"], r["cost"] <= args.budget, r["response_tokens"]]
                                               for r in records], dtype=torch.float64).reshape(-1, 5).sum(0))
        record = {"step": step, **{f"eval/{k}": (v / sums[0]).item() for k, v in
                                   zip(("accuracy", "mean_kl", "csr", "mean_response_tokens"), sums[1:])}}
        if rank == 0:
            print(" | ".join([f"eval step {step}"] + [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in record.items() if k != "step"]), flush=True)
        return record

    if start_step == 0:
        if args.warmup_steps:
            common.offpolicy_kd_warmup(student, teacher, tokenizer, train_problems, steps=args.warmup_steps, prompts_per_step=args.prompts_per_step,
                                       group_size=args.group_size, micro_batch_size=args.micro_batch_size, learning_rate=args.warmup_learning_rate,
                                       max_new_tokens=args.max_new_tokens, max_grad_norm=args.max_grad_norm, kl_chunk_size=args.kl_chunk_size,
                                       seed=args.seed, autocast=autocast, rank=rank, world_size=world_size, log=logger.log if logger else None)
        record = run_eval(0)
        if logger:
            logger.log(record)
    for step in tqdm(range(start_step, args.num_steps), desc="steps", initial=start_step, total=args.num_steps, disable=rank != 0):
        step_start = time.time()
        # 1. sample G responses per prompt from the student: this rank's prompts, each group whole on one rank; every
        #    generation chunk is seeded by (seed, step, chunk), so the samples do not depend on the number of ranks
        indices = batch_indices(step, args.prompts_per_step, len(train_problems), args.seed)
        indices = indices[rank * args.prompts_per_step // world_size : (rank + 1) * args.prompts_per_step // world_size]
        problems = [train_problems[i] for i in indices for _ in range(args.group_size)]  # (b,) groups are consecutive
        prompts = [common.render_prompt(tokenizer, p["question"]) for p in problems]
        first_chunk = rank * responses_per_rank // args.micro_batch_size
        pairs = []
        with autocast():
            for j in range(0, len(prompts), args.micro_batch_size):
                torch.manual_seed(common.derive_seed(args.seed, step, first_chunk + j // args.micro_batch_size))
                pairs += common.generate(student, tokenizer, prompts[j : j + args.micro_batch_size], args.max_new_tokens,
                                         args.temperature, args.micro_batch_size)
        responses = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
        generate_seconds = time.time() - step_start

        # 2. score: task reward, and the teacher's final hidden states on the student's tokens (kept for the update,
        #    H/V of its logits' size, so the teacher runs once per step; its logits only ever exist a chunk at a time)
        rewards = torch.tensor([float(common.is_correct(r, p["answer"])) for r, p in zip(responses, problems)])  # (b,)
        micro_batches = []
        with torch.no_grad(), autocast():
            for j in range(0, len(pairs), args.micro_batch_size):
                mb = common.pad_sequences(pairs[j : j + args.micro_batch_size], tokenizer.pad_token_id, device)
                mb["teacher_hidden"] = common.final_hidden(teacher, mb)  # (n, H_T) at the n response positions
                micro_batches.append(mb)
        num_tokens = int(common.all_reduce(sum(mb["response_mask"].sum() for mb in micro_batches)).item())  # all ranks

        # ALGO LOGIC: each response's cost before the update, since it decides the response's reward
        student.eval()
        with torch.no_grad(), autocast():
            for mb in micro_batches:
                kl, logprobs, teacher_logprobs = common.response_scores(common.final_hidden(student, mb), student_head, mb["teacher_hidden"],
                                                                        teacher_head, mb, args.kl_chunk_size, vocab)
                mb["cost"] = common.sequence_costs(token_costs(kl, logprobs, teacher_logprobs, args.cost_estimator), mb["response_mask"], args.constraint)
        costs = torch.cat([mb["cost"] for mb in micro_batches]).float().cpu()  # (b,) phi(y)
        score_seconds = time.time() - step_start - generate_seconds

        # ALGO LOGIC: 3. the paper's modified reward and group-relative advantages
        violated = costs > args.budget  # (b,)
        shaped_rewards = modified_rewards(rewards, costs, args.budget, args.penalty)  # (b,) R~
        advantages = group_advantages(shaped_rewards, args.group_size, args.norm_adv_std).to(device)  # (b,)

        # 4. policy loss and update: (I) policy gradient on R~ + (II) explicit gradient of phi on violators
        student.train()
        diagnostics = {}
        for epoch in range(args.update_epochs):
            optimizer.zero_grad(set_to_none=True)
            pg_total, kl_loss_total, clipped_tokens = 0.0, 0.0, 0.0
            for j, mb in enumerate(micro_batches):
                rows = slice(j * args.micro_batch_size, (j + 1) * args.micro_batch_size)
                with autocast():
                    kl, logprobs, teacher_logprobs = common.response_scores(common.final_hidden(student, mb), student_head, mb["teacher_hidden"],
                                                                            teacher_head, mb, args.kl_chunk_size, vocab)  # (m, L-1)
                if epoch == 0:  # the policy that sampled: the PPO ratio's reference, and the logged KL
                    mb["old_logprobs"], mb["kl_mean"] = logprobs.detach(), common.masked_mean(kl.detach(), mb["response_mask"], dim=1)
                pg_loss, clipped = policy_loss(logprobs, mb["old_logprobs"], advantages[rows], mb["response_mask"], args.clip_coef, num_tokens)
                phi = common.sequence_costs(token_costs(kl, logprobs, teacher_logprobs, args.cost_estimator), mb["response_mask"], args.constraint)
                kl_loss = explicit_cost_loss(phi, violated[rows].to(device), batch_size, args.explicit_coef)
                if args.diagnostic_interval and step % args.diagnostic_interval == 0 and epoch == 0 and j == 0 and rank == 0:
                    diagnostics = common.gradient_diagnostics({"pg": pg_loss, "kl": kl_loss}, params)
                (pg_loss + kl_loss).backward()
                pg_total, kl_loss_total, clipped_tokens = pg_total + pg_loss.item(), kl_loss_total + kl_loss.item(), clipped_tokens + clipped.item()
            common.sync_gradients(student)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            optimizer.step()
        update_seconds = time.time() - step_start - generate_seconds - score_seconds

        # 5. log / eval / save (metrics over all ranks)
        step_seconds = time.time() - step_start
        lengths = torch.tensor([len(r) for _, r in pairs], dtype=torch.float)
        kl_means = torch.cat([mb["kl_mean"] for mb in micro_batches]).float().cpu()  # (b,) KLbar(y)
        rewards, shaped_rewards, costs, kl_means, lengths = (common.all_gather(x) for x in (rewards, shaped_rewards, costs, kl_means, lengths))
        losses = common.all_reduce(torch.tensor([pg_total, kl_loss_total, clipped_tokens])).tolist()
        record = {
            "step": step + 1,
            "train/reward": rewards.mean().item(),
            "train/modified_reward": shaped_rewards.mean().item(),
            "train/mean_kl": kl_means.mean().item(),
            "train/cost": costs.mean().item(),
            "train/csr": (costs <= args.budget).float().mean().item(),
            "train/mixed_groups": ((costs.view(-1, args.group_size) > args.budget).float().mean(1) % 1 > 0).float().mean().item(),
            "train/response_tokens": lengths.mean().item(),
            "train/truncated": (lengths >= args.max_new_tokens).float().mean().item(),
            "losses/policy_loss": losses[0],
            "losses/kl_loss": losses[1],
            "losses/clipfrac": losses[2] / max(num_tokens, 1),
            "losses/grad_norm": grad_norm,
            **diagnostics,
            "perf/tokens_per_s": num_tokens / step_seconds,
            "perf/generate_s": generate_seconds,
            "perf/score_s": score_seconds,
            "perf/update_s": update_seconds,
        }
        if args.eval_interval and (step + 1) % args.eval_interval == 0 or step + 1 == args.num_steps:
            record.update(run_eval(step + 1))
        if rank == 0:
            print(f"step {step + 1} | reward {record['train/reward']:.3f} | modified {record['train/modified_reward']:.3f} | "
                  f"kl {record['train/mean_kl']:.4f} | cost {record['train/cost']:.4f} | csr {record['train/csr']:.3f} | "
                  f"len {record['train/response_tokens']:.1f} | pg {losses[0]:.4f} | kl_loss {losses[1]:.4f} | gnorm {grad_norm:.3f} | "
                  f"{record['perf/tokens_per_s']:.0f} tok/s", flush=True)
            logger.log(record)
            common.append_jsonl(run_dir / "samples.jsonl", [  # the step's first group
                {"step": step + 1, "prompt": prompts[i], "response": responses[i], "gold": problems[i]["answer"], "reward": rewards[i].item(),
                 "cost": costs[i].item(), "mean_kl": kl_means[i].item(), "modified_reward": shaped_rewards[i].item()} for i in range(args.group_size)])
        if args.save_interval and (step + 1) % args.save_interval == 0 or step + 1 == args.num_steps:
            if rank == 0:
                common.save_checkpoint(run_dir / f"checkpoint-{step + 1}", student, tokenizer, {"step": step + 1, "optimizer": optimizer.state_dict()}, args)
            common.barrier()
    if logger:
        logger.close()
    common.destroy_distributed()
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))
