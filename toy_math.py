"""The offline toy task: grade-school arithmetic word problems, a trained tiny teacher and a weaker student.

Random-weight models have 0% accuracy and a meaningless KL, so the default runs of
`cmdp_distill.py`, `lagrangian_distill.py` and `eval_math.py` use this task instead (the way
CartPole serves CleanRL). It generates GSM8K-format problems ("... #### 28"), builds a word/digit
tokenizer in-process, and trains two Llama-architecture models by supervised fine-tuning on the
worked solutions: a teacher (4 layers, width 256; ~95% greedy test accuracy) and a smaller student
(2 layers, width 128) trained much less, so that it is weaker (~60-65%) and most of its responses exceed
a per-token KL budget of 0.05 nats to the teacher. Everything is saved with `save_pretrained` and
loads through the same code as real models. README "The toy task" has the measured figures.

    python toy_math.py                  # build (once, ~7 minutes on 2 CPU cores) and report
    python toy_math.py --force          # rebuild

The pair is cached in $CMDP_DISTILL_CACHE (default ~/.cache/cmdp_distill/toy-v1-seed{seed});
`--dataset toy`, `--teacher toy`, `--student toy` (the scripts' defaults) resolve to it and build
it on first use. The same seed gives the same task and models.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

import common

VERSION = "toy-v1"
NAMES = [("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Leo", "he"),
         ("Zoe", "she"), ("Omar", "he"), ("Ivy", "she"), ("Sam", "he"), ("Nina", "she"), ("Tom", "he")]
OBJECTS = ["marbles", "apples", "stickers", "coins", "books", "cookies", "pencils", "cards", "shells", "stamps"]
# Each sentence template names the operation it applies to the running total.
OWN_START = "{Name} has {a} {obj}."
BOX_START = "A box holds {a} {obj}."
BAGS_START = "{Name} buys {a} bags with {k} {obj} in each."
OWN_OPS = {"+": ["{P} finds {b} more.", "{P} buys {b} more.", "{P} gets {b} more from a friend."],
           "-": ["{P} gives {b} away.", "{P} loses {b}.", "{P} sells {b}."],
           "*": ["{P} then has {b} times as many."]}
BOX_OPS = {"+": ["{Name} puts in {b} more.", "{Name} adds {b} more."],
           "-": ["{Name} takes out {b}.", "{Name} removes {b}."],
           "*": ["The number of {obj} then grows {b} times."]}
OWN_QUESTION = "How many {obj} does {p} have now?"
BOX_QUESTION = "How many {obj} are in the box now?"
# Word pieces, single digits (so numbers are spelled out digit by digit), "####" and punctuation,
# each optionally carrying the space before it; decoding concatenates the pieces exactly.
TOKEN_PATTERN = r" ?####| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_problem(rng: random.Random) -> dict:
    """One problem: {question, solution (GSM8K format, ending in '#### N'), answer}."""
    name, pronoun = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    family = rng.choice(["own", "box", "bags"])
    fill = dict(Name=name, P=pronoun.capitalize(), p=pronoun, obj=obj)
    steps = []
    if family == "bags":
        a, k = rng.randint(2, 9), rng.randint(2, 5)
        sentences, total = [BAGS_START.format(a=a, k=k, **fill)], a * k
        steps.append(f"{sentences[-1][:-1]}, so {a} * {k} = {total}.")
        num_ops = rng.randint(0, 2)
    else:
        total = rng.randint(2, 30)
        sentences = [(OWN_START if family == "own" else BOX_START).format(a=total, **fill)]
        num_ops = rng.randint(1, 3)
    ops = BOX_OPS if family == "box" else OWN_OPS
    for _ in range(num_ops):
        # one-digit operands and x2/x3 of small totals keep the task learnable by a tiny model in minutes
        op = rng.choice(["+"] + ["-"] * (total > 0) + ["*"] * (0 < total <= 20))
        if op == "+":
            b = rng.randint(1, 9)
            new_total = total + b
        elif op == "-":
            b = rng.randint(1, min(9, total))
            new_total = total - b
        else:
            b = rng.randint(2, 3)
            new_total = total * b
        sentences.append(rng.choice(ops[op]).format(b=b, **fill))
        steps.append(f"{sentences[-1][:-1]}, so {total} {op} {b} = {new_total}.")
        total = new_total
    sentences.append((BOX_QUESTION if family == "box" else OWN_QUESTION).format(**fill))
    return dict(question=" ".join(sentences), solution=" ".join(steps) + f" #### {total}", answer=str(total))


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
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [OWN_START, BOX_START, BAGS_START, OWN_QUESTION, BOX_QUESTION, "Question: ?\nAnswer: , so #### 0123456789 + - * = ."]
    texts += [t for ops in (OWN_OPS, BOX_OPS) for templates in ops.values() for t in templates]
    fills = [dict(Name=n, P=p.capitalize(), p=p, obj=o, a=0, b=0, k=0) for n, p in NAMES for o in OBJECTS]
    pieces = {piece for text in texts for fill in fills for piece in re.findall(TOKEN_PATTERN, text.format(**fill))}
    pieces = {f"{space}{piece.strip()}" for piece in pieces if piece != "\n" for space in ("", " ")} | {"\n"}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(pieces))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_model(tokenizer, num_layers: int, width: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sft(model, tokenizer, problems: list[dict], steps: int, batch_size: int, lr: float, seed: int, desc: str) -> float:
    """Supervised fine-tuning on the worked solutions (loss on solution tokens only); returns the last loss."""
    from tqdm.auto import tqdm

    prompts = tokenizer([common.render_prompt(tokenizer, p["question"]) for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + p["solution"] for p in problems], add_special_tokens=False)["input_ids"]
    examples = [(prompt, answer + [tokenizer.eos_token_id]) for prompt, answer in zip(prompts, answers)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 10%
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * min(s, steps) / steps)))
    order = np.random.default_rng(seed).permutation(len(examples))
    model.train()
    ema = None
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        batch = [examples[order[(step * batch_size + j) % len(examples)]] for j in range(batch_size)]
        length = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        for i, (p, a) in enumerate(batch):
            input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    return ema


@dataclass
class Args:
    """Build the toy task (data, tokenizer, teacher, student) and report their accuracy and KL."""

    seed: int = 0
    """seed of the problem generator and of both models' initialisation and data order"""
    cache_dir: str | None = None
    """where to build; None: $CMDP_DISTILL_CACHE or ~/.cache/cmdp_distill, then toy-v1-seed{seed}"""
    force: bool = False
    """rebuild even if a finished build is cached"""
    num_train: int = 20000
    """training problems (the RL scripts sample prompts from these too)"""
    num_test: int = 500
    """held-out problems, disjoint from the training ones"""
    teacher_layers: int = 4
    teacher_width: int = 256
    teacher_steps: int = 1200
    """SFT steps for the teacher"""
    student_layers: int = 2
    student_width: int = 128
    student_steps: int = 450
    """SFT steps for the student: few, so that it stays clearly weaker than the teacher"""
    batch_size: int = 32
    lr: float = 2e-3
    budget: float = 0.05
    """KL budget (nats per token) at which the report measures the student's constraint satisfaction"""
    report_limit: int = 500
    """test problems used for the build report"""


def default_dir(seed: int = 0) -> Path:
    root = os.environ.get("CMDP_DISTILL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmdp_distill"
    return Path(root) / f"{VERSION}-seed{seed}"


def build(args: Args) -> Path:
    """Build the toy task into its cache folder (atomically: a half-built folder is never used)."""
    out = Path(args.cache_dir) if args.cache_dir else default_dir(args.seed)
    if (out / "report.json").exists() and not args.force:
        return out
    print(f"building the toy task and its teacher/student models into {out} (once; ~7 minutes on 2 CPU cores) ...", flush=True)
    start = time.time()
    common.seed_everything(args.seed)
    tmp = Path(f"{out}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(args.seed, args.num_train, args.num_test)
    for name, split in (("train", train), ("test", test)):
        common.append_jsonl(tmp / f"{name}.jsonl.part", [dict(question=p["question"], answer=p["solution"]) for p in split])
        os.replace(tmp / f"{name}.jsonl.part", tmp / f"{name}.jsonl")
    tokenizer = build_tokenizer()
    losses = {}
    for role, layers, width, steps in (("teacher", args.teacher_layers, args.teacher_width, args.teacher_steps),
                                       ("student", args.student_layers, args.student_width, args.student_steps)):
        model = make_model(tokenizer, layers, width, args.seed)
        losses[role] = sft(model, tokenizer, train, steps, args.batch_size, args.lr, args.seed, desc=f"toy {role} SFT")
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
    print(f"built in {build_seconds:.0f} s: {json.dumps({k: v for k, v in report.items() if k != 'args'})}", flush=True)
    return out


def measure(folder: Path, budget: float, limit: int) -> dict:
    """Greedy test accuracy of both models, and the student's mean KL / CSR to the teacher."""
    device, dtype = torch.device("cpu"), torch.float32
    tokenizer = common.load_tokenizer(str(folder / "student"))
    teacher = common.load_model(str(folder / "teacher"), device, dtype)
    student = common.load_model(str(folder / "student"), device, dtype)
    problems = common.load_problems(str(folder / "test.jsonl"))[:limit]
    report = {}
    for role, model in (("teacher", teacher), ("student", student)):
        _, summary = common.evaluate(model, tokenizer, problems, max_new_tokens=64, batch_size=128, teacher=teacher, budget=budget)
        report[role] = summary
    return report


def resolve(value: str, kind: str, seed: int = 0) -> str:
    """'toy' -> the cached toy path of `kind` (student, teacher, train, test), building it if needed."""
    if value != "toy":
        return value
    folder = build(Args(seed=seed))
    return str(folder / {"student": "student", "teacher": "teacher", "train": "train.jsonl", "test": "test.jsonl"}[kind])


if __name__ == "__main__":
    args = tyro.cli(Args)
    folder = build(args)
    print(json.dumps(json.loads((folder / "report.json").read_text()), indent=2))
