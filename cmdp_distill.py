"""CMDP distillation: maximise a verifiable task reward on-policy while every response's KL to a teacher stays under
a budget. Zimmer et al., arXiv 2509.22921: a Sauté-style modified reward, no Lagrange multiplier, no teacher at
deployment (docs/method.md). The teacher only scores the student's own tokens.

    c_t = KL(pi_theta(.|s_t) || pi_T(.|s_t))     exact reverse KL over the tokenizer's ids, per token (no floor)
    phi(y) = cost(y) = sum_t c_t (--constraint sum) | 1/T sum_t c_t (mean) | max_t prefix mean (prefix): sequence_costs
    R~(x, y) = R(x, y)  if phi(y) <= d,  else -(n + phi(y))                    modified reward, n = --penalty
    A_i = R~_i - mean_group(R~)                                                group-relative advantage
    loss = 1/N [ -sum_{i,t} A_i log pi_theta(y_it|s_it)                        (I)  policy gradient, R~ detached
                 + beta * sum_{i: phi(y_i) > d} phi(y_i) ]                     (II) explicit gradient of phi, violators
    N: the step's response tokens, so that at beta = 1 loss = B/N x -grad J_n over the step's B responses, at any
    length (with centred advantages, in the first epoch; a group's mean includes the response, so (I) is (G-1)/G of
    the estimate in expectation)
Choices where the paper is silent or differs (docs/method.md, the two tables), a flag or "no flag" for each:
1. phi(y) is the response's own cost (no flag). beta = --explicit-coef, 20 by default; the paper's weighting is 1:
   with the paper's --constraint sum it worked on the toy task, under the default mean form (phi divided by the
   length, ~20 tokens) it lost accuracy and left about half the responses over budget at n = 20 (docs/results.md).
2. The budget bounds the mean per-token KL (--constraint mean, the default); the paper's sum: --constraint sum.
3. The cost sums every response token's KL, undiscounted (gamma = 1; no flag); no probability floor (no flag).
4. Advantages centred per group (--norm-adv-std divides by its std); no reference-model KL term (no flag).
5. Learning rate, batch and steps from measured sweeps on the toy task (docs/results.md): --learning-rate,
   --prompts-per-step, --group-size, --num-steps.
Shapes: P prompts per step and G responses per prompt (all ranks), B = P * G responses per step, R = B / world_size
responses on this rank, M responses per micro-batch, T a micro-batch's padded length minus one, N response tokens
(of the step in the loss; of a micro-batch for hidden states), H a hidden size.

    python cmdp_distill.py --budget 0.05    # offline toy task (teacher and student built on first use)
    torchrun --nproc_per_node 8 cmdp_distill.py --student Qwen/Qwen2.5-Math-1.5B \\
        --teacher Qwen/Qwen2.5-Math-7B-Instruct --dataset gsm8k --constraint sum --budget 0.35 --max-new-tokens 1024 \\
        --micro-batch-size 8 --learning-rate 1e-6
"""

import functools
import importlib.util
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
    """student to train: hub id, local folder (e.g. a kd_warmup.py checkpoint), .gguf file, or 'toy' (built on first
    use)"""
    teacher: str = "toy"
    """frozen teacher with the student's tokenizer: hub id, local folder, .gguf file, or 'toy'"""
    dataset: str = "toy"
    """training problems: 'toy', 'gsm8k' or a .jsonl/.json file (train split; 'math500' and 'gsm_symbolic[_p1|_p2]'
    have only a test split: use them as --eval-dataset)"""
    eval_dataset: str | None = None
    """held-out problems for the periodic eval; None: the test split of --dataset"""
    output_dir: str = "runs"
    """parent folder of run folders"""
    num_steps: int = 400
    """optimizer steps (one batch of P x G responses each; 400: CMDP's accuracy flattens by step 300-400 on the toy
    task, docs/results.md#longer-runs-600-steps-at-d--005)"""
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
    """compute dtype, 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32' or 'bfloat16': the teacher's weights, the
    student's forward passes (autocast) and, with LoRA, the student's frozen base weights; trained weights (the full
    student, or the LoRA adapters) and their AdamW state stay float32"""
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
    """P: distinct prompts per step, all ranks together (each rank gets P / world_size whole groups)"""
    group_size: int = 8
    """G >= 2: responses sampled per prompt (advantages are relative to the group)"""
    micro_batch_size: int = 64
    """M: responses per forward/backward and per generation batch; must divide the responses per rank, R"""
    max_new_tokens: int = 64
    """response length cap in tokens (toy responses are ~20 tokens; 1024 for GSM8K, 2048+ for MATH)"""
    temperature: float = 1.0
    """sampling temperature for the training responses (the KL is always at temperature 1)"""
    sampler: Literal["dynamic", "static"] = "dynamic"
    """rollouts and evals: 'dynamic' (Hugging Face generate, dynamic KV cache) or 'static' (a static KV cache sized
    for the run and, on CUDA, a compiled decode step): the same tokens (docs/scaling.md)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant); the toy task's, from a measured sweep (docs/results.md); ~1e-6 for 1.5B models"""
    max_grad_norm: float = 1.0
    """gradient clipping by global L2 norm; 0 = no clipping"""
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
    and prefix, nats per response for sum); pick it from a pilot KD run (docs/results.md#choosing-the-budget)"""
    constraint: Literal["sum", "mean", "prefix"] = "mean"
    """cost of a response: 'sum' of its per-token KLs (the paper's), their 'mean', or the largest 'prefix' mean"""
    diagnostic_interval: int = 10
    """every N steps, the gradient norm of each loss term and their cosines with the update on the first micro-batch
    (losses/*_grad_norm, losses/cos_total_*): one more backward of that micro-batch, no extra memory; 0 = never"""

    # Algorithm specific arguments
    penalty: float = 20.0
    """n >= 0: a violating response's reward is -(n + phi(y)) (the paper uses 20; R is in {0, 1})"""
    explicit_coef: float = 20.0
    """beta >= 0: weight of term (II), the explicit gradient of phi on violators. 1 is the paper's weighting, the
    derivative of J_n (with --constraint sum, the paper's form); 20 (the default) about the toy task's response
    length, for the mean form, which divides phi by it (docs/results.md); 0: the policy gradient alone"""


# ALGO LOGIC: the method as pure functions; phi(y), the cost of a response, is common.sequence_costs (evaluation
# scores responses with the same function)
def modified_rewards(rewards: torch.Tensor, costs: torch.Tensor, budget: float, penalty: float) -> torch.Tensor:
    """The paper's modified reward (R,) float64: R where phi(y) = cost <= d, -(n + phi(y)) where the budget is exceeded.

    float64, so that n + phi keeps every digit of phi: two violators' rewards differ by exactly their costs' difference.
    """
    return torch.where(costs <= budget, rewards.double(), -(penalty + costs.double()))


def group_advantages(rewards: torch.Tensor, group_size: int, norm_std: bool) -> torch.Tensor:
    """A_i = R_i - mean of its group (R,) float32, optionally / (group std + 1e-6); groups are consecutive rows.

    Computed in float64: a group of equal rewards gets exactly 0 (in float32 the mean of eight CMDP violators'
    -(20 + 0.0612) lands a rounding step off, and dividing by a std of ~1e-6 turns that into 0.63 for the whole
    group), and a tiny spread keeps its true shape.
    """
    grouped = rewards.double().view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if norm_std:
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-6)
    return advantages.view(-1).float()


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef: float, num_tokens: int):
    """Token-level clipped policy-gradient loss summed over (M, T), divided by N, the step's response tokens.

    With logprobs == old_logprobs (first epoch) the ratio is 1 and the gradient is -A_i grad log pi.
    Returns (loss, number of clipped tokens).
    """
    ratio = (logprobs - old_logprobs).exp()
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    mask = mask.to(logprobs.dtype)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    return loss, ((clipped > unclipped).to(mask.dtype) * mask).sum()


def explicit_cost_loss(phi: torch.Tensor, violated: torch.Tensor, num_tokens: int, coef: float) -> torch.Tensor:
    """Term (II): beta * 1/N sum over violating responses of phi(y) (M,), differentiable, teacher detached.

    Divided by N, the step's response tokens, as the policy-gradient term (I) is: with beta = 1, the paper's
    weighting, the gradient of (I) + (II) is then B/N times -grad J_n estimated over the step's B responses,
    -1/B [sum_i A_i sum_t grad log pi(y_it) - sum_{i violating} grad phi(y_i)], at every response length. Each
    violator counts once, so the term fades as violations become rare.
    """
    return coef * (phi * violated.to(phi.dtype)).sum() / num_tokens


PRINTED = ("train/reward", "train/mean_kl", "train/cost", "train/csr", "train/response_tokens", "losses/grad_norm")


def main(args: Args) -> Path | None:
    check_args(args)
    # TRY NOT TO MODIFY: processes, data, models, optimizer, run folder
    rank, world_size, device = common.init_distributed(args.device)
    train_problems, eval_problems, tokenizer, student, teacher, autocast = load(args, rank, device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    state, run_dir, writer = start_run(args, optimizer, rank)
    log = functools.partial(common.log_metrics, writer, run_dir) if rank == 0 else None
    score = functools.partial(  # (kl, logprobs) of a micro-batch, each (M, T); differentiable under grad
        common.score,
        student,
        teacher_weight=teacher.get_output_embeddings().weight,
        chunk_size=args.kl_chunk_size,
        vocab_size=common.vocab_size(tokenizer, student, teacher),
    )
    prompt_cap = (  # the static sampler's cache length, one for the run
        common.longest_prompt_tokens(tokenizer, train_problems + eval_problems) if args.sampler == "static" else None
    )
    evaluate = functools.partial(
        evaluate_student,
        args=args,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        problems=eval_problems,
        prompt_cap=prompt_cap,
        rank=rank,
        world_size=world_size,
        autocast=autocast,
    )
    G, M = args.group_size, args.micro_batch_size

    if state["step"] == 0:  # a new run: evaluate the starting student
        record = evaluate(step=0)
        if log:
            log(record)
    start = state["step"]
    for step in tqdm(range(start, args.num_steps), initial=start, total=args.num_steps, disable=rank > 0):
        step_start = time.time()
        # 1. sample G responses to each of this rank's prompts (micro-batches of M), and grade them: the task reward
        problems, prompts, responses, micro_batches = sample_responses(
            step,
            args,
            student=student,
            tokenizer=tokenizer,
            problems=train_problems,
            prompt_cap=prompt_cap,
            rank=rank,
            world_size=world_size,
            autocast=autocast,
        )
        generate_seconds = time.time() - step_start
        rewards = torch.tensor([float(common.is_correct(r, p["answer"])) for r, p in zip(responses, problems)])  # (R,)
        num_tokens = int(common.all_reduce(sum(mb["response_mask"].sum() for mb in micro_batches)).item())  # N

        # 2. score: the teacher's final hidden states on the sampled tokens, once per step: (N, H) per micro-batch,
        # H/V of its logits' size, kept for the update (the exact KL recomputes the teacher's logits from them)
        with torch.no_grad(), autocast():
            teacher_hidden = [common.final_hidden(teacher, mb) for mb in micro_batches]
        # ALGO LOGIC: each response's cost phi(y), before the update: it decides the response's reward, hence every
        # advantage. A pass without gradients, so that no micro-batch's graph is kept waiting; the update recomputes
        # the same costs with gradients, one micro-batch at a time.
        student.eval()
        with torch.no_grad(), autocast():
            costs = [
                common.sequence_costs(score(mb, teacher_hidden=hidden)[0], mb["response_mask"], args.constraint)
                for mb, hidden in zip(micro_batches, teacher_hidden)
            ]
        costs = torch.cat(costs).float().cpu()  # (R,) phi(y)
        score_seconds = time.time() - step_start - generate_seconds

        # ALGO LOGIC: 3. the paper's modified reward and group-relative advantages
        violated = costs > args.budget  # (R,)
        shaped_rewards = modified_rewards(rewards, costs, args.budget, args.penalty)  # (R,) R~
        advantages = group_advantages(shaped_rewards, G, args.norm_adv_std).to(device)  # (R,)

        # ALGO LOGIC: 4. policy loss and update: (I) policy gradient on R~ + (II) explicit gradient of phi on violators
        student.train()
        diagnostics, old_logprobs, mean_kls = {}, [], []  # per micro-batch, as sampled: log pi, KLbar
        for epoch in range(args.update_epochs):
            optimizer.zero_grad(set_to_none=True)
            totals = torch.zeros(3, dtype=torch.float64)  # term (I), term (II), clipped tokens
            for j, (mb, hidden) in enumerate(zip(micro_batches, teacher_hidden)):
                rows, mask = slice(j * M, (j + 1) * M), mb["response_mask"]  # the micro-batch's responses among R
                with autocast():
                    kl, logprobs = score(mb, teacher_hidden=hidden)  # (M, T) each, now with gradients
                if epoch == 0:  # the policy that sampled: the PPO ratio's reference, and the logged KL
                    old_logprobs.append(logprobs.detach())
                    mean_kls.append(common.masked_mean(kl.detach(), mask, dim=1))  # (M,)
                pg_loss, clipped = policy_loss(
                    logprobs, old_logprobs[j], advantages[rows], mask, args.clip_coef, num_tokens
                )
                phi = common.sequence_costs(kl, mask, args.constraint)  # (M,) differentiable
                cost_loss = explicit_cost_loss(phi, violated[rows].to(device), num_tokens, args.explicit_coef)
                if epoch == j == rank == 0 and args.diagnostic_interval and step % args.diagnostic_interval == 0:
                    # each term's gradient norm, and the backward of their sum (no gradient copy)
                    diagnostics = common.backward_with_diagnostics({"pg": pg_loss, "kl": cost_loss}, params)
                else:
                    (pg_loss + cost_loss).backward()
                totals += torch.tensor([pg_loss.item(), cost_loss.item(), clipped.item()], dtype=torch.float64)
            common.sync_gradients(student)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
            optimizer.step()

        # 5. log / eval / save: metrics over the whole batch, all ranks
        step_seconds = time.time() - step_start
        lengths = torch.cat([mb["response_mask"].sum(1) for mb in micro_batches]).float().cpu()  # (R,)
        mean_kls = torch.cat(mean_kls).float().cpu()  # (R,) KLbar(y)
        per_rank = dict(reward=rewards, shaped_reward=shaped_rewards, cost=costs, mean_kl=mean_kls, length=lengths)
        whole = {name: common.all_gather(values) for name, values in per_rank.items()}  # (B,) each
        pg_total, cost_total, clipped_tokens = common.all_reduce(totals).tolist()
        violating_share = (whole["cost"].view(-1, G) > args.budget).float().mean(1)  # (P,) of each group's responses
        record = {
            "step": step + 1,
            "train/reward": whole["reward"].mean().item(),
            "train/shaped_reward": whole["shaped_reward"].mean().item(),
            "train/mean_kl": whole["mean_kl"].mean().item(),
            "train/cost": whole["cost"].mean().item(),
            "train/csr": (whole["cost"] <= args.budget).float().mean().item(),
            "train/mixed_groups": ((violating_share > 0) & (violating_share < 1)).float().mean().item(),
            "train/response_tokens": whole["length"].mean().item(),
            "train/truncated": (whole["length"] >= args.max_new_tokens).float().mean().item(),
            "losses/policy_loss": pg_total,
            "losses/explicit_cost_loss": cost_total,
            "losses/clipfrac": clipped_tokens / max(num_tokens, 1),
            "losses/grad_norm": grad_norm,
            **diagnostics,
            "perf/tokens_per_s": num_tokens / step_seconds,
            "perf/generate_s": generate_seconds,
            "perf/score_s": score_seconds,
            "perf/update_s": step_seconds - generate_seconds - score_seconds,
        }
        if step + 1 == args.num_steps or (args.eval_interval > 0 and (step + 1) % args.eval_interval == 0):
            record.update(evaluate(step=step + 1))
        if rank == 0:
            print(f"step {step + 1} | " + " | ".join(f"{k} {record[k]:.4g}" for k in PRINTED), flush=True)
            log(record)
            columns = dict(prompt=prompts, response=responses, gold=[p["answer"] for p in problems], **per_rank)
            first_group = [{"step": step + 1, **{k: v[i] for k, v in columns.items()}} for i in range(G)]
            common.append_jsonl(run_dir / "samples.jsonl", first_group)
        if step + 1 == args.num_steps or (args.save_interval > 0 and (step + 1) % args.save_interval == 0):
            if rank == 0:
                trainer_state = {"step": step + 1, "optimizer": optimizer.state_dict()}
                common.save_checkpoint(run_dir / f"checkpoint-{step + 1}", student, tokenizer, trainer_state, args)
            common.barrier()
    if rank == 0:
        common.close_writer(writer)
    common.destroy_distributed()
    return run_dir


# TRY NOT TO MODIFY: argument checks, data order, sampling, evaluation, loading, run folder
def check_args(args: Args) -> None:
    """Reject bad values with one sentence each (common.InputError), before anything loads."""
    common.check_finite(args)
    common.check_seed(args.seed)
    common.check_device(args.device)
    common.check_output_dir(args.output_dir)
    world_size, Error = int(os.environ.get("WORLD_SIZE", "1")), common.InputError
    if args.budget <= 0:
        raise Error(f"--budget must be > 0 (nats per token, or per response with --constraint sum), got {args.budget}")
    if args.group_size < 2:
        raise Error(f"--group-size must be >= 2 (advantages are relative to the group), got {args.group_size}")
    positive = ("num_steps", "prompts_per_step", "micro_batch_size", "max_new_tokens", "update_epochs", "kl_chunk_size")
    for name in (*positive, "eval_limit", "learning_rate", "temperature"):
        if getattr(args, name) <= 0:
            raise Error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("diagnostic_interval", "eval_interval", "save_interval", "max_grad_norm", "clip_coef"):
        if getattr(args, name) < 0:
            raise Error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.prompts_per_step % world_size:
        raise Error(
            f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of processes "
            f"({world_size}), so that each group stays on one rank"
        )
    if (args.prompts_per_step // world_size * args.group_size) % args.micro_batch_size:
        raise Error(
            f"--micro-batch-size {args.micro_batch_size} must divide the responses per process, --prompts-per-"
            f"step x --group-size / processes = {args.prompts_per_step // world_size * args.group_size}"
        )
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise Error(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise Error("--track logs to Weights & Biases, which is not installed: pip install wandb==0.31.0")
    if args.resume:
        common.check_resume(args, same=("seed", "prompts_per_step", "group_size", "dataset"))  # the data order
    for flag, value in (("--student", args.student), ("--teacher", args.teacher)):
        if value != "toy":
            common.check_model_path(value, flag)
    if (args.student == "toy") != (args.teacher == "toy"):
        raise Error(
            f"--student {args.student} and --teacher {args.teacher}: the toy models only fit each other "
            "(their tokenizer is the toy's); pass both or neither"
        )
    common.check_dataset(args.dataset, "train")
    common.check_dataset(args.eval_dataset or args.dataset, "test")
    common.check_lora_args(args.lora_rank, args.lora_alpha, args.lora_target_modules, args.student)
    # ALGO LOGIC: the method's own flags
    if args.penalty < 0 or args.explicit_coef < 0:
        raise Error(f"--penalty and --explicit-coef must be >= 0, got {args.penalty} and {args.explicit_coef}")


def batch_indices(step: int, batch_size: int, num_problems: int, seed: int) -> list[int]:
    """Problems of a step: a fresh seeded permutation per epoch, so the order is a function of (seed, step)."""
    positions = [divmod(i, num_problems) for i in range(step * batch_size, (step + 1) * batch_size)]  # (epoch, index)
    orders = {epoch: np.random.default_rng([seed, epoch]).permutation(num_problems) for epoch, _ in positions}
    return [int(orders[epoch][position]) for epoch, position in positions]


@torch.no_grad()
def sample_responses(
    step: int, args: Args, *, student, tokenizer, problems, prompt_cap, rank: int, world_size: int, autocast
):
    """Step 1 on this rank: G responses sampled from the student for each of its P / world_size prompts (a group
    stays whole on one rank; each generation chunk of M is seeded by (seed, step, chunk), so the samples do not
    depend on the number of ranks). Returns (problems (R,), prompts (R,), responses (R,) decoded, micro-batches of M
    (common.pad_sequences: input_ids, attention_mask, position_ids, response_mask))."""
    M, per_rank = args.micro_batch_size, args.prompts_per_step // world_size
    indices = batch_indices(step, args.prompts_per_step, len(problems), args.seed)
    chosen = [problems[i] for i in indices[rank * per_rank : (rank + 1) * per_rank] for _ in range(args.group_size)]
    prompts = [common.render_prompt(tokenizer, p["question"]) for p in chosen]  # groups are consecutive
    pairs, first_chunk = [], rank * len(prompts) // M
    with autocast():
        for j in range(0, len(prompts), M):
            torch.manual_seed(common.derive_seed(args.seed, step, first_chunk + j // M))
            pairs += common.generate(
                student,
                tokenizer,
                prompts[j : j + M],
                args.max_new_tokens,
                args.temperature,
                M,
                sampler=args.sampler,
                max_prompt_tokens=prompt_cap,
            )
    responses = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
    micro_batches = [
        common.pad_sequences(pairs[j : j + M], tokenizer.pad_token_id, student.device) for j in range(0, len(pairs), M)
    ]
    return chosen, prompts, responses, micro_batches


def evaluate_student(
    step: int, *, args: Args, student, teacher, tokenizer, problems, prompt_cap, rank: int, world_size: int, autocast
) -> dict:
    """Greedy eval on the held-out problems, split across ranks (counts summed): {"step", "eval/..."}."""
    with autocast():
        records, _ = common.evaluate(
            student,
            tokenizer,
            problems[rank::world_size],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.micro_batch_size,
            teacher=teacher,
            budget=args.budget,
            constraint=args.constraint,
            kl_chunk_size=args.kl_chunk_size,
            seed=args.seed,
            sampler=args.sampler,
            max_prompt_tokens=prompt_cap,
        )
    rows = [[1.0, r["correct"], r["mean_kl"], r["cost"] <= args.budget, r["response_tokens"]] for r in records]
    sums = common.all_reduce(torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).sum(0))
    names = ("accuracy", "mean_kl", "csr", "mean_response_tokens")
    record = {"step": step, **{f"eval/{name}": (value / sums[0]).item() for name, value in zip(names, sums[1:])}}
    if rank == 0:
        print(" | ".join([f"eval step {step}"] + [f"{k[5:]} {v:.4f}" for k, v in list(record.items())[1:]]), flush=True)
    return record


def load(args: Args, rank: int, device: torch.device):
    """Problems, tokenizer and models: the student with dropout off, the teacher frozen in --dtype; and the autocast
    context in which both compute."""
    if rank != 0:
        common.barrier()  # rank 0 builds the toy task first, if it must
    student_path = args.resume or toy_math.resolve(args.student, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher")
    train_problems = common.load_problems(toy_math.resolve(args.dataset, "train"), "train")
    eval_problems = common.load_problems(toy_math.resolve(args.eval_dataset or args.dataset, "test"), "test")
    if rank == 0:
        common.barrier()
    tokenizer = common.load_tokenizer(student_path, args.trust_remote_code)
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))
    common.seed_everything(args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    # Trained weights in float32 (in bf16, AdamW steps of lr ~1e-6 round to nothing), computing in dtype under
    # autocast. With LoRA the frozen base is held in dtype: half its memory, and no cast at every decode step
    # (autocast keeps its cast copies of weights that require grad only); add_lora makes the adapters float32.
    student_dtype = dtype if args.lora_rank else torch.float32
    student = common.load_model(student_path, device, student_dtype, args.trust_remote_code)
    student = common.add_lora(student, args.lora_rank, args.lora_alpha, args.lora_target_modules)  # rank 0: unchanged
    common.disable_dropout(student)  # the update's forward must score the policy that sampled
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable()
    student.config.use_cache = True  # generation wants the KV cache even with gradient checkpointing
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code).eval().requires_grad_(False)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    return train_problems, eval_problems[: args.eval_limit], tokenizer, student, teacher, autocast


def start_run(args: Args, optimizer, rank: int):
    """(trainer state, run folder, TensorBoard writer) of a new run or a resumed one. A resume reloads the optimizer (at
    the requested learning rate), drops the records logged after its checkpoint and writes config_resume_{step}.json
    into the run's folder. Ranks other than 0 get no folder and no writer."""
    state = common.load_trainer_state(args.resume) if args.resume else {"step": 0}
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the requested learning rate, not the one saved with the optimizer
            if group["lr"] != args.learning_rate and rank == 0:
                print(f"resume: learning rate {args.learning_rate} (the checkpoint ran at {group['lr']})", flush=True)
            group["lr"] = args.learning_rate
    if rank != 0:
        return state, None, None
    if args.resume:
        run_dir = Path(args.resume).parent
        for name in ("metrics.jsonl", "samples.jsonl"):
            common.truncate_jsonl(run_dir / name, state["step"])
        common.make_run_dir(args, run_dir, config_name=f"config_resume_{state['step']}.json")
    else:
        run_dir = common.make_run_dir(args)
    print(f"run folder: {run_dir}", flush=True)
    return state, run_dir, common.make_writer(run_dir, args, purge_step=state["step"] if args.resume else None)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (common.InputError, OSError) as e:  # bad input, or a model or dataset that cannot load: one sentence
        raise SystemExit(common.one_sentence(e)) from None
