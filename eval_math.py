"""Math evaluation: greedy final-answer accuracy, and with a teacher the per-token KL and constraint satisfaction.

For each problem the model answers the rendered prompt (chat template with a step-by-step,
\\boxed{} system prompt, or a plain "Question: ...\\nAnswer:" template), the one grader
(`common.is_correct`, also the training reward) checks the final answer, and with `--teacher` every
response is scored by the teacher: KLbar(y) = mean over response tokens of the exact reverse
KL(student || teacher), and CSR = fraction of responses with KLbar(y) <= --budget.
The training scripts' periodic eval calls the same `common.evaluate`.

    python eval_math.py                                              # toy student on the toy test split
    python eval_math.py --model toy --teacher toy --budget 0.05      # ... with KL and CSR to the toy teacher
    python eval_math.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --dataset gsm8k --max-new-tokens 1024 \\
        --teacher Qwen/Qwen2.5-Math-7B-Instruct                      # bf16 on CUDA
"""

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

import common
import toy_math


@dataclass
class Args:
    """Evaluate a model's final-answer accuracy on a math dataset (and its KL to a teacher)."""

    model: str = "toy"
    """model to evaluate: a hub id, a local folder, a .gguf file, or 'toy' (the toy student)"""
    dataset: str = "toy"
    """'toy', 'gsm8k' (openai/gsm8k), 'math500' (HuggingFaceH4/MATH-500) or a .jsonl/.json file"""
    split: str = "test"
    """split of a named dataset (ignored for files)"""
    limit: int | None = None
    """evaluate the first N problems only; None: all"""
    batch_size: int = 64
    """prompts per generation batch"""
    max_new_tokens: int = 512
    """response length cap in tokens (toy responses are ~25 tokens; use 1024+ for MATH)"""
    temperature: float = 0.0
    """sampling temperature; 0 = greedy"""
    teacher: str | None = None
    """teacher for KL and CSR (same tokenizer as the model); None: accuracy only"""
    budget: float = 0.05
    """KL budget d in nats per token: a response satisfies the constraint iff its mean per-token KL <= d"""
    output_dir: str | None = None
    """where results.jsonl and summary.json go; None: runs/eval/{model}__{dataset}__{unix_time}"""
    seed: int = 1
    """seed for sampling (temperature > 0)"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'"""
    kl_chunk_size: int = 1024
    """positions per chunk in the exact KL (bounds the memory of the vocabulary-wide softmax)"""
    trust_remote_code: bool = False
    """allow models whose code lives in their hub repository (runs that code)"""


def check_args(args: Args) -> None:
    """Reject bad values with one sentence each, before anything loads."""
    if args.limit is not None and args.limit <= 0:
        raise SystemExit(f"--limit must be a positive number of problems or omitted, got {args.limit}.")
    for name in ("batch_size", "max_new_tokens", "kl_chunk_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.budget <= 0:
        raise SystemExit(f"--budget must be > 0 nats per token, got {args.budget}.")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}.")
    for flag, value in (("--model", args.model), ("--teacher", args.teacher)):
        if value not in (None, "toy"):
            common.check_model_path(value, flag)
    common.check_dataset(args.dataset)


def tag(name: str) -> str:
    return Path(name.rstrip("/")).name.removesuffix(".gguf").removesuffix(".jsonl").removesuffix(".json") or "model"


def main(args: Args) -> dict:
    check_args(args)
    model_path = toy_math.resolve(args.model, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher") if args.teacher else None
    dataset = toy_math.resolve(args.dataset, args.split if args.split in ("train", "test") else "test")
    problems = common.load_problems(dataset, args.split)[: args.limit]
    tokenizer = common.load_tokenizer(model_path, args.trust_remote_code)
    if teacher_path:
        common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    model = common.load_model(model_path, device, dtype, args.trust_remote_code)
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code) if teacher_path else None
    start = time.time()
    records, summary = common.evaluate(
        model, tokenizer, problems, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, teacher=teacher, budget=args.budget, kl_chunk_size=args.kl_chunk_size,
        seed=args.seed, progress=True,
    )
    summary.update(model=args.model, teacher=args.teacher, dataset=args.dataset, split=args.split,
                   seconds=round(time.time() - start, 1), device=str(device), dtype=str(dtype).removeprefix("torch."))

    out = Path(args.output_dir or f"runs/eval/{tag(args.model)}__{tag(args.dataset)}__{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    common.append_jsonl(out / "results.jsonl", records)
    common.write_json(out / "summary.json", summary)
    print(f"\n| {'metric':<20} | {'value':>12} |\n|{'-' * 22}|{'-' * 14}|")
    for key in ("n", "accuracy", "mean_kl", "max_kl", "csr", "budget", "mean_response_tokens", "seconds"):
        if summary.get(key) is not None:
            value = summary[key]
            print(f"| {key:<20} | {value:>12.4f} |" if isinstance(value, float) else f"| {key:<20} | {value:>12} |")
    print(f"\nwrote {out / 'results.jsonl'} and {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
