"""Off-policy KD warm-up: supervised training of a student on its teacher's own samples, before the on-policy RL of
cmdp_distill.py or lagrangian_distill.py. For base students that start near zero reward, whose samples carry no
reward signal yet (the paper warms Llama-3.2-3B up this way for 3 epochs; docs/method.md).

    y ~ pi_T(.|x) at --temperature (1: the teacher's own distribution)          fresh teacher samples each step
    loss = -1/N sum_{i,t} log pi_theta(y_it|s_it)                               cross-entropy on the teacher's tokens
N: the step's response tokens. At --temperature 1, in expectation over the teacher's samples, each response's summed
term is the sequence-level forward KL(pi_T || pi_theta) plus the teacher's entropy (the 1/N weighting keeps this only
approximately per token), so it pulls the student towards the teacher where the teacher puts its mass.
Choices (ours: the paper gives the warm-up's length only), a flag or "no flag" for each: samples drawn fresh every
step, not a fixed dataset (no flag); --temperature 1; its own AdamW (--learning-rate), so the RL run starts with
fresh moments.
Writes {output_dir}/{exp_name}__{seed}__{unix_time}/checkpoint-{step}/ (save_pretrained): pass it to either training
script as --student. Full fine-tuning only (an RL run with --lora-rank puts its adapters on the warmed-up weights).
Shapes: P prompts per step and G teacher samples per prompt (all ranks), M responses per micro-batch, N response
tokens, H a hidden size.

    python kd_warmup.py --num-steps 50    # offline toy task; then cmdp_distill.py --student runs/<run>/checkpoint-50
    torchrun --nproc_per_node 8 kd_warmup.py --student meta-llama/Llama-3.2-3B \\
        --teacher meta-llama/Llama-3.2-11B-Vision-Instruct --dataset math_train.jsonl --dtype bfloat16 \\
        --prompts-per-step 64 --group-size 1 --micro-batch-size 8 --max-new-tokens 1024 --num-steps 350  # ~3 epochs
"""

import functools
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
    """Off-policy KD warm-up: train a student on its teacher's samples (cross-entropy), for the RL scripts."""

    exp_name: str = os.path.basename(__file__).removesuffix(".py")
    """name of the experiment (the run folder is {output_dir}/{exp_name}__{seed}__{unix_time})"""
    seed: int = 1
    """seed of the prompts drawn, of the teacher's sampling (derived per step and chunk) and of torch/numpy/random"""
    student: str = "toy"
    """student to warm up: hub id, local folder, .gguf file, or 'toy' (built on first use)"""
    teacher: str = "toy"
    """teacher whose samples the student learns, with the student's tokenizer: hub id, local folder, .gguf, or 'toy'"""
    dataset: str = "toy"
    """training problems whose prompts the teacher answers: 'toy', 'gsm8k' or a .jsonl/.json file (train split)"""
    output_dir: str = "runs"
    """parent folder of run folders"""
    num_steps: int = 50
    """optimizer steps (P x G teacher samples each)"""
    save_interval: int = 0
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    resume: str | None = None
    """checkpoint folder of this script to resume from (weights, optimizer, step)"""
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
    prompts_per_step: int = 16
    """P: distinct prompts per step, all ranks together (each rank gets P / world_size)"""
    group_size: int = 2
    """G >= 1: teacher samples per prompt"""
    micro_batch_size: int = 32
    """M: responses per forward/backward and per generation batch; must divide the responses per rank"""
    max_new_tokens: int = 64
    """length cap of the teacher's responses in tokens (toy ~20; 1024 for GSM8K)"""
    temperature: float = 1.0
    """the teacher's sampling temperature (1: its own distribution; 0: greedy)"""
    sampler: Literal["dynamic", "static"] = "dynamic"
    """'dynamic' (Hugging Face generate, dynamic KV cache) or 'static' (a static KV cache sized for the run and, on
    CUDA, a compiled decode step): the same tokens (docs/scaling.md)"""
    learning_rate: float = 1e-5
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global L2 norm; 0 = no clipping"""
    kl_chunk_size: int = 1024
    """positions per chunk of the vocabulary-wide log-softmax (bounds its memory)"""


# ALGO LOGIC: the warm-up's loss
def cross_entropy_loss(logprobs: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """-1/N sum of log pi_theta over the micro-batch's teacher tokens, logprobs (N_mb,), N the step's tokens."""
    return -logprobs.sum() / num_tokens


def main(args: Args) -> Path | None:
    check_args(args)
    # TRY NOT TO MODIFY: processes, data, models, optimizer, run folder
    rank, world_size, device = common.init_distributed(args.device)
    problems, tokenizer, student, teacher, autocast = load(args, rank, device)
    vocab_size = common.vocab_size(tokenizer, student, teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=0.0)
    state = common.load_trainer_state(args.resume) if args.resume else {"step": 0}
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
    run_dir, writer = None, None
    if rank == 0:
        run_dir = Path(args.resume).parent if args.resume else common.make_run_dir(args)
        if args.resume:
            common.truncate_jsonl(run_dir / "metrics.jsonl", state["step"])
            common.make_run_dir(args, run_dir, config_name=f"config_resume_{state['step']}.json")
        print(f"run folder: {run_dir}", flush=True)
        writer = common.make_writer(run_dir, args, purge_step=state["step"] if args.resume else None)
    M = args.micro_batch_size
    prompt_cap = common.longest_prompt_tokens(tokenizer, problems) if args.sampler == "static" else None  # its cache

    for step in tqdm(
        range(state["step"], args.num_steps), initial=state["step"], total=args.num_steps, disable=rank > 0
    ):
        step_start = time.time()
        # 1. the teacher's responses to this rank's prompts
        pairs = sample_teacher_responses(
            step,
            args,
            teacher=teacher,
            tokenizer=tokenizer,
            problems=problems,
            prompt_cap=prompt_cap,
            rank=rank,
            world_size=world_size,
            autocast=autocast,
        )
        generate_seconds = time.time() - step_start
        num_tokens = int(common.all_reduce(torch.tensor(sum(len(r) for _, r in pairs))).item())  # the step's N

        # ALGO LOGIC: 2. cross-entropy of the student on the teacher's tokens, and the update
        student.train()
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for j in range(0, len(pairs), M):
            mb = common.pad_sequences(pairs[j : j + M], tokenizer.pad_token_id, device)
            tokens = mb["input_ids"][:, 1:][mb["response_mask"].bool()]  # (N_mb,) the teacher's tokens
            with autocast():
                hidden = common.final_hidden(student, mb)  # (N_mb, H)
                logprobs = common.token_logprobs_from_hidden(
                    hidden, student.get_output_embeddings().weight, tokens, args.kl_chunk_size, vocab_size
                )  # (N_mb,)
            loss = cross_entropy_loss(logprobs, max(num_tokens, 1))
            loss.backward()
            total += loss.item()
        common.sync_gradients(student)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm or float("inf")).item()
        optimizer.step()

        # 3. log / save
        record = {
            "step": step + 1,
            "train/loss": common.all_reduce(total).item(),
            "train/response_tokens": num_tokens / (args.prompts_per_step * args.group_size),
            "losses/grad_norm": grad_norm,
            "perf/generate_s": generate_seconds,
            "perf/update_s": time.time() - step_start - generate_seconds,
        }
        if rank == 0:
            print(f"step {step + 1} | loss {record['train/loss']:.4g} | grad_norm {grad_norm:.4g}", flush=True)
            common.log_metrics(writer, run_dir, record)
        if step + 1 == args.num_steps or (args.save_interval > 0 and (step + 1) % args.save_interval == 0):
            if rank == 0:
                trainer_state = {"step": step + 1, "optimizer": optimizer.state_dict()}
                common.save_checkpoint(run_dir / f"checkpoint-{step + 1}", student, tokenizer, trainer_state, args)
            common.barrier()
    if rank == 0:
        common.close_writer(writer)
        print(f"warmed-up student: {run_dir / f'checkpoint-{args.num_steps}'} (pass it as --student)", flush=True)
    common.destroy_distributed()
    return run_dir


# TRY NOT TO MODIFY: argument checks, sampling, loading
def check_args(args: Args) -> None:
    """Reject bad values with one sentence each (common.InputError), before anything loads."""
    common.check_finite(args)
    common.check_seed(args.seed)
    common.check_device(args.device)
    common.check_output_dir(args.output_dir)
    world_size, Error = int(os.environ.get("WORLD_SIZE", "1")), common.InputError
    for name in ("num_steps", "prompts_per_step", "group_size", "micro_batch_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise Error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("learning_rate", "kl_chunk_size"):
        if getattr(args, name) <= 0:
            raise Error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("save_interval", "max_grad_norm", "temperature"):
        if getattr(args, name) < 0:
            raise Error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.prompts_per_step % world_size:
        raise Error(
            f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of processes ({world_size})"
        )
    if (args.prompts_per_step // world_size * args.group_size) % args.micro_batch_size:
        raise Error(
            f"--micro-batch-size {args.micro_batch_size} must divide the responses per process, --prompts-per-"
            f"step x --group-size / processes = {args.prompts_per_step // world_size * args.group_size}"
        )
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise Error(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
    if args.resume:
        common.check_resume(args, same=("seed", "prompts_per_step", "group_size", "dataset"))
    for flag, value in (("--student", args.student), ("--teacher", args.teacher)):
        if value != "toy":
            common.check_model_path(value, flag)
    if (args.student == "toy") != (args.teacher == "toy"):
        raise Error(
            f"--student {args.student} and --teacher {args.teacher}: the toy models only fit each other "
            "(their tokenizer is the toy's); pass both or neither"
        )
    common.check_dataset(args.dataset, "train")


@torch.no_grad()
def sample_teacher_responses(
    step: int, args: Args, *, teacher, tokenizer, problems, prompt_cap, rank, world_size, autocast
):
    """Step 1 on this rank: G teacher samples for each of its P / world_size prompts, drawn with replacement from the
    problems by (seed, step) and sampled per chunk of M with a seed of (seed, step, chunk), so that the batch does not
    depend on the number of ranks. Returns [(prompt_ids, response_ids)] (P / world_size * G,)."""
    M, per_rank = args.micro_batch_size, args.prompts_per_step // world_size
    chosen = np.random.default_rng([args.seed, step]).choice(len(problems), args.prompts_per_step)
    chosen = chosen[rank * per_rank : (rank + 1) * per_rank]
    prompts = [common.render_prompt(tokenizer, problems[i]["question"]) for i in chosen for _ in range(args.group_size)]
    pairs, first_chunk = [], rank * len(prompts) // M
    with autocast():
        for j in range(0, len(prompts), M):
            torch.manual_seed(common.derive_seed(args.seed, step, first_chunk + j // M))
            pairs += common.generate(
                teacher,
                tokenizer,
                prompts[j : j + M],
                args.max_new_tokens,
                args.temperature,
                M,
                sampler=args.sampler,
                max_prompt_tokens=prompt_cap,
            )
    return pairs


def load(args: Args, rank: int, device: torch.device):
    """Problems, tokenizer, the student (float32 weights, dropout off) and the frozen teacher in --dtype, and the
    autocast context in which both compute."""
    if rank != 0:
        common.barrier()  # rank 0 builds the toy task first, if it must
    student_path = args.resume or toy_math.resolve(args.student, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher")
    problems = common.load_problems(toy_math.resolve(args.dataset, "train"), "train")
    if rank == 0:
        common.barrier()
    tokenizer = common.load_tokenizer(student_path, args.trust_remote_code)
    common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))
    common.seed_everything(args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    student = common.load_model(student_path, device, torch.float32, args.trust_remote_code)
    common.disable_dropout(student)
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable()
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code).eval().requires_grad_(False)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    return problems, tokenizer, student, teacher, autocast


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (common.InputError, OSError) as e:  # bad input, or a model or dataset that cannot load: one sentence
        raise SystemExit(common.one_sentence(e)) from None
