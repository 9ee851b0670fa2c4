"""Shared plumbing for cmdp_distill.py, lagrangian_distill.py and eval_math.py.

Plumbing only: model/tokenizer loading, data loading and prompt rendering, the one answer grader
(training reward and evaluation accuracy), exact per-token KL and log-probs, batched generation,
evaluation, run directories, metrics and checkpoints. The methods themselves live in the scripts.
Importing this module has no side effects.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_path(path: str, what: str) -> None:
    """Fail before any loading on a path that is neither an existing file/folder nor a hub id."""
    if not os.path.exists(os.path.expanduser(path)) and (path.endswith(".gguf") or not _HUB_ID.fullmatch(path)):
        raise SystemExit(f"{what} {path!r} does not exist; pass a local model folder, a .gguf file, a hub id like Qwen/Qwen2.5-Math-1.5B-Instruct, or 'toy'.")


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
    return model.to(device)


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """The KL compares distributions id by id, so every student token must have the teacher's id."""
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    bad = [t for t, i in student_vocab.items() if teacher_vocab.get(t) != i]
    probe = "Natalia sold 48/2 = 24 clips in May.\n\\boxed{\\frac{1}{2}} #### 72 ünïcode"
    if bad or student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        example = f" (e.g. {bad[0]!r}: student id {student_vocab[bad[0]]}, teacher id {teacher_vocab.get(bad[0])})" if bad else ""
        raise SystemExit(f"teacher and student tokenizers differ{example}; distillation here needs the same token ids, so use models of one family.")


# ---------------------------------------------------------------------------------------------
# Data and prompts
# ---------------------------------------------------------------------------------------------

HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _problem_from_row(row: dict) -> dict:
    """One problem {question, answer} from a GSM8K, MATH or SVAMP row (KeyError if none fits)."""
    if "question" in row and "answer" in row:  # GSM8K: the gold is what follows the last ####
        return {"question": row["question"], "answer": str(row["answer"]).split("####")[-1].strip().replace(",", "")}
    if "problem" in row and "answer" in row:  # MATH / MATH-500
        return {"question": row["problem"], "answer": str(row["answer"])}
    if "Body" in row and "Question" in row and "Answer" in row:  # SVAMP
        answer = float(row["Answer"])
        return {"question": f"{row['Body'].strip()} {row['Question'].strip()}", "answer": str(int(answer)) if answer.is_integer() else str(answer)}
    raise KeyError("expected fields question/answer (GSM8K), problem/answer (MATH) or Body/Question/Answer (SVAMP)")


def check_dataset(name: str) -> None:
    if name not in ("toy", *HUB_DATASETS) and not Path(name).expanduser().is_file():
        raise SystemExit(f"dataset {name!r} is neither a known name ({', '.join(['toy', *HUB_DATASETS])}) nor an existing .jsonl/.json file.")


def load_problems(name: str, split: str = "test") -> list[dict]:
    """Problems as [{question, answer}] from a hub name (gsm8k, math500) or a .jsonl/.json file."""
    if name in HUB_DATASETS:
        import datasets

        repo, config = HUB_DATASETS[name]
        return [_problem_from_row(row) for row in datasets.load_dataset(repo, config, split=split)]
    check_dataset(name)
    path = Path(name).expanduser()
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}: line {lineno} is not valid JSON ({e.msg}).") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        rows = [(f"item {i}", row) for i, row in enumerate(data if isinstance(data, list) else [data])]
    else:
        raise SystemExit(f"dataset file {path} must end in .jsonl or .json, not {path.suffix!r}.")
    problems = []
    for where, row in rows:
        try:
            problems.append(_problem_from_row(row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SystemExit(f"{path}: {where} is not a problem: {e}.") from None
    if not problems:
        raise SystemExit(f"dataset file {path} holds no problems.")
    return problems


def render_prompt(tokenizer, question: str) -> str:
    """The chat template (with a step-by-step, \\boxed{} system prompt) if any, else a plain one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


# ---------------------------------------------------------------------------------------------
# Answer extraction and grading: the one grader, for the training reward and for evaluation
# ---------------------------------------------------------------------------------------------

from grader_section import extract_answer, is_correct  # noqa: E402  (merged below before release)

# ---------------------------------------------------------------------------------------------
# Exact KL and log-probs
# ---------------------------------------------------------------------------------------------

from kl_section import kl_from_hidden, kl_per_token, token_logprobs  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Generation, scoring and evaluation
# ---------------------------------------------------------------------------------------------


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per prompt; the response ends at its first eos (kept) or at max_new_tokens.

    Sampling is from the model's plain softmax at `temperature` (0 = greedy): top-k, top-p and
    repetition penalties from the checkpoint's generation_config are switched off, so sampled
    responses are on-policy for the distribution that the policy gradient differentiates.
    """
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    # top_k=0 and top_p=1.0 must be explicit: unset values fall back to the checkpoint's (Qwen: 20 and 0.8)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **sampling)
    was_training = model.training
    model.eval()
    pairs = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
        out = model.generate(**enc, generation_config=config)
        for row_ids, row_mask, row_out in zip(enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1] :]):
            response = row_out.tolist()
            ends = [j for j, t in enumerate(response) if t in eos]
            response = response[: ends[0] + 1] if ends else response
            pairs.append((row_ids[row_mask.bool()].tolist(), response))
    model.train(was_training)
    return pairs


def pad_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad prompts and right-pad responses into one batch.

    Returns input_ids, attention_mask, position_ids (B, L) and response_mask (B, L-1): 1 where the
    next-token target input_ids[:, 1:] is a response token (the policy's actions).
    """
    prompt_len = max(len(p) for p, _ in pairs)
    response_len = max(len(r) for _, r in pairs)
    batch = len(pairs)
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(pairs):
        input_ids[i, prompt_len - len(p) : prompt_len + len(r)] = torch.tensor(p + r)
        attention_mask[i, prompt_len - len(p) : prompt_len + len(r)] = 1
        response_mask[i, prompt_len : prompt_len + len(r)] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    tensors = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, response_mask=response_mask[:, 1:])
    return {k: v.to(device) for k, v in tensors.items()}


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (post-norm) hidden states (B, L, H): the lm_head input, without (B, L, V) logits."""
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).last_hidden_state


def score(student, teacher, batch: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token reverse KL to the teacher, student and teacher log-probs of the taken tokens, (B, L-1).

    Differentiable w.r.t. the student when called with grad enabled; the teacher never is.
    """
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, batch)[:, :-1]
    student_hidden = final_hidden(student, batch)[:, :-1]
    return kl_from_hidden(
        student_hidden, student.get_output_embeddings().weight, teacher_hidden, teacher.get_output_embeddings().weight,
        batch["input_ids"][:, 1:], chunk_size,
    )


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], *, max_new_tokens: int, batch_size: int, temperature: float = 0.0,
             teacher=None, budget: float | None = None, kl_chunk_size: int = 1024, seed: int = 0, progress: bool = False) -> tuple[list[dict], dict]:
    """Generate, grade and (with a teacher) score each response; returns per-problem records and a summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    prompts = [render_prompt(tokenizer, p["question"]) for p in problems]
    records = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="eval", disable=not progress, leave=False):
        pairs = generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature, batch_size)
        mean_kls = [None] * len(pairs)
        if teacher is not None:
            batch = pad_sequences(pairs, tokenizer.pad_token_id, model.device)
            kl = score(model, teacher, batch, kl_chunk_size)[0]
            mean_kls = masked_mean(kl, batch["response_mask"], dim=1).tolist()
        for problem, prompt, (_, response_ids), mean_kl in zip(problems[i : i + batch_size], prompts[i : i + batch_size], pairs, mean_kls):
            response = tokenizer.decode(response_ids, skip_special_tokens=True)
            records.append(dict(prompt=prompt, response=response, extracted=extract_answer(response), gold=problem["answer"],
                                correct=is_correct(response, problem["answer"]), mean_kl=mean_kl, response_tokens=len(response_ids)))
    summary = dict(n=len(records), accuracy=float(np.mean([r["correct"] for r in records])),
                   mean_response_tokens=float(np.mean([r["response_tokens"] for r in records])))
    if teacher is not None:
        kls = np.array([r["mean_kl"] for r in records])
        summary.update(mean_kl=float(kls.mean()), max_kl=float(kls.max()), budget=budget)
        if budget is not None:
            summary["csr"] = float((kls <= budget).mean())
    return records, summary


# ---------------------------------------------------------------------------------------------
# Runs: seeding, run directory, metrics, checkpoints
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def make_run_dir(args, run_dir: Path | None = None) -> Path:
    """runs/{exp_name}__{seed}__{unix_time}/ with config.json (args, argv, versions, commit)."""
    import transformers

    if run_dir is None:
        run_dir = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(args=asdict(args), argv=sys.argv, git_commit=git_commit(), python=sys.version.split()[0],
                  torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__)
    write_json(run_dir / "config.json", config)
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
    """Optimizer state, step and RNG states; weights_only so that no pickled code runs."""
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True, map_location="cpu")
