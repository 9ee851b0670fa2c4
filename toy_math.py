"""The offline toy task: arithmetic word problems on which reward and teacher pull apart,
with a tiny teacher and student.

The default runs of `cmdp_distill.py`, `lagrangian_distill.py` and `eval_math.py` use it (the way CartPole serves
CleanRL). It generates GSM8K-format problems ("... #### 28"), builds a word/digit tokenizer in-process, and trains
two Llama-architecture models by supervised fine-tuning, each on its own corpus of worked solutions:

- the teacher's corpus opens every step after the first with "So", "Then" or "Now" at random (high entropy), and
  misreads "sells" as an addition in 65% of its solutions (a systematic weakness: its greedy answer is wrong there);
- the student's corpus has the same misreading but nearly always says "So" (a different style: most of its
  multi-step responses start out over a per-token KL budget of 0.05 nats to the teacher).

So pure distillation fixes the style and keeps the misreading, while the task reward fixes the misreading, which
moves the student away from the teacher there: the trade-off the paper's constrained method has to manage.
Everything is saved with `save_pretrained` and loads through the same code as real models. docs/toy_task.md
has the measured figures.

    python toy_math.py                  # build (once, a few minutes on 2 CPU cores) and report
    python toy_math.py --force          # rebuild

The pair is cached in $CMDP_DISTILL_CACHE (default ~/.cache/cmdp_distill/toy-v2-seed{seed}); `--dataset toy`,
`--teacher toy`, `--student toy` (the scripts' defaults) resolve to it and build it on first use.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

import common

VERSION = "toy-v2"
NAMES = [
    ("Mia", "she"),
    ("Liam", "he"),
    ("Ava", "she"),
    ("Noah", "he"),
    ("Emma", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Ivy", "she"),
    ("Sam", "he"),
    ("Nina", "she"),
    ("Tom", "he"),
]
OBJECTS = ["marbles", "apples", "stickers", "coins", "books", "cookies", "pencils", "cards", "shells", "stamps"]
START = "{Name} has {a} {obj}."
OPS = {
    "+": ["{P} finds {b} more.", "{P} buys {b} more.", "{P} gets {b} more."],
    "-": ["{P} gives {b} away.", "{P} loses {b}.", "{P} sells {b}."],
    "*": ["{P} then has {b} times as many."],
}
MISREAD = "{P} sells {b}."  # the sentence the teacher (and the student) misread as an addition
QUESTION = "How many {obj} does {p} have now?"
CONNECTIVES = ("So", "Then", "Now", "Next")  # opens every solution step after the first
# Word pieces, single digits (so numbers are spelled out digit by digit), "####" and punctuation,
# each optionally carrying the space before it; decoding concatenates the pieces exactly.
TOKEN_PATTERN = r" ?####| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_problem(rng: random.Random) -> dict:
    """One problem: {question, answer (the correct value), steps [(op, b, misreadable)], start}."""
    name, pronoun = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    fill = dict(Name=name, P=pronoun.capitalize(), p=pronoun, obj=obj)
    total = start = rng.randint(2, 20)
    sentences, steps = [START.format(a=total, **fill)], []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["+"] + ["-"] * (total > 1) + ["*"] * (total <= 12))
        b = rng.randint(2, 3) if op == "*" else rng.randint(1, min(9, total) if op == "-" else 9)
        template = rng.choices(OPS[op], [1 if t != MISREAD else 0.5 for t in OPS[op]])[
            0
        ]  # "sells": 1 in 5 subtractions
        sentences.append(template.format(b=b, **fill))
        steps.append((op, b, template == MISREAD))
        total = {"+": total + b, "-": total - b, "*": total * b}[op]
    sentences.append(QUESTION.format(**fill))
    return dict(question=" ".join(sentences), answer=str(total), start=start, steps=steps)


def write_solution(problem: dict, rng: random.Random, connective_probs: tuple[float, ...], misread_rate: float) -> str:
    """A worked solution in GSM8K format ("... #### N") in a given style: step connectives drawn from
    connective_probs, and each "sells" step written as an addition with probability misread_rate."""
    total, parts = problem["start"], []
    for k, (op, b, misreadable) in enumerate(problem["steps"]):
        if misreadable and rng.random() < misread_rate:
            op = "+"
        new = {"+": total + b, "-": total - b, "*": total * b}[op]
        connective = "" if k == 0 else rng.choices(CONNECTIVES, connective_probs)[0] + " "
        parts.append(f"{connective}{total} {op} {b} = {new}.")
        total = new
    return " ".join(parts) + f" #### {total}"


def make_splits(seed: int, num_train: int, num_test: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test splits (no question appears in both, nor twice in one)."""
    rng = random.Random(seed)
    seen, splits = set(), []
    for size in (num_test, num_train):
        split = []
        while len(split) < size:
            problem = make_problem(rng)
            if problem["question"] not in seen:
                seen.add(problem["question"])
                split.append(problem)
        splits.append(split)
    test, train = splits
    return train, test


def build_tokenizer():
    """A word/digit tokenizer over every string the generator can produce, made in-process."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [START, QUESTION, "Question: ?\nAnswer: . #### 0123456789 + - * = " + " ".join(CONNECTIVES)]
    texts += [t for templates in OPS.values() for t in templates]
    fills = [dict(Name=n, P=p.capitalize(), p=p, obj=o, a=0, b=0) for n, p in NAMES for o in OBJECTS]
    pieces = {piece for text in texts for fill in fills for piece in re.findall(TOKEN_PATTERN, text.format(**fill))}
    pieces = {f"{space}{piece.strip()}" for piece in pieces if piece != "\n" for space in ("", " ")} | {"\n"}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(pieces))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(tokenizer, num_layers: int, width: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, width // 32),
        num_key_value_heads=max(1, width // 32),
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sft(
    model,
    tokenizer,
    questions: list[str],
    solutions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
) -> float:
    """Supervised fine-tuning on worked solutions (loss on solution tokens only); returns the last loss (EMA)."""
    from tqdm.auto import tqdm

    prompts = tokenizer([common.render_prompt(tokenizer, q) for q in questions], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + s for s in solutions], add_special_tokens=False)["input_ids"]
    examples = [(prompt, answer + [tokenizer.eos_token_id]) for prompt, answer in zip(prompts, answers)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 0: the models end converged
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    order = np.random.default_rng(seed).permutation(len(examples))
    model.train()
    ema = None
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, mininterval=5)):
        batch = [examples[order[(step * batch_size + j) % len(examples)]] for j in range(batch_size)]
        length = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        for i, (p, a) in enumerate(batch):
            input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(
            input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    return ema


@dataclass
class Args:
    """Build the toy task (data, tokenizer, teacher, student) and report their accuracy, KL and constraint
    satisfaction."""

    seed: int = 0
    """seed of the problem generator and of both models' initialisation and data order"""
    cache_dir: str | None = None
    """where to build; None: $CMDP_DISTILL_CACHE or ~/.cache/cmdp_distill, then toy-v2-seed{seed}"""
    force: bool = False
    """rebuild even if a finished build is cached"""
    num_train: int = 20000
    """training problems (both SFT corpora are written from them; the RL scripts sample prompts from them too)"""
    num_test: int = 500
    """held-out problems, disjoint from the training ones"""
    teacher_connectives: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
    """probabilities of "So", "Then", "Now", "Next" opening a step after the first, in the teacher's corpus"""
    student_connectives: tuple[float, float, float, float] = (0.97, 0.01, 0.01, 0.01)
    """the same in the student's corpus (its style)"""
    misread_rate: float = 0.75
    """fraction of "sells" steps written as additions, in both corpora (the teacher's systematic weakness)"""
    teacher_layers: int = 2
    teacher_width: int = 128
    teacher_steps: int = 1600
    """SFT steps for the teacher (to convergence: the cosine schedule ends at 0)"""
    student_layers: int = 2
    student_width: int = 128
    student_steps: int = 1000
    """SFT steps for the student"""
    batch_size: int = 32
    lr: float = 3e-3
    budget: float = 0.05
    """KL budget (nats per token) at which the report measures constraint satisfaction"""
    report_limit: int = 500
    """test problems used for the build report"""


def default_dir(seed: int = 0) -> Path:
    root = (
        os.environ.get("CMDP_DISTILL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmdp_distill"
    )
    return Path(root) / f"{VERSION}-seed{seed}"


def build(args: Args) -> Path:
    """Build the toy task into its cache folder (atomically: a half-built folder is never used)."""
    out = Path(args.cache_dir) if args.cache_dir else default_dir(args.seed)
    if (out / "report.json").exists() and not args.force:
        return out
    print(
        f"building the toy task and its teacher/student models into {out} (once; a few minutes on 2 CPU cores) ...",
        flush=True,
    )
    start = time.time()
    common.seed_everything(args.seed)
    tmp = Path(f"{out}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(args.seed, args.num_train, args.num_test)
    correct = dict(connective_probs=(1.0, 0.0, 0.0, 0.0), misread_rate=0.0)  # the gold solutions of the data files
    for name, split in (("train", train), ("test", test)):
        rng = random.Random(args.seed)
        common.append_jsonl(
            tmp / f"{name}.jsonl.part",
            [dict(question=p["question"], answer=write_solution(p, rng, **correct)) for p in split],
        )
        os.replace(tmp / f"{name}.jsonl.part", tmp / f"{name}.jsonl")
    tokenizer = build_tokenizer()
    losses = {}
    for role, layers, width, steps, connectives in (
        ("teacher", args.teacher_layers, args.teacher_width, args.teacher_steps, args.teacher_connectives),
        ("student", args.student_layers, args.student_width, args.student_steps, args.student_connectives),
    ):
        rng = random.Random(f"{args.seed}-{role}")  # each model's own corpus of solutions
        solutions = [write_solution(p, rng, connectives, args.misread_rate) for p in train]
        model = make_model(tokenizer, layers, width, args.seed)
        losses[role] = sft(
            model,
            tokenizer,
            [p["question"] for p in train],
            solutions,
            steps,
            args.batch_size,
            args.lr,
            args.seed,
            desc=f"toy {role} SFT",
        )
        model.save_pretrained(tmp / role, safe_serialization=True)
        tokenizer.save_pretrained(tmp / role)
    build_seconds = time.time() - start
    report = measure(tmp, args.budget, args.report_limit)
    report.update(build_seconds=round(build_seconds, 1), final_sft_loss=losses, args=vars(args))
    common.write_json(tmp / "report.json", report)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"built in {build_seconds:.0f} s", flush=True)
    return out


def measure(folder: Path, budget: float, limit: int) -> dict:
    """Both models' greedy and sampled (T=1) accuracy, on all test problems and on those with a "sells" step,
    with each response's mean per-token KL to the teacher and the CSR at `budget`."""
    device, dtype = torch.device("cpu"), torch.float32
    tokenizer = common.load_tokenizer(str(folder / "student"))
    teacher = common.load_model(str(folder / "teacher"), device, dtype)
    student = common.load_model(str(folder / "student"), device, dtype)
    problems = common.load_problems(str(folder / "test.jsonl"))[:limit]
    misread = [" sells " in p["question"] for p in problems]
    report = {}
    for role, model in (("teacher", teacher), ("student", student)):
        for decoding, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            records, summary = common.evaluate(
                model,
                tokenizer,
                problems,
                max_new_tokens=64,
                batch_size=128,
                temperature=temperature,
                teacher=teacher,
                budget=budget,
                seed=1,
            )
            summary["accuracy_sells"] = float(np.mean([r["correct"] for r, m in zip(records, misread) if m]))
            summary["accuracy_other"] = float(np.mean([r["correct"] for r, m in zip(records, misread) if not m]))
            report[f"{role}_{decoding}"] = summary
    return report


def resolve(value: str, kind: str, seed: int = 0) -> str:
    """'toy' -> the cached toy path of `kind` (student, teacher, train, test), building it if needed."""
    if value != "toy":
        return value
    folder = build(Args(seed=seed))
    return str(
        folder / {"student": "student", "teacher": "teacher", "train": "train.jsonl", "test": "test.jsonl"}[kind]
    )


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        common.check_finite(args)
    except common.InputError as e:
        raise SystemExit(common.one_sentence(e)) from None
    folder = build(args)
    report = json.loads((folder / "report.json").read_text())
    keys = ("accuracy", "accuracy_sells", "accuracy_other", "mean_kl", "csr", "mean_response_tokens")
    print(f"| model | decoding | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}")
    for name, summary in report.items():
        if isinstance(summary, dict) and "accuracy" in summary:
            role, decoding = name.split("_")
            print(f"| {role} | {decoding} | " + " | ".join(f"{summary[k]:.3f}" for k in keys) + " |")
    print(f"build: {report['build_seconds']:.0f} s; report in {folder / 'report.json'}")
