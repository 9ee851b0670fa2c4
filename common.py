"""Shared plumbing for cmdp_distill.py, lagrangian_distill.py, kd_warmup.py, eval_math.py and toy_math.py: input
checks, model, tokenizer and data loading, prompts, the one answer grader (training reward and evaluation accuracy),
exact per-token KL and log-probs from hidden states, a response's cost phi(y), generation, scoring, evaluation, run
folders, metrics, checkpoints, data parallelism and LoRA. The methods and their training loops live in the scripts.
Importing this module has no side effects; bad input raises InputError (a ValueError), printed as one sentence.

Shapes: B rows of a batch, T = the padded length minus one (positions that predict a next token), N the response
tokens of a batch (the True entries of its (B, T) response mask), H a hidden size, V the tokenizer's ids.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
import zipfile
from collections import deque
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input (a flag, a file, a model that does not fit the method): the scripts print it as one sentence."""


def one_sentence(error: BaseException) -> str:
    """What a script prints for bad input or a model or dataset that cannot load: the error's first line; for an
    OSError (a hub id without network, a missing file) also its type and how to work from local copies."""
    first = (str(error).strip().splitlines() or [""])[0].rstrip(". ")
    if isinstance(error, InputError):
        return first + "."
    return (
        f"{type(error).__name__}: {first}; without the network, pass local copies: a model folder "
        "(`hf download ID --local-dir DIR`) or a .jsonl file of problems."
    )


def check_finite(args) -> None:
    """Every float field (or tuple of floats) of an Args dataclass is finite (tyro parses nan and inf as floats)."""
    for field in fields(args):
        value = getattr(args, field.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise InputError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")


def check_seed(seed: int) -> None:
    """--seed seeds numpy's global generator (seed_everything), which takes 0 to 2**32 - 1."""
    if not 0 <= seed < 2**32:
        raise InputError(f"--seed must be between 0 and 2**32 - 1 (numpy's range), got {seed}")


def check_device(device: str) -> None:
    """--device is 'auto' or a torch device that is there: 'cuda' and 'cuda:N' only where torch sees that GPU."""
    if device == "auto":
        return
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if resolved.type == "cuda" and (resolved.index or 0) >= (count := torch.cuda.device_count()):
        raise InputError(f"--device {device}: torch sees {count} GPU(s) here, cuda:0 to cuda:{count - 1}")


def check_output_dir(path: str) -> None:
    """--output-dir is a folder, or can be made: no file stands in its place or on its path (found before the models
    load, not when the first result is written)."""
    folder = Path(path).expanduser()
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise InputError(f"--output-dir {path!r}: {existing} is a file, not a folder")
            return


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}


def _checkpoint_json(folder: Path, name: str, flag: str) -> dict:
    """The JSON object in a checkpoint's file `name`; InputError if it is missing or holds anything else."""
    try:
        value = json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{flag} {str(folder)!r} has no {name}, which a checkpoint of these scripts holds") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise InputError(f"{flag} {str(folder)!r}: its {name} is not valid JSON ({why})") from None
    if not isinstance(value, dict):
        kind = _JSON_TYPES.get(type(value), "a number")
        raise InputError(f"{flag} {str(folder)!r}: its {name} holds {kind}, not an object")
    return value


def _refuse_other_lora_rank(saved_rank: int, rank: int) -> None:
    """The one refusal of a --lora-rank other than that of a checkpoint's adapter (0: the checkpoint holds none): its
    weights and AdamW state are those of an adapter of that rank."""
    if saved_rank and rank != saved_rank:
        raise InputError(
            f"the checkpoint holds a LoRA adapter of rank {saved_rank}: resume it with --lora-rank {saved_rank}, "
            f"not {rank}"
        )


def check_resume(args, same: tuple[str, ...]) -> None:
    """Refuse a --resume that could not continue the run, before anything loads: a folder that is not a checkpoint
    (trainer_state.pt written by torch.save, args.json an object, a model that loads: check_model_path), flags in
    `same` that differ from the checkpoint's (they fix the data order and the batches), and LoRA settings other than
    those of its adapter_config.json (none: the full model, --lora-rank 0), which would otherwise win silently."""
    if not args.resume:
        return
    folder = Path(args.resume).expanduser()
    if not (folder / "trainer_state.pt").is_file():
        raise InputError(f"--resume {args.resume!r} is not a checkpoint folder (it has no trainer_state.pt)")
    if not zipfile.is_zipfile(folder / "trainer_state.pt"):  # torch.save writes a zip archive
        raise InputError(
            f"--resume {args.resume!r}: its trainer_state.pt is not a file written by torch.save (damaged or "
            "truncated); resume from another checkpoint"
        )
    saved = _checkpoint_json(folder, "args.json", "--resume")
    for name in same:
        if saved.get(name) != getattr(args, name):
            raise InputError(
                f"--resume: the checkpoint was trained with --{name.replace('_', '-')} {saved.get(name)}, "
                f"not {getattr(args, name)}; resume with the same value (or start a new run)"
            )
    check_model_path(args.resume, "--resume")
    has_adapter = (folder / "adapter_config.json").exists()
    adapter = _checkpoint_json(folder, "adapter_config.json", "--resume") if has_adapter else {}
    rank, lora_rank = adapter.get("r", 0), getattr(args, "lora_rank", 0)
    if rank and not hasattr(args, "lora_rank"):  # a script that trains the full model only (kd_warmup.py)
        raise InputError(
            f"--resume {args.resume!r} holds a LoRA adapter, and this script trains the full model only; resume "
            "it with the script that wrote it"
        )
    _refuse_other_lora_rank(rank, lora_rank)
    if lora_rank != rank:
        raise InputError(
            f"--resume {args.resume!r} is a full fine-tuning checkpoint (it holds no LoRA adapter): resume it with "
            f"--lora-rank 0, not {lora_rank}, or train adapters on it in a new run (--student {args.resume})"
        )
    if not rank:
        return
    targets = adapter.get("target_modules")  # a set: PEFT saves it as a sorted list, and the order does not matter
    saved_targets = sorted(targets) if isinstance(targets, list) else targets
    for flag, saved_value, value in (
        ("--lora-alpha", adapter.get("lora_alpha"), args.lora_alpha),
        ("--lora-target-modules", saved_targets, sorted(args.lora_target_modules)),
    ):
        if saved_value != value:
            shown = [" ".join(map(str, v)) if isinstance(v, list) else v for v in (saved_value, value)]
            raise InputError(
                f"--resume: the checkpoint's LoRA adapter was trained with {flag} {shown[0]}, not {shown[1]}; "
                "resume with the same value (or start a new run)"
            )


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _split_gguf(path: str) -> tuple[str, dict]:
    """A path ending in .gguf loads through transformers' own GGUF reader (`gguf_file=`)."""
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return folder, {"gguf_file": name}
    return path, {}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def check_model_path(path: str, what: str) -> None:
    """Fail before any loading on a path that is not a model: a file other than a GGUF one, a folder without
    config.json (or a LoRA checkpoint's adapter_config.json, whose base must then exist), a missing path that is no hub
    id, or a hub id that is not cached while the hub cannot be reached (check_hub_id)."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not any(os.path.isfile(os.path.join(expanded, name)) for name in ("config.json", "adapter_config.json")):
            raise InputError(
                f"{what} {path!r} is a folder without config.json (nor a LoRA adapter's adapter_config.json), not a "
                "saved model; pass a folder written by save_pretrained or `hf download`, a .gguf file or a hub id"
            )
        if os.path.isfile(os.path.join(expanded, "adapter_config.json")):
            _check_adapter_base(Path(expanded), f"{what} {path!r}")
        return
    if os.path.isfile(expanded):
        if not path.endswith(".gguf"):
            raise InputError(
                f"{what} {path!r} is a file but not a .gguf file; pass a model folder (save_pretrained's, with "
                "config.json), a .gguf file, a hub id like Qwen/Qwen2.5-Math-1.5B-Instruct, or 'toy'"
            )
        with open(expanded, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InputError(f"{what} {path!r} is not a GGUF file (it does not start with the bytes GGUF)")
        return
    if not _HUB_ID.fullmatch(path) or path.endswith(".gguf"):
        raise InputError(
            f"{what} {path!r} does not exist; pass a local model folder, a .gguf file, a hub id like "
            "Qwen/Qwen2.5-Math-1.5B-Instruct, or 'toy'"
        )
    instead = "pass a local copy instead: a model folder made where the hub can be reached"
    check_hub_id(path, "model", f"{what} {path}", f"{instead} (`hf download {path} --local-dir DIR`)")


def _check_adapter_base(folder: Path, what: str) -> None:
    """A LoRA checkpoint loads its base from adapter_config.json's base_model_name_or_path: a folder that must still
    exist, or a hub id (check_hub_id)."""
    base = _checkpoint_json(folder, "adapter_config.json", what).get("base_model_name_or_path")
    where = f"{what}: adapter_config.json's base_model_name_or_path {base!r}"
    if not isinstance(base, str) or not base:
        raise InputError(f"{where} names no base model; write the base model's folder or hub id there")
    if os.path.exists(os.path.expanduser(base)):
        return
    if not _HUB_ID.fullmatch(base):
        raise InputError(f"{where} does not exist; put the base model back there, or write where it is now")
    instead = f"download it where the hub can be reached (`hf download {base} --local-dir DIR`) and write DIR there"
    check_hub_id(base, "model", where, instead)


_HUB_PROBE_TIMEOUT = dict(connect=5.0, read=10.0, write=10.0, pool=5.0)  # seconds; read: HF_HUB_ETAG_TIMEOUT's default
_HUB_WENT_OFFLINE = False  # set by check_hub_id when it switches the process to the cache


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str) -> str | None:
    """None if `endpoint` answers an HTTP request (any status), else why not ("ConnectError: ..."). Through
    huggingface_hub's own client, so its proxies and certificates apply; once per endpoint and process."""
    from huggingface_hub.utils import get_session

    try:
        from httpx2 import Timeout, TransportError  # what huggingface_hub >= 2 talks through
    except ImportError:
        from httpx import Timeout, TransportError
    try:
        get_session().head(endpoint, timeout=Timeout(**_HUB_PROBE_TIMEOUT), follow_redirects=False)
    except TransportError as e:  # no answer: DNS, refused or timed-out connection, proxy, TLS
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}".rstrip(": ")
    return None


def check_hub_id(repo_id: str, repo_type: str, what: str, instead: str) -> None:
    """Answer in seconds for a hub repository (repo_type 'model' or 'dataset') that cannot load. Without the network
    huggingface_hub retries each file 5 times with backoff (~30 s per file, ~50 s before a missing model fails,
    minutes before a cached one loads), so one short request to its endpoint (HF_ENDPOINT) answers first, unless
    HF_HUB_OFFLINE is set (its own error is immediate then). Unreachable and not cached (a snapshot in the hub cache,
    or a dataset's prepared copy in the datasets cache): InputError naming `what` and saying what to pass `instead`;
    unreachable but cached: the process goes on as with HF_HUB_OFFLINE=1, so the cached copy loads at once."""
    global _HUB_WENT_OFFLINE
    from huggingface_hub import constants

    if constants.is_offline_mode() and not _HUB_WENT_OFFLINE:
        return
    if (reason := _hub_unreachable(constants.ENDPOINT)) is None:
        return
    snapshots = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    cached = snapshots.is_dir() and any(snapshots.iterdir())
    if not cached and not (repo_type == "dataset" and (prepared / repo_id.replace("/", "___")).is_dir()):
        raise InputError(
            f"{what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"({constants.ENDPOINT}) cannot be reached ({reason}); {instead}"
        )
    note = f"the hub ({constants.ENDPOINT}) cannot be reached ({reason}): {repo_id} loads from the local cache"
    print(note + ", as with HF_HUB_OFFLINE=1", file=sys.stderr, flush=True)
    _HUB_WENT_OFFLINE = True  # so that a later id that is not cached is still refused here
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later (datasets reads it at import)
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers consult on each call
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (for batched generation) and a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    folder, extra = _split_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM from a hub id, a local folder (safetensors preferred) or a .gguf file."""
    from transformers import AutoModelForCausalLM

    folder, extra = _split_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    quantizer = getattr(model, "hf_quantizer", None)
    if extra and quantizer is not None and not any("Gguf" in type(m).__name__ for m in model.modules()):
        # GGUF weights were dequantized to plain tensors, but the GGUF quantizer left attached refuses
        # save_pretrained (so checkpoints of a GGUF student): drop it, the model is an ordinary one now
        quantizer.remove_quantization_config(model)
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None) or getattr(head, "bias", None) is not None:
        raise InputError(
            f"{path}: its logits are not final_hidden @ lm_head.weight (logit soft-capping or an "
            "lm_head bias), which the exact KL here assumes"
        )
    return model.to(device)


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """The KL compares distributions id by id, so every student token must have the teacher's id."""
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    bad = [t for t, i in student_vocab.items() if teacher_vocab.get(t) != i]
    probe = "Natalia sold 48/2 = 24 clips in May.\n\\boxed{\\frac{1}{2}} #### 72 ünïcode"
    if bad or student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        example = f" (e.g. {bad[0]!r}: student id {student_vocab[bad[0]]}, teacher id {teacher_vocab.get(bad[0])})"
        raise InputError(
            f"teacher and student tokenizers differ{example if bad else ''}; distillation here needs "
            "the same token ids, so use models of one family"
        )


# ---------------------------------------------------------------------------------------------
# Data and prompts
# ---------------------------------------------------------------------------------------------

HUB_DATASETS = {  # name -> (hub id, config, splits)
    "gsm8k": ("openai/gsm8k", "main", ("train", "test")),
    "math500": ("HuggingFaceH4/MATH-500", None, ("test",)),
    "gsm_symbolic": ("apple/GSM-Symbolic", "main", ("test",)),  # GSM8K fields (question, answer with #### N)
    "gsm_symbolic_p1": ("apple/GSM-Symbolic", "p1", ("test",)),
    "gsm_symbolic_p2": ("apple/GSM-Symbolic", "p2", ("test",)),
}
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_FIELDS = "question/answer (GSM8K), problem/answer (MATH) or Body/Question/Answer (SVAMP)"


def _problem_from_row(row: dict) -> dict:
    """One problem {question, answer} from a GSM8K, MATH or SVAMP row (ValueError saying why none fits)."""
    if not isinstance(row, dict):
        raise ValueError(f"it is {_JSON_TYPES.get(type(row), 'a number')}, not an object with fields {_FIELDS}")
    layouts = (("question", "answer"), ("problem", "answer"), ("Body", "Question", "Answer"))  # GSM8K, MATH, SVAMP
    keys = next((layout for layout in layouts if all(key in row for key in layout)), None)
    if keys is None:
        raise ValueError(f"expected fields {_FIELDS}")
    for key in keys:  # text is a string; an answer may also be a number
        if not isinstance(row[key], str) and (key.lower() != "answer" or type(row[key]) not in (int, float)):
            allowed = "a string or a number" if key.lower() == "answer" else "a string"
            raise ValueError(f"its {key} is {_JSON_TYPES.get(type(row[key]), 'a number')}, not {allowed}")
    if keys[0] == "question":  # GSM8K: the gold is what follows the last ####
        return {"question": row["question"], "answer": str(row["answer"]).split("####")[-1].strip().replace(",", "")}
    if keys[0] == "problem":  # MATH / MATH-500
        return {"question": row["problem"], "answer": str(row["answer"])}
    try:  # SVAMP: a number, 5.0 written 5
        answer = float(row["Answer"])
    except ValueError:
        raise ValueError(f"its Answer {row['Answer']!r} is not a number") from None
    answer = str(int(answer)) if answer.is_integer() else str(answer)
    return {"question": f"{row['Body'].strip()} {row['Question'].strip()}", "answer": answer}


def _read_problem_file(name: str) -> list[dict]:
    """Problems from a .jsonl/.json file; InputError naming the file and line of the first bad row."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise InputError(
            f"dataset {name!r} is neither a known name ({', '.join(['toy', *HUB_DATASETS])}) nor an "
            "existing .jsonl/.json file"
        )
    if path.suffix not in (".jsonl", ".json"):
        raise InputError(f"dataset file {path} must end in .jsonl or .json, not {path.suffix!r}")
    try:
        text, rows = path.read_text(encoding="utf-8"), []
    except UnicodeDecodeError as e:
        raise InputError(f"dataset file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                where = f"line {lineno}"
                rows += [(where, json.loads(line))] if line.strip() else []
        else:
            where, data = "the file", json.loads(text)
            rows = [(f"item {i}", row) for i, row in enumerate(data)] if isinstance(data, list) else [(where, data)]
        problems = []
        for where, row in rows:  # a loop, not a comprehension: `where` names the bad row below
            problems.append(_problem_from_row(row))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: {where} is not valid JSON ({e.msg})") from None
    except ValueError as e:
        raise InputError(f"{path}: {where} is not a problem: {e}") from None
    if not problems:
        raise InputError(f"dataset file {path} holds no problems")
    return problems


def check_dataset(name: str, split: str) -> None:
    """Fail early (before any model loads or the toy task is built) on a dataset that cannot load: an
    unknown name, a split that a hub dataset lacks, or a missing or malformed file (parsed in full)."""
    if name in HUB_DATASETS:
        repo, config, splits = HUB_DATASETS[name]
        if split not in splits:
            raise InputError(
                f"dataset {name} ({repo}{f', config {config}' if config else ''}) has only the split(s) "
                f"{', '.join(splits)}, not {split!r}: to train, pass a local .jsonl file as --dataset and "
                f"{name} as --eval-dataset"
            )
        what, fields = f"dataset {name} ({repo})", "GSM8K's question/answer or MATH's problem/answer fields"
        check_hub_id(repo, "dataset", what, f"pass a local .jsonl or .json file of its problems instead ({fields})")
    elif name != "toy":
        _read_problem_file(name)


def load_problems(name: str, split: str = "test") -> list[dict]:
    """Problems as [{question, answer}] from a hub name (see HUB_DATASETS) or a .jsonl/.json file."""
    if name not in HUB_DATASETS:
        return _read_problem_file(name)
    import datasets

    check_dataset(name, split)
    repo, config, _ = HUB_DATASETS[name]
    return [_problem_from_row(row) for row in datasets.load_dataset(repo, config, split=split)]


def render_prompt(tokenizer, question: str) -> str:
    """The chat template (with a step-by-step, \\boxed{} system prompt) if any, else a plain one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


# ---------------------------------------------------------------------------------------------
# Answer extraction and grading: the one grader, for the training reward and for evaluation
# ---------------------------------------------------------------------------------------------
# The answer follows the LAST final-answer marker: \boxed{}/\fbox{}, GSM8K's `####`, "the answer is",
# "Final Answer:". No marker, no reward: a last-number fallback pays truncated and degenerate text, so it
# lives only in is_correct_lenient (evaluation's lenient_accuracy). Equivalence is Math-Verify's (the
# verifier of TRL's accuracy reward and open-r1), on its LaTeX path only: its ExprExtractionConfig path
# runs sympy's parse_expr, an eval, on model text. Its signal.alarm timeouts work in the main thread only,
# so each comparison runs under _within instead; what no Python-level timeout can interrupt, one huge
# integer computed in C, is refused before sympy computes it (_UNPARSABLE, _digits).

_MARKER = re.compile(
    r"\\(?:boxed|fbox)(?![a-zA-Z])|(?<!#)####(?!#)|\b(?:the|final)\s+answer\s+is\b(?!\s+(?:correct|right|wrong|"
    r"incorrect|not)\b)|\bfinal\s+answer\b(?:\s*\*\*)?\s*(?::|\n)",
    re.IGNORECASE,
)
_HEADING = re.compile(r"[^\S\n]*(?:\*\*)?[^\S\n]*(?:[A-Za-z]{2,}|\d+[.):][^\S\n]+[A-Za-z]|#)")  # `#### Step 2`
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\bI hope\b")  # not a decimal point
_SENTENCE_BREAK = re.compile(r"[.!?](?=\s)|\n\s*\n")
_MATH_SPAN = re.compile(r"\$\$?[^$]+\$\$?")
_WORD = re.compile(r"(?<![\\a-zA-Z])(?!(?:and|or|percent|percentage|pct)\b)[a-zA-Z]{3,}")  # not a LaTeX command
_INTEGER = re.compile(r"[-+]?\d{1,1000}")
_LAST_NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)")
# Done in C while parsing, where no timeout reaches: reading 1E999999 takes a minute, \binom{100000}{50000} a second.
_UNPARSABLE = re.compile(r"\d\s*E\s*[-+]?\s*\d{3}|(?:binom|choose).*\d{5}")
_MAX_MARKERS, _MAX_ANSWER_CHARS = 8, 1000  # markers tried from the last one back; characters read after one
_MAX_PARSE_CHARS = 300  # longer answers compare as strings (MATH-500's longest gold answer has 53 characters)
_MAX_DIGITS = 100_000  # digits of one exact number (a power, a factorial) that sympy may compute
# Per comparison, parses included: ANTLR takes minutes to parse `x^x^...^x`, sympy to simplify sin(x)^20 - cos(x)^20,
# while the slowest public case takes 0.2 s of CPU warm and 0.4 s cold, the first time its shape is parsed, beside two
# busy processes on 2 cores (tests/test_grader.py). The limit is the thread's CPU time, so that load and threads do not
# change verdicts; wall time is a backstop only (at 0.4 s CPU and 0.8 s wall, both limits flipped public cases).
_CPU_SECONDS, _WALL_SECONDS = 1.0, 5.0


def _boxed(text: str, marker: re.Match) -> str:
    """The \\boxed{} at `marker`, joined with boxes before it in its sentence by Math-Verify's rule (`\\boxed{1}
    and \\boxed{2}`; it would also join `\\boxed{7}. Wait, it is \\boxed{8}`); `\\boxed 5`'s token; "" if unclosed."""
    j = re.compile(r"[ \t]*").match(text, marker.end()).end()
    if not text.startswith("{", j):
        token = text[j : j + _MAX_ANSWER_CHARS].split(maxsplit=1)
        return token[0].strip("$.") if j > marker.end() and token and not _MARKER.match(token[0]) else ""
    depth = 0
    for k in range(j, min(len(text), j + _MAX_ANSWER_CHARS)):
        depth += (text[k] == "{") - (text[k] == "}")
        if depth == 0:
            from latex2sympy2_extended.math_normalization import extract_boxed_content

            start = max(0, marker.start() - _MAX_ANSWER_CHARS)
            start = max([start] + [m.end() for m in _SENTENCE_BREAK.finditer(text, start, marker.start())])
            return extract_boxed_content(text[start : k + 1], mode="last").strip()
    return ""


def _tail(text: str, marker: re.Match, end: int) -> str:
    """What follows a text marker (up to `end`, the next one): the rest of its line, or the next line if that
    is empty, to the end of the sentence, without Markdown bold or \\( \\[; "" after a heading `#### Step 2`."""
    rest = text[marker.end() : min(end, marker.end() + _MAX_ANSWER_CHARS)]
    if marker.group() == "####" and _HEADING.match(rest):
        return ""
    rest = rest.lstrip(" \t*:")
    line = rest.split("\n", 1)[0] if rest.split("\n", 1)[0].strip() else rest.lstrip().split("\n", 1)[0]
    line = line[: stop.start()] if (stop := _SENTENCE_END.search(line)) else line
    return re.sub(r"\\[()\[\]]", " ", line).strip(" \t*,:;")


def _value(answer: str) -> str:
    """The value a sentence names ("Jane started 3 hours ago", "the largest $n$ is 34", "12 ways"): what
    follows its last " is ", else its one math span or one number; any other answer as it is."""
    if _WORD.search(_MATH_SPAN.sub(" ", answer)):
        after_is = answer.rsplit(" is ", 1)[-1]
        spans, numbers = _MATH_SPAN.findall(answer), _LAST_NUMBER.findall(answer)
        if " is " in answer and re.search(r"[\d$\\]", after_is):
            return after_is.strip()
        if len(spans) == 1 or len(numbers) == 1:
            return spans[0] if len(spans) == 1 else numbers[0]
    return answer


def extract_answer(text: str) -> str | None:
    """The answer after the last final-answer marker that holds one; None when there is none."""
    if not isinstance(text, str):
        return None
    markers = list(deque(_MARKER.finditer(text), maxlen=_MAX_MARKERS))  # linear, keeps the last few
    for marker, end in reversed(list(zip(markers, [m.start() for m in markers[1:]] + [len(text)]))):
        if answer := _boxed(text, marker) if marker.group()[0] == "\\" else _tail(text, marker, end):
            return _value(answer)
    return None


class _OutOfTime(BaseException):
    """A BaseException, so that the `except Exception` blocks in Math-Verify and sympy let it through."""


def _within(fn):
    """fn(), or _OutOfTime once it has used _CPU_SECONDS of its thread's CPU (so that load does not change verdicts)
    or _WALL_SECONDS: a watchdog thread raises it in the calling thread with PyThreadState_SetAsyncExc (as stopit
    does), which works in any thread. It lands between two bytecodes, after which sympy's global flags are reset."""
    thread, lock, done = threading.get_ident(), threading.Lock(), threading.Event()
    clock = time.pthread_getcpuclockid(thread)
    cpu_start, wall_start = time.clock_gettime(clock), time.perf_counter()

    def watch():
        while not done.wait(0.01):
            try:
                over = time.clock_gettime(clock) - cpu_start > _CPU_SECONDS
            except OSError:  # the thread has just ended
                return
            if over or time.perf_counter() - wall_start > _WALL_SECONDS:
                with lock:
                    if not done.is_set():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(_OutOfTime))
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        try:
            return fn()
        finally:
            with lock:
                done.set()
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)  # one still pending
    except _OutOfTime:
        from sympy.core.parameters import global_parameters

        global_parameters.evaluate, global_parameters.distribute, global_parameters.exp_is_pow = True, True, False
        raise


@functools.lru_cache(maxsize=1)
def _math_verify():
    """Math-Verify's parse and verify, without their signal.alarm timeouts, imported and warmed up (ANTLR's
    prediction cache, sympy's lazy imports) before any watchdog runs."""
    from math_verify import LatexExtractionConfig, parse, verify

    extraction = [LatexExtractionConfig(boxed_match_priority=0)]
    parse = functools.partial(parse, extraction_config=extraction, parsing_timeout=None)
    verify = functools.partial(verify, timeout_seconds=None)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its warning that there is no timeout: _within is
    warm_up = (  # one answer of each kind whose first reading imports or builds something, ";"-separated
        r"\left( \frac{1}{2}, -3 \right);[0,1) \cup (2,\infty);x \in [-2, 7];\pm \sqrt{2};\frac{x^2}{4} + y^2/9 = 1;"
        r"50\%;90^\circ;10 \text{ cm};4210_5;|x-1|;5!;\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix};\sin x + \cos^2 x;"
        r"\log_2 8;\text{(A)}"
    )
    for answer in warm_up.split(";"):
        verify(parse("\\boxed{x+1}"), parse("\\boxed{" + answer + "}"))
    return parse, verify


def _digits(expr) -> float:
    """An upper bound on the digits of the exact numbers sympy may compute for `expr`, read off its tree."""
    import sympy

    if isinstance(expr, sympy.Rational):
        return (abs(expr.p).bit_length() + abs(expr.q).bit_length()) * 0.302 + 1
    if isinstance(expr, (sympy.Pow, sympy.factorial, sympy.binomial)):
        count = expr.args[-1] if isinstance(expr, sympy.Pow) else expr.args[0]  # the exponent; n in n! and C(n, k)
        if not count.free_symbols:
            if _digits(count) > _MAX_DIGITS:
                return float("inf")  # 9^(9^(9^9))
            value = max(abs(complex(count.evalf(15))), 1)  # OverflowError past 1e308
            return value * (_digits(expr.args[0]) if isinstance(expr, sympy.Pow) else len(str(int(value))))
    if isinstance(expr, sympy.MatrixBase):  # \operatorname{zeros}(10^5, 10^5) is stored sparse, until listed
        return sum(_digits(entry) for entry in expr) if expr.rows * expr.cols <= 10_000 else float("inf")
    return sum(_digits(arg) for arg in expr.args if isinstance(arg, (sympy.Basic, sympy.MatrixBase)))


@functools.lru_cache(maxsize=4096)  # a group's responses share the gold answer and often their own
def _parse(answer: str) -> tuple:
    """Math-Verify's readings of an answer (sympy expressions, its normalised string), or just the answer when
    it is long or would make sympy compute a huge exact number."""
    if len(answer) > _MAX_PARSE_CHARS or _UNPARSABLE.search(answer):
        return (answer,)
    readings = _math_verify()[0]("\\boxed{" + answer + "}")
    try:
        return tuple(r for r in readings if isinstance(r, str) or _digits(r) <= _MAX_DIGITS) or (answer,)
    except (TypeError, ValueError, OverflowError):  # a value that is no number (zoo), or past a float
        return tuple(r for r in readings if isinstance(r, str)) or (answer,)


def _equivalent(pred: str, gold) -> bool:
    """Whether an answer equals the gold one (or a gold solution's) as a string or, in time, for Math-Verify."""
    gold = str(gold).strip()  # str(): SVAMP stores answers as floats
    gold = (extract_answer(gold) or "") if _MARKER.search(gold) else _value(gold)
    pred, gold = " ".join(pred.split()), " ".join(gold.split())
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(gold):  # what Math-Verify would say, ~1000x sooner
        return int(pred) == int(gold)
    verify = _math_verify()[1]  # imports and warm-up stay outside the watchdog
    try:
        return _within(lambda: verify(list(_parse(gold)), list(_parse(pred))))
    except _OutOfTime:
        return False


def is_correct(response: str, gold) -> bool:
    """The training reward and the evaluation accuracy: the answer after the last final-answer marker is
    equivalent to the gold answer (or to the final answer of a gold worked solution)."""
    pred = extract_answer(response)
    return pred is not None and _equivalent(pred, gold)


def is_correct_lenient(response: str, gold) -> bool:
    """For evaluation's lenient_accuracy only, never a reward: as is_correct, but a response without any
    final-answer marker is judged by its last number (which pays truncated and degenerate text)."""
    if not isinstance(response, str) or extract_answer(response) is not None:
        return is_correct(response, gold)
    number = deque(_LAST_NUMBER.finditer(response), maxlen=1)
    return bool(number) and _equivalent(number[0].group(), gold)


# ---------------------------------------------------------------------------------------------
# Exact KL and log-probs from final hidden states
# ---------------------------------------------------------------------------------------------
# With Qwen's 151,936-token vocabulary, full (tokens x vocab) float32 logits for 16k tokens are ~10 GB per copy,
# and a naive autograd graph keeps several such copies (logits, log-softmax, probs) alive for backward. Here the
# logits only ever exist a chunk of positions at a time: forward saves its inputs, backward recomputes each chunk,
# so the extra memory is O(chunk x vocab) plus the gradients themselves.


def _logits(h, w, v):
    """Chunk logits (n, v) in >= float32: the matmul in the weights' dtype (bf16 speed), the softmax in fp32."""
    z = h.to(w.dtype) @ w[:v].t()
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _chunk(hs, ws, ht, wt, y, v):
    """One chunk: (p_s (n, v), log p_s - log p_t (n, v) or None, kl (n,), lp_s (n,))."""
    ls = F.log_softmax(_logits(hs, ws, v), -1)
    p, idx, ok = ls.exp(), y.clamp(min=0)[:, None], y >= 0  # y < 0: padding, ignored
    lps, d, kl = ls.gather(1, idx)[:, 0] * ok, None, ls.new_zeros(len(ls))
    if ht is not None:
        d = F.log_softmax(_logits(ht, wt, v), -1).neg_().add_(ls)  # in the teacher's buffer: log p_s - log p_t
        kl = (p * d).sum(-1)  # elementwise, not bmm: a TF32-enabled matmul would cost KL precision
    return p, d, kl, lps


class _ChunkedKL(torch.autograd.Function):
    """hs (N, H_s) with ws (V_s, H_s); teacher ht (N, H_t) with wt (V_t, H_t), or both None; tokens (N,) long.
    Returns kl, lp_s, each (N,). Saves only the inputs; backward recomputes every chunk's logits under the forward's
    autocast state, so that its gradient is that of the logits the forward used (bf16 matmuls under bf16 autocast)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, tokens, chunk, v):
        slices = [slice(i, i + chunk) for i in range(0, max(len(hs), 1), chunk)]  # max: an empty input has outputs too
        parts = [_chunk(hs[s], ws, None if ht is None else ht[s], wt, tokens[s], v) for s in slices]
        ctx.save_for_backward(hs, ws, ht, wt, tokens)
        device = hs.device.type
        ctx.chunk, ctx.v = chunk, v
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device))
        ctx.autocast["enabled"] = torch.is_autocast_enabled(device)
        return tuple(torch.cat(o) for o in list(zip(*parts))[2:4])

    @staticmethod
    def backward(ctx, g_kl, g_lp):
        hs, ws, ht, wt, y = ctx.saved_tensors
        chunk, v = ctx.chunk, ctx.v
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.zeros_like(hs) if need_h else None
        # fp32 accumulator so that many bf16 chunk products do not lose precision when summed
        accumulator = torch.promote_types(ws.dtype, torch.float32)
        gw = torch.zeros(ws.shape, dtype=accumulator, device=ws.device) if need_w else None
        for i in range(0, len(hs), chunk):
            sl, yc = slice(i, i + chunk), y[i : i + chunk]
            # the teacher's chunk logits only where the KL carries gradient (not for GRPO or non-violators)
            teacher_needed = ht is not None and bool(g_kl[sl].any())
            with torch.autocast(**ctx.autocast):  # the forward's logits, in the forward's precision
                p, d, kl, _ = _chunk(hs[sl], ws, ht[sl] if teacher_needed else None, wt, yc, v)
            # dKL/dz = p * (d - KL);  d lp(y)/dz = onehot(y) - p  ->  dz = p * (gk (d - KL) - gl) + gl onehot(y)
            gz = torch.zeros_like(p) if d is None else d.sub_(kl[:, None]).mul_(g_kl[sl, None].to(p.dtype))
            gl = g_lp[sl].to(p.dtype) * (yc >= 0)
            gz = gz.sub_(gl[:, None]).mul_(p).scatter_add_(1, yc.clamp(min=0)[:, None], gl[:, None]).to(ws.dtype)
            if need_h:
                gh[sl] = (gz @ ws[:v]).to(hs.dtype)
            if need_w and gw.dtype == ws.dtype:
                gw[:v].addmm_(gz.t(), hs[sl].to(ws.dtype))  # in place: no (V, H) temporary
            elif need_w:
                gw[:v] += gz.t() @ hs[sl].to(ws.dtype)  # bf16 GEMM speed, fp32 accumulation across chunks
        return gh, None if gw is None else gw.to(ws.dtype), None, None, None, None, None


def kl_from_hidden(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    tokens,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
):
    """Exact reverse KL from final (post-norm) hidden states without materialising full logits.
    student_hidden (N, H_s), student_weight (V_s, H_s), teacher_hidden (N, H_t), teacher_weight (V_t, H_t),
    tokens (N,) ids < vocab_size (< 0: padding, ignored); leading batch dimensions are allowed. Both softmaxes run
    over the first vocab_size rows: the tokenizer's real ids (`len(tokenizer)`; Qwen2.5 pads its matrices to
    151,936 / 152,064 rows for 151,665 tokens); None: min(V_s, V_t).
    Returns (kl, student_logprobs), each shaped like tokens, float32; gradients flow through both to student_hidden
    and student_weight (in their dtypes); the teacher is constant."""
    v = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0])
    hs, ht = (h.reshape(-1, h.shape[-1]) for h in (student_hidden, teacher_hidden.detach()))
    outs = _ChunkedKL.apply(hs, student_weight, ht, teacher_weight.detach(), tokens.reshape(-1), chunk_size, v)
    return tuple(o.reshape(tokens.shape) for o in outs)


def token_logprobs_from_hidden(hidden, weight, tokens, chunk_size: int = 1024, vocab_size: int | None = None):
    """log pi(tokens) (N,) float32 from final hidden states (N, H) and the output matrix (V, H), over the first
    vocab_size rows, a chunk at a time (no full logits); differentiable; tokens < 0 give 0."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    _, lp = _ChunkedKL.apply(hidden, weight, None, None, tokens.reshape(-1), chunk_size, vocab_size or weight.shape[0])
    return lp.reshape(tokens.shape)


# ---------------------------------------------------------------------------------------------
# Generation, scoring and evaluation
# ---------------------------------------------------------------------------------------------


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


def vocab_size(tokenizer, *models) -> int:
    """The tokenizer's real ids, `len(tokenizer)`: the only ids sampled, scored and compared by the KL. Output
    matrices may be wider (Qwen2.5-1.5B: 151,936 rows, -7B: 152,064, for 151,665 tokens); narrower is an error."""
    size = len(tokenizer)
    for model in models:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < size:
            raise InputError(
                f"{model.name_or_path}: its output layer has {rows} rows, fewer than the tokenizer's {size} tokens"
            )
    return size


def shared_prompt_cache(model, ids, attention, positions, rows):
    """Run the distinct prompts (n, P) through the decoder once into a KV cache, then copy it to the rows that share
    them (rows[i]: the prompt of row i): (the prompts' final hidden states (n, P, H), a cache of len(rows) rows).
    Differentiable: gradients reach the prompts' pass through the copies."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state
    cache.reorder_cache(rows)
    return hidden, cache


SAMPLERS = ("dynamic", "static")
_STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> ((rows, length, dtype, device), its one StaticCache)


def longest_prompt_tokens(tokenizer, problems: list[dict]) -> int:
    """Tokens of the longest rendered prompt of `problems`: a run's prompt cap for the static sampler (the training
    and evaluation problems together, so that every generate call of the run uses one cache length)."""
    prompts = [render_prompt(tokenizer, p["question"]) for p in problems]
    return max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])


def static_compile_config(device: torch.device, backend: str = "auto"):
    """How the static sampler compiles its decode step: a transformers CompileConfig, or None (no compilation) for
    'none' and for 'auto' off CUDA (the static cache runs eagerly on CPU). 'auto' on CUDA: 'inductor' where a C compiler
    and Python's headers are there to build its kernels, else 'cudagraphs'; 'inductor' on CUDA runs in mode
    'reduce-overhead' (its kernels replayed as CUDA graphs). One graph of fixed shapes: fullgraph (a graph break fails
    at the first call instead of silently splitting the CUDA graph), dynamic=False (the cache length and the batch are
    fixed for a run)."""
    from transformers import CompileConfig

    if backend == "auto":
        if device.type != "cuda":
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        headers = Path(sysconfig.get_paths()["include"], "Python.h").is_file()
        backend = "inductor" if compiler and headers else "cudagraphs"
    if backend == "none":
        return None
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = device.type != "cuda"  # transformers compiles only on accelerators unless told
    return config


def _static_cache(model, rows: int, length: int):
    """The model's one StaticCache of `rows` x `length` positions, emptied: kept between calls so that its tensors
    keep their addresses (a CUDA graph replays on them; new ones would make it re-record), replaced when the shape
    or the compute dtype (autocast's, else the weights') changes."""
    from transformers import StaticCache

    device = model.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
    key = (rows, length, dtype, device)
    held = _STATIC_CACHES.get(model)
    if held is None or held[0] != key:
        held = (key, StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length))
        _STATIC_CACHES[model] = held
    held[1].reset()
    return held[1]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    sampler: str = "dynamic",
    max_prompt_tokens: int | None = None,
    compile_config="auto",
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per prompt; the response ends at its first eos (kept) or at max_new_tokens. Runs in
    eval mode; the G copies of a prompt (consecutive, as in training) share one prefill.

    Sampling is from the model's plain softmax over the tokenizer's real ids at `temperature` (0 = greedy) and from
    nothing else, so that samples are on-policy for the distribution that the policy gradient differentiates and the KL
    compares: the checkpoint's generation_config is set aside for the call (its top-k, top-p, penalties, bans, minimum
    lengths, biases, ... would each make the samples off-policy), and padding rows of a wider output matrix are
    suppressed.

    sampler 'dynamic': a KV cache that grows with the response; 'static': the model's one cache of batch_size x
    (max_prompt_tokens + max_new_tokens) positions, kept between calls, and the decode step compiled once for that
    shape (compile_config: a transformers CompileConfig, None, or 'auto': `static_compile_config`). Prompts keep their
    chunk's own width (the decode step's shapes depend on the cache length and the batch only); a short chunk is padded
    with dummy rows (copies of its last prompt, done after one token, dropped). On CPU in float32 both samplers give
    the same tokens (tests/test_sampler.py) except at temperature > 0 in a short chunk, whose dummy rows draw random
    numbers too; compiled GPU kernels round differently, so in bf16 they agree on most tokens, not all
    (benchmark/bench_sampler.py). max_prompt_tokens (static only): a run's prompt cap (`longest_prompt_tokens`; a
    longer prompt is refused); None: the longest prompt of this call.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    static = sampler == "static"
    eos = eos_token_ids(model, tokenizer)
    # top_k=0 and top_p=1.0 must be explicit: unset values fall back to transformers' defaults (top-k 50)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    )
    padding_rows = list(range(len(tokenizer), model.get_output_embeddings().weight.shape[0]))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=padding_rows or None,
        use_cache=True,
        **sampling,
    )
    if static:
        cap = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]) if prompts else 0
        if max_prompt_tokens is not None and cap > max_prompt_tokens:
            raise InputError(
                f"a prompt of {cap} tokens is longer than the static sampler's cap of {max_prompt_tokens} tokens "
                "(max_prompt_tokens): raise the cap to the longest prompt of the run, or use the dynamic sampler"
            )
        cache_length = (max_prompt_tokens or cap) + max_new_tokens
        compile_config = static_compile_config(model.device) if compile_config == "auto" else compile_config
        config.compile_config, config.disable_compile = compile_config, compile_config is None

    was_training, checkpoint_config = model.training, model.generation_config
    # transformers fills every field left unset in `config` from model.generation_config (generate's
    # _prepare_generation_config): a blank one for the call leaves only `config` and transformers' neutral defaults
    model.generation_config = GenerationConfig()
    model.eval()
    pairs = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            real = len(chunk)
            # the G copies of a group's prompt share one prefill: each distinct prompt (but its last token) runs once,
            # its KV cache is copied to every copy, and generate() goes on from the last prompt token
            shared = len(set(chunk)) < real
            if static:
                chunk = chunk + chunk[-1:] * (batch_size - real)
            distinct = list(dict.fromkeys(chunk))
            row = {p: k for k, p in enumerate(distinct)}
            copies = torch.tensor([row[p] for p in chunk], device=model.device)  # prompt row of each row
            enc = tokenizer(distinct, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            enc = enc.to(model.device)
            cache, stopping = None, StoppingCriteriaList()
            if static:
                cache = _static_cache(model, batch_size, cache_length)
                dummy = torch.arange(batch_size, device=model.device) >= real  # (batch_size,) rows padding the chunk
                stopping.append(lambda input_ids, scores, **kwargs: dummy)  # done after their first token
            if shared and enc["input_ids"].shape[1] > 1:
                mask = enc["attention_mask"][:, :-1]
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                _, prefix = shared_prompt_cache(model, enc["input_ids"][:, :-1], mask, positions, copies)
                if static:  # the shared prefix into the static cache (each layer's first update sizes its tensors)
                    for layer, source in zip(cache.layers, prefix.layers):
                        layer.update(source.keys, source.values)
                else:
                    cache = prefix
            enc = {k: v[copies] for k, v in enc.items()}
            out = model.generate(**enc, past_key_values=cache, generation_config=config, stopping_criteria=stopping)
            responses = out[:real, enc["input_ids"].shape[1] :].tolist()
            for ids, row_mask, response in zip(enc["input_ids"][:real], enc["attention_mask"][:real], responses):
                end = next((j + 1 for j, t in enumerate(response) if t in eos), len(response))  # the first eos, kept
                pairs.append((ids[row_mask.bool()].tolist(), response[:end]))
    finally:
        model.generation_config = checkpoint_config
        model.train(was_training)
    return pairs


def pad_sequences(
    pairs: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-pad prompts and right-pad responses into one batch: input_ids, attention_mask, position_ids (B, T + 1)
    and response_mask (B, T), 1 where the next-token target input_ids[:, 1:] is a response token (an action)."""
    prompt_len, response_len = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    input_ids = torch.full((len(pairs), prompt_len + response_len), pad_id, dtype=torch.long)
    attention_mask, response_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(pairs):
        input_ids[i, prompt_len - len(p) : prompt_len + len(r)] = torch.tensor(p + r)
        attention_mask[i, prompt_len - len(p) : prompt_len + len(r)] = 1
        response_mask[i, prompt_len : prompt_len + len(r)] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return {k: v.to(device) for k, v in batch.items()} | {"response_mask": response_mask[:, 1:].to(device)}


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (post-norm) hidden states (N, H) at the N positions that predict a response token: the lm_head input
    where the KL and log-probs are needed, without (B, L, V) logits. Differentiable when called with grad enabled.

    The G responses of a group share their prompt (the batch's first P columns, left-padded alike), whose keys and
    values do not depend on what follows: each distinct prompt runs once, its KV cache is copied to its copies, and
    only the responses run per row: B/G x P + B x R positions instead of B x (P + R); the same hidden states up to
    float rounding (tests/test_common.py), gradients flowing back through the shared cache."""
    decoder, mask = model.get_decoder(), batch["response_mask"].bool()
    ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    P = int(mask.any(0).int().argmax()) + 1  # the first response column (response_mask is shifted by one)
    # rows: the distinct prompt of each row (ids and mask, so that a pad id inside a prompt cannot merge two prompts)
    prompts, rows = torch.unique(torch.cat([ids[:, :P], attention[:, :P]], 1), dim=0, return_inverse=True)
    # one plain pass, no cache, when every prompt differs (evaluation) or under gradient checkpointing (its layers drop
    # the cache in training, and the responses would run without their prompt)
    if len(prompts) == len(ids) or (model.is_activation_checkpointing and model.training):
        hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
        return hidden.last_hidden_state[:, :-1][mask]
    first = torch.zeros(len(prompts), dtype=torch.long, device=ids.device)
    first.scatter_(0, rows, torch.arange(len(ids), device=ids.device))  # a row of each distinct prompt
    prompt, cache = shared_prompt_cache(model, ids[first, :P], attention[first, :P], positions[first, :P], rows)
    response = decoder(
        input_ids=ids[:, P:],
        attention_mask=attention,
        position_ids=positions[:, P:],
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B, R, H)
    hidden = torch.cat([prompt[rows, -1:], response], 1)  # positions P-1 .. L-1, the only ones that predict responses
    return hidden[:, :-1][mask[:, P - 1 :]]


def score(student, batch: dict[str, torch.Tensor], teacher_hidden, teacher_weight, chunk_size: int, vocab_size: int):
    """Per-token reverse KL to the teacher and the student's log-probs of the taken tokens, each (B, T) and zero off
    the response, from the student's final hidden states and the teacher's, teacher_hidden (N, H_t) =
    final_hidden(teacher, batch), computed once per batch by the caller. Differentiable w.r.t. the student under
    grad."""
    mask = batch["response_mask"].bool()
    hidden, weight = final_hidden(student, batch), student.get_output_embeddings().weight
    tokens = batch["input_ids"][:, 1:][mask]
    outs = kl_from_hidden(hidden, weight, teacher_hidden, teacher_weight, tokens, chunk_size, vocab_size)
    return tuple(torch.zeros(mask.shape, dtype=o.dtype, device=o.device).masked_scatter(mask, o) for o in outs)


def sequence_costs(kl_per_token: torch.Tensor, mask: torch.Tensor, constraint: str) -> torch.Tensor:
    """phi(y), the constrained cost of each response (B,), from per-token costs c_t = kl_per_token (B, T) and the
    response mask (B, T): 'sum': sum_t c_t (the paper's, nats per response); 'mean': (1/T) sum_t c_t (nats per
    token); 'prefix': max over t of (1/t) sum_{i<=t} c_i (any prefix mean above the budget violates). Differentiable:
    the training scripts' explicit term differentiates it, evaluation scores responses with it."""
    mask = mask.to(kl_per_token.dtype)
    total = (kl_per_token * mask).sum(1)
    if constraint == "sum":
        return total
    if constraint == "mean":
        return total / mask.sum(1).clamp(min=1)
    prefix_means = (kl_per_token * mask).cumsum(1) / mask.cumsum(1).clamp(min=1)
    return prefix_means.masked_fill(mask == 0, float("-inf")).max(1).values.clamp(min=0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    problems: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    teacher=None,
    budget: float | None = None,
    constraint: str = "mean",
    kl_chunk_size: int = 1024,
    seed: int = 0,
    progress: bool = False,
    sampler: str = "dynamic",
    max_prompt_tokens: int | None = None,
) -> tuple[list[dict], dict]:
    """Generate (greedy, or sampled at `temperature`), grade and, with a teacher, score each response: its mean
    per-token KL and its cost under `constraint` (as in training: `sequence_costs`). Returns per-problem records
    and a summary (accuracy; with a teacher mean KL, mean cost, cost quantiles and CSR at `budget`).
    sampler, max_prompt_tokens: as in `generate` (None: the longest of these prompts, one cache length for all)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    prompts = [render_prompt(tokenizer, p["question"]) for p in problems]
    if sampler == "static" and max_prompt_tokens is None and problems:
        max_prompt_tokens = longest_prompt_tokens(tokenizer, problems)
    options = dict(sampler=sampler, max_prompt_tokens=max_prompt_tokens)
    vocab = vocab_size(tokenizer, model, *([teacher] if teacher is not None else []))
    records, was_training = [], model.training
    for i in tqdm(range(0, len(prompts), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = prompts[i : i + batch_size]
        pairs = generate(model, tokenizer, chunk, max_new_tokens, temperature, batch_size, **options)
        mean_kls = costs = [None] * len(pairs)
        if teacher is not None:
            batch = pad_sequences(pairs, tokenizer.pad_token_id, model.device)
            teacher_hidden, teacher_weight = final_hidden(teacher, batch), teacher.get_output_embeddings().weight
            kl, _ = score(model.eval(), batch, teacher_hidden, teacher_weight, kl_chunk_size, vocab)
            model.train(was_training)
            mean_kls = masked_mean(kl, batch["response_mask"], dim=1).tolist()
            costs = sequence_costs(kl, batch["response_mask"], constraint).tolist()
        for problem, prompt, (_, response_ids), mean_kl, cost in zip(
            problems[i : i + batch_size], chunk, pairs, mean_kls, costs
        ):
            response, gold = tokenizer.decode(response_ids, skip_special_tokens=True), problem["answer"]
            record = dict(prompt=prompt, response=response, extracted=extract_answer(response), gold=gold)
            record.update(correct=is_correct(response, gold), lenient_correct=is_correct_lenient(response, gold))
            records.append(record | dict(mean_kl=mean_kl, cost=cost, response_tokens=len(response_ids)))
    if not records:
        return records, dict(n=0)
    columns = {key: np.array([r[key] for r in records]) for key in ("correct", "lenient_correct", "response_tokens")}
    summary = dict(n=len(records), accuracy=float(columns["correct"].mean()))
    summary["lenient_accuracy"] = float(columns["lenient_correct"].mean())  # never a reward
    summary["mean_response_tokens"] = float(columns["response_tokens"].mean())
    if teacher is not None:
        kls, costs = np.array([r["mean_kl"] for r in records]), np.array([r["cost"] for r in records])
        quantiles = {f"cost_p{q}": float(np.quantile(costs, q / 100)) for q in (50, 90, 95)}
        summary.update(mean_kl=float(kls.mean()), max_kl=float(kls.max()), constraint=constraint)
        summary.update(mean_cost=float(costs.mean()), **quantiles, budget=budget)
        if budget is not None:
            summary["csr"] = float((costs <= budget).mean())
    return records, summary


# ---------------------------------------------------------------------------------------------
# Runs: seeding, run folder, metrics, checkpoints
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def make_run_dir(args, run_dir: Path | None = None, config_name: str = "config.json") -> Path:
    """runs/{exp_name}__{seed}__{unix_time}/ with config.json (args, argv, versions, commit); a resume
    writes its own config_resume_{step}.json into the existing run folder."""
    import transformers

    if run_dir is None:
        run_dir = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(args=asdict(args), argv=sys.argv, git_commit=git_commit(), python=sys.version.split()[0])
    config.update(torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__)
    write_json(run_dir / config_name, config)
    return run_dir


def write_json(path: Path, obj) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, records: list[dict] | dict) -> None:
    with open(path, "a") as f:
        for record in [records] if isinstance(records, dict) else records:
            f.write(json.dumps(record, default=float) + "\n")


def truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume, drop records logged after the checkpoint so that each step is logged once."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", -1) <= max_step]
        path.write_text("".join(line + "\n" for line in kept))


def save_checkpoint(path: Path, model, tokenizer, trainer_state: dict, args) -> None:
    """Weights (safetensors), tokenizer, args and trainer state, written to a temp dir then renamed."""
    tmp, old = Path(f"{path}.tmp"), Path(f"{path}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "args.json", asdict(args))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state: step, optimizer state (and a script's own entries, e.g. the Lagrange multiplier),
    loaded with weights_only so that no pickled code runs. RNG states are not kept: every random draw is seeded
    from (--seed, step), so a resumed run samples what an uninterrupted one would."""
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True, map_location="cpu")


def make_writer(run_dir: Path, args, purge_step: int | None = None):
    """TensorBoard's SummaryWriter in the run folder and, with --track, a W&B run that syncs its scalars (CleanRL's
    `sync_tensorboard=True`). One W&B run per run folder: a resume continues it; purge_step hides the events logged
    after the checkpoint, as truncate_jsonl drops them from metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        run_id = re.sub(r"[^\w-]", "-", run_dir.name)
        options = dict(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args), sync_tensorboard=True)
        wandb.init(name=run_dir.name, dir=str(run_dir), id=run_id, resume="allow", **options)
    return SummaryWriter(str(run_dir), purge_step=purge_step)


def log_metrics(writer, run_dir: Path, record: dict) -> None:
    """record: {"step": int, "train/reward": float, ...} to metrics.jsonl and, under the same keys, to TensorBoard (and
    so to W&B)."""
    append_jsonl(run_dir / "metrics.jsonl", record)
    for key, value in record.items():
        if key != "step":
            writer.add_scalar(key, value, record["step"])
    writer.flush()


def close_writer(writer) -> None:
    writer.close()
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


# ---------------------------------------------------------------------------------------------
# Training plumbing shared by the training scripts: dropout, seeds, data parallelism, diagnostics
# ---------------------------------------------------------------------------------------------


def disable_dropout(model) -> None:
    """Zero every dropout, so the update's forward scores the policy that sampled (as TRL's GRPO does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # Llama/Qwen attention applies dropout functionally
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, step, chunk, ...): sampling depends on the generation chunk, not on the process."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _collective_device() -> torch.device | None:
    """Where this process's collectives run, None outside a process group (a plain `python script.py` run, or after
    destroy_distributed): nccl's on the current CUDA device (init_distributed set it to cuda:LOCAL_RANK), gloo's on
    the CPU. Read from torch.distributed itself, so no module state can disagree with the process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on CUDA, one GPU
    per process (cuda:LOCAL_RANK); gloo on CPU. A plain `python script.py` run is rank 0 of 1 and never touches
    torch.distributed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world_size == 1:
        return 0, 1, resolved
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)  # nccl's collectives, and _collective_device, use the current device
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, resolved


def barrier() -> None:
    if _collective_device() is not None:
        dist.barrier()


def destroy_distributed() -> None:
    """Leave the process group at the end of a torchrun run, all ranks together, as torch.distributed asks: ranks
    that exited with it alive were seen to abort at interpreter exit after their last checkpoint."""
    if _collective_device() is not None:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (x itself in a single process); returned on x's device."""
    if (device := _collective_device()) is None:
        return x
    y = x.detach().to(device).clone()
    dist.all_reduce(y)
    return y.to(x.device)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, in rank order, along dim 0 (same shape on every rank); x in a single process."""
    if (device := _collective_device()) is None:
        return x
    parts = [torch.empty_like(x, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().to(device).contiguous())
    return torch.cat(parts).to(x.device)


def sync_gradients(model, bucket_bytes: int = 256 * 2**20) -> None:
    """Sum each gradient over ranks. Every rank normalises its loss by the global token and response counts, so the
    sum is the gradient of the whole batch's loss (explicit all-reduce as in CleanRL's multi-GPU PPO; DDP's hooks
    would not see the calls that bypass forward()). Gradients travel flattened in buckets of at most bucket_bytes of
    consecutive parameters of one dtype and device, one all-reduce each, instead of one per parameter (a Qwen model
    has ~340 tensors) or one flat copy of all (6.2 GB in fp32 for a 1.5B model): 256 MiB bounds the transient copy to
    ~4% of a 1.5B model's fp32 gradients in ~25 collectives, each far past the few tens of MB at which an all-reduce
    reaches its full bandwidth (DDP's 25 MB default lets buckets start during the backward; this runs after it). A
    bucket of one gradient (one larger than bucket_bytes, say), contiguous and on the collectives' device, is reduced
    in place. A .grad that is None on every rank stays None; one that is None on some ranks only is made zeros there
    first (one small all-reduce of flags), so that all ranks build the same buckets. The sums are the per-parameter
    all-reduce's, element for element."""
    if (device := _collective_device()) is None:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    buckets, sizes = {}, {}  # (dtype, device) -> its buckets, each a list of gradients; the last one's bytes
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        key, nbytes = (p.grad.dtype, p.grad.device), p.grad.numel() * p.grad.element_size()
        if key not in buckets or sizes[key] + nbytes > bucket_bytes:
            buckets.setdefault(key, []).append([])
            sizes[key] = 0
        buckets[key][-1].append(p.grad)
        sizes[key] += nbytes
    for grads in (bucket for same_kind in buckets.values() for bucket in same_kind):
        if len(grads) == 1 and grads[0].device == device and grads[0].is_contiguous():
            dist.all_reduce(grads[0])
            continue
        flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


_DOT_CHUNK = 2**24  # elements: the fp32 copies of a bf16 gradient are made this many at a time (64 MB each)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x . y accumulated in float32 (0-dim, on x's device) for same-shaped tensors of any float dtype, without a
    whole-tensor float32 copy of a bf16/fp16 one."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.dtype == y.dtype == torch.float32:
        return torch.dot(x, y)
    parts = zip(x.split(_DOT_CHUNK), y.split(_DOT_CHUNK))
    return torch.stack([torch.dot(a.float(), b.to(device=a.device, dtype=torch.float32)) for a, b in parts]).sum()


def backward_with_diagnostics(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, float]:
    """The backward of the sum of two loss terms, as `(loss_a + loss_b).backward()`, that also measures what drives
    the update: each term's gradient norm on this micro-batch and the cosine of their sum with each (a term that
    swamps the other shows as a cosine near 1): losses/{a}_grad_norm, losses/{b}_grad_norm, losses/cos_total_{a},
    losses/cos_total_{b}. A term that does not require grad (a constant, e.g. no violators) has gradient 0.

    No gradient-sized copy: loss_a's backward (graph kept) leaves a in .grad, where |a|^2 is read; hooks on the
    parameters then see each b_p before autograd adds it to .grad and sum b_p . b_p and a_p . b_p (in float32), and
    loss_b's backward leaves a + b in .grad. Costs one extra backward of this micro-batch, and the graph stays whole
    through loss_a's backward. Checked: .grad is None or zero on entry (a step's first micro-batch, after zero_grad),
    and each parameter gets its gradient in one piece per backward (a tied embedding: one hook call with the sum; not
    so under reentrant activation checkpointing, while transformers' default is non-reentrant)."""
    (name_a, loss_a), (name_b, loss_b) = terms.items()
    params = list({id(p): p for p in params if p.requires_grad}.values())  # one hook per tensor
    held = [i for i, p in enumerate(params) if p.grad is not None and bool(p.grad.any())]
    if held:
        raise ValueError(
            f"backward_with_diagnostics needs every gradient None or zero on entry, but {len(held)} parameter(s) "
            f"(the first: number {held[0]}) hold one: call it on the step's first micro-batch, after zero_grad()."
        )
    aa, bb, ab, calls = [], [], [], {}  # float32 0-dim tensors per parameter: |a_p|^2, |b_p|^2, a_p . b_p

    if loss_a.requires_grad:
        loss_a.backward(retain_graph=loss_b.requires_grad)
        aa = [_dot(p.grad, p.grad) for p in params if p.grad is not None]

    def hook(p):
        def measure(b):  # b: this parameter's whole gradient of loss_b, not yet added to p.grad
            calls[id(p)] = calls.get(id(p), 0) + 1
            bb.append(_dot(b, b))
            if p.grad is not None:
                ab.append(_dot(b, p.grad))

        return measure

    if loss_b.requires_grad:
        handles = [p.register_hook(hook(p)) for p in params]
        try:
            loss_b.backward()
        finally:
            for handle in handles:
                handle.remove()
    if any(n > 1 for n in calls.values()):
        raise RuntimeError(
            "backward_with_diagnostics saw a parameter's gradient arrive in parts (reentrant activation "
            "checkpointing?), so its norms would be wrong; use non-reentrant checkpointing."
        )
    aa, bb, ab = (sum(t.item() for t in parts) for parts in (aa, bb, ab))
    total = max(aa + bb + 2 * ab, 0.0) ** 0.5  # norm of the sum, from the three dot products
    return {
        f"losses/{name_a}_grad_norm": aa**0.5,
        f"losses/{name_b}_grad_norm": bb**0.5,
        f"losses/cos_total_{name_a}": (aa + ab) / max(total * aa**0.5, 1e-30),
        f"losses/cos_total_{name_b}": (bb + ab) / max(total * bb**0.5, 1e-30),
    }


# ---------------------------------------------------------------------------------------------
# LoRA through PEFT (--lora-rank > 0): adapters injected in place (transformers' PEFT integration), so the scripts'
# forward calls and the exact KL on the frozen output layer run unchanged, and save_pretrained writes the adapter
# alone in PEFT's format, whose base_model_name_or_path lets load_model rebuild base + adapter (eval, --resume)
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention and MLP
_EMBEDDING_NAMES = ("lm_head", "embed_tokens", "embed_out", "wte", "word_embeddings")


def _refuse_embedding_targets(targets: tuple[str, ...], embeddings) -> None:
    """The one refusal of LoRA on the output layer or the embeddings: a target that names one of `embeddings`
    (module names, or the usual bare names before the model loads), as PEFT matches them (a module matches a target
    equal to its name or to a dotted suffix of it)."""
    for target in targets:
        for module in embeddings:
            if target == module or module.endswith("." + target) or target.endswith("." + module):
                raise InputError(
                    f"--lora-target-modules {target}{'' if module == target else f' (the module {module})'}: the exact "
                    "KL reads the output layer's weight directly and it may be tied to the embeddings, so LoRA targets "
                    f"neither; pick projections, e.g. {' '.join(LORA_TARGETS)}"
                )


def check_lora_args(rank: int, alpha: float, targets: tuple[str, ...], student: str) -> None:
    """Reject LoRA settings before anything loads (add_lora checks the targets again on the loaded model)."""
    if rank < 0 or alpha <= 0:
        raise InputError(
            f"--lora-rank must be >= 0 (0 = full fine-tuning) and --lora-alpha > 0, got {rank} and {alpha}"
        )
    if not rank:
        return
    if importlib.util.find_spec("peft") is None:
        raise InputError(
            "--lora-rank needs PEFT, which is not installed: pip install -r requirements-lora.txt (peft==0.21.2)"
        )
    if student.endswith(".gguf"):
        raise InputError(
            f"--lora-rank with the GGUF student {student}: its adapter could not name a base to reload; "
            "save the model as a folder first (save_pretrained)"
        )
    if not targets or not all(t.strip() for t in targets):
        got = " ".join(map(repr, targets)) or "nothing"
        raise InputError(
            f"--lora-target-modules must name one module or more, none of them empty, got {got}; "
            f"e.g. {' '.join(LORA_TARGETS)}"
        )
    _refuse_embedding_targets(targets, _EMBEDDING_NAMES)


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...]):
    """The model with LoRA adapters of `rank` on `targets` (dropout 0: the update's forward must score the policy that
    sampled), only the adapters trainable; a model loaded from a LoRA checkpoint keeps its adapter, made trainable.
    rank 0: the model unchanged (full fine-tuning)."""
    loaded = getattr(model, "_hf_peft_config_loaded", False)
    _refuse_other_lora_rank(model.peft_config["default"].r if loaded else 0, rank)
    if not rank:
        return model
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    _refuse_embedding_targets(targets, [name for name, module in model.named_modules() if module in embeddings])
    names = [name for name, _ in model.named_modules()]
    if not loaded and (missing := [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]):
        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        linear = sorted(linear - {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in embeddings})
        raise InputError(
            f"--lora-target-modules {missing[0]} matches no module of {model.name_or_path}; its linear layers other "
            f"than the output layer are {' '.join(linear)}"
        )
    if not loaded:
        from peft import LoraConfig

        if os.path.isdir(model.name_or_path):  # an absolute base path, so that the checkpoint reloads from anywhere
            model.name_or_path = os.path.abspath(model.name_or_path)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
        if param.requires_grad and param.dtype != torch.float32:  # adapters (and so their AdamW state) in float32,
            param.data = param.data.float()  # whatever the dtype of the frozen base
    return model
