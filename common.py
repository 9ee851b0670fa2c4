"""Shared plumbing for cmdp_distill.py, lagrangian_distill.py and eval_math.py.

Plumbing only: model/tokenizer loading, data loading and prompt rendering, the one answer grader
(training reward and evaluation accuracy), exact per-token KL and log-probs, batched generation,
evaluation, run directories, metrics and checkpoints. The methods themselves live in the scripts.
Importing this module has no side effects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
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
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None) or getattr(head, "bias", None) is not None:
        raise SystemExit(f"{path}: its logits are not final_hidden @ lm_head.weight (logit soft-capping or an lm_head bias), which the exact KL here assumes.")
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

_BOX = re.compile(r"\\(?:boxed|fbox)")
_TOKEN = re.compile(r"[^\s$]*")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")  # a full stop, not a decimal point
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is", re.IGNORECASE)
# Thousands groups are comma-led, so the repetition cannot overlap itself (no backtracking blow-up).
_LAST_NUM = re.compile(r"(?:(?<![\w)])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(_NUM)
_FRAC = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")  # 1\frac{4}{5} is a mixed number, 9/5
_MAX_NUM_CHARS = 200  # Fraction of a 100k-digit string is slow; longer answers compare as strings only
_SUBS = [  # (pattern, replacement), applied in order before unit and prefix handling
    (re.compile(r"\\!\s*|(?<!\\)\\[,;: ]|\\displaystyle"), ""),  # `\!` glues `11,\! 111`; `\\ ` is a row break
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|°"), ""),
    (re.compile(r"\\?[$%]"), ""),  # dollars and percent signs (50\% == 50, no /100 leniency)
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"[\u2212\u2013]"), "-"),
    (re.compile(r"\u2044"), "/"),
]
# A trailing unit: `10 \text{ cm}`, `15\mbox{ cm}^2`. Letters only, so `5 \text{ or 6}` keeps its text.
_UNIT = re.compile(r"\\(?:text|mbox|mathrm|textrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\s*\^\s*\{?[23]\}?)?$")
_WRAP = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
_PREFIX = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)\s*(?:=|\\in(?![a-zA-Z]))")  # `x =`, `\theta=`, `x \in`
_SPACE = re.compile(r"\s+")
_FIXES = [  # applied after spaces are gone
    (re.compile(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])"), r"\\frac{\1}{\2}"),  # \frac12, \frac 34
    (re.compile(r"\\frac([0-9a-zA-Z])\{"), r"\\frac{\1}{"),  # \frac9{19}
    (re.compile(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])"), r"\\frac\1{\2}"),  # \frac{270}7
    (re.compile(r"\\sqrt([0-9a-zA-Z])"), r"\\sqrt{\1}"),
    (re.compile(r"([_^])\{([0-9a-zA-Z]+)\}"), r"\1\2"),  # 4210_{5} -> 4210_5, x^{2} -> x^2
    (re.compile(r"(?<![\d.])\.(?=\d)"), "0."),
    (re.compile(r"^\+|^\(([A-Za-z])\)$"), r"\1"),  # +5 -> 5, (B) -> B
]
_MATRIX = re.compile(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}")


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    close: dict[int, int] = {}  # one linear pass matches every brace, however many boxes there are
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close[stack.pop()] = i
    for start in reversed(starts):
        j = start
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content = text[j + 1 : close[j]].strip() if j in close else ""
        elif j > start:  # `\boxed 5`: the next token
            content = _TOKEN.match(text, j).group().rstrip(".")
        else:  # `\boxedx` or `\fboxsep`: not a box
            content = ""
        if content and not _BOX.match(content):  # `\boxed \boxed` is no answer
            return content
    return None


def _tail(s: str) -> str:
    """The expression after a marker: up to the end of its line and sentence, without decorations."""
    s = s.split("\n", 1)[0]
    end = _SENTENCE_END.search(s)
    return (s[: end.start()] if end else s).lstrip(" \t:*").rstrip(" \t*.")  # keep `.5` whole


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):  # finditer is linear; keeping only the last match is O(1) memory
        pass
    return found


def extract_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = text.rfind("####")
    if hashes >= 0 and (ans := _tail(text[hashes + 4 :])):
        return ans
    if (said := _last(_ANSWER_IS, text)) and (ans := _tail(text[said.end() :])):
        return ans
    return number.group() if (number := _last(_LAST_NUM, text)) else None


def _normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip()
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    s = s.strip().rstrip(". ")
    unit = _UNIT.search(s)
    if unit and s[: unit.start()].strip():
        s = s[: unit.start()].strip()
    s = _WRAP.sub(r"\1", s).strip()
    if s.count("=") <= 1 and (prefix := _PREFIX.match(s)):
        s = s[prefix.end() :].strip()
    if _THOUSANDS.fullmatch(s):  # only a whole answer: `(1,234)` stays a pair, `1,234` is a number
        s = s.replace(",", "")
    s = _SPACE.sub("", s)
    for pattern, repl in _FIXES:
        s = pattern.sub(repl, s)
    return s


def _to_number(s: str) -> Fraction | None:
    if len(s) > _MAX_NUM_CHARS:
        return None
    try:
        if _PLAIN.fullmatch(s):
            return Fraction(s)
        if m := _FRAC.fullmatch(s) or _SLASH.fullmatch(s):
            groups = m.groups()
            value = Fraction(groups[-2]) / Fraction(groups[-1])
            return -value if groups[0] == "-" else value
        if m := _MIXED.fullmatch(s):
            value = int(m[2]) + Fraction(int(m[3]), int(m[4]))
            return -value if m[1] else value
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    return None


def _num_equal(a: Fraction, b: Fraction) -> bool:
    if a.denominator == 1 or b.denominator == 1:  # integers are exact: 1234567 != 1234568
        return a == b
    return abs(a - b) <= abs(b) * Fraction(1, 10**6)


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside any (), [], {} nesting (interval ends may be mixed, like `(3,4]`)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _bracketed(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) when the whole of `s` is one bracketed group, else None."""
    op = "\\{" if s.startswith("\\{") else s[:1]
    cl = "\\}" if s.endswith("\\}") else s[-1:]
    if op not in ("(", "[", "\\{") or cl not in (")", "]", "\\}") or len(s) < len(op) + len(cl):
        return None
    inner = s[len(op) : len(s) - len(cl)]
    depth = 0
    for ch in inner:  # the opening bracket must not close before the end: `(a+5)(b+2)` is no tuple
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return None
    return op, cl, inner


def _equal_lists(a: list[str], b: list[str], ordered: bool, depth: int) -> bool:
    if len(a) != len(b) or len(a) > 1000:  # a cap on work, far above any real answer
        return False
    if ordered or len(a) > 32:  # unordered matching is quadratic, so only for short lists
        return all(_equiv(x, y, depth + 1) for x, y in zip(a, b))
    unused = list(b)
    for x in a:
        hit = next((k for k, y in enumerate(unused) if _equiv(x, y, depth + 1)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _equiv(pred: str, gold: str, depth: int = 0) -> bool:
    a, b = _normalize(pred), _normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return _num_equal(x, y)
    if depth >= 4:  # elements nest at most a few levels deep in real answers; bounds recursion
        return False
    ma, mb = _MATRIX.fullmatch(a), _MATRIX.fullmatch(b)
    if ma or mb:
        if not (ma and mb and ma[1] == mb[1]):
            return False
        rows_a, rows_b = _split_top(ma[2], "\\\\"), _split_top(mb[2], "\\\\")
        return len(rows_a) == len(rows_b) and all(
            _equal_lists(_split_top(r, "&"), _split_top(t, "&"), True, depth) for r, t in zip(rows_a, rows_b))
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return _equal_lists(ua, ub, True, depth)
    ba, bb = _bracketed(a), _bracketed(b)
    if ba or bb:  # tuples, intervals, sets: the bracket kinds must agree
        if not (ba and bb and ba[:2] == bb[:2]):
            return False
        return _equal_lists(_split_top(ba[2], ","), _split_top(bb[2], ","), ba[0] != "\\{", depth)
    la, lb = _split_top(a, ","), _split_top(b, ",")
    return (len(la) > 1 or len(lb) > 1) and _equal_lists(la, lb, False, depth)


def is_correct(response: str, gold: str) -> bool:
    if not isinstance(response, str):  # e.g. None from a failed generation
        return False
    gold, pred = str(gold), extract_answer(response)  # str(): SVAMP stores float answers
    if "####" in gold or _BOX.search(gold):  # gold given as a full worked solution
        gold = extract_answer(gold) or ""
    return pred is not None and _equiv(pred, gold)

# ---------------------------------------------------------------------------------------------
# Exact KL and log-probs
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Exact per-token reverse KL(student || teacher), computed a chunk of positions
# at a time. Why: with Qwen's 151,936-token vocabulary, full [tokens x vocab]
# float32 logits for 16k tokens are ~10 GB per copy, and a naive autograd graph
# keeps several such copies (logits, log-softmax, probs, ...) alive for backward.
# Every path below saves only its inputs and recomputes each chunk in backward,
# so extra memory is O(chunk x vocab) plus the gradients themselves.
# ---------------------------------------------------------------------------


def _logits(h, w, v):
    """Chunk logits (n, v) in >= float32: h (n, H) @ w[:v].T, or h[:, :v] if w is None (h are logits)."""
    z = h[:, :v] if w is None else h.to(w.dtype) @ w[:v].t()  # matmul stays in the input dtype (bf16 speed)
    return z.to(torch.promote_types(z.dtype, torch.float32))  # softmax in fp32; fp64 kept for gradcheck


def _chunk(hs, ws, ht, wt, y, v):
    """One chunk -> (p_s (n, v), ls - lt (n, v) or None, kl (n,), lp_s (n,), lp_t (n,))."""
    ls = F.log_softmax(_logits(hs, ws, v), -1)
    p = ls.exp()
    zero = ls.new_zeros(ls.shape[0])
    d, kl, lps, lpt = None, zero, zero, zero
    idx, ok = (None, None) if y is None else (y.clamp(min=0)[:, None], y >= 0)  # y < 0: ignored (padding)
    if y is not None:
        lps = ls.gather(1, idx)[:, 0] * ok
    if ht is not None:
        lt = F.log_softmax(_logits(ht, wt, v), -1)
        if y is not None:
            lpt = lt.gather(1, idx)[:, 0] * ok
        d = lt.neg_().add_(ls)  # reuse lt's buffer: d = log p_s - log p_t
        kl = (p * d).sum(-1)  # elementwise, not bmm: a TF32-enabled matmul would cost KL precision
    return p, d, kl, lps, lpt


class _ChunkedKL(torch.autograd.Function):
    """hs (N, H_s) with ws (V_s, H_s), or student logits hs (N, V_s) with ws None; teacher likewise (may be
    None); tokens (N,) long or None. Returns kl, lp_s, lp_t, each (N,). Saves only the inputs; backward
    recomputes every chunk's logits, so activation memory is O(chunk x vocab), never O(N x vocab)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, tokens, chunk, v):
        outs = [torch.cat(o) for o in zip(*(
            _chunk(hs[i:i + chunk], ws, None if ht is None else ht[i:i + chunk], wt,
                   None if tokens is None else tokens[i:i + chunk], v)[2:]
            for i in range(0, max(hs.shape[0], 1), chunk)))]  # max: an empty input still yields outputs
        ctx.save_for_backward(hs, ws, ht, wt, tokens)
        ctx.chunk, ctx.v = chunk, v
        ctx.mark_non_differentiable(outs[2])  # teacher logprobs are constants
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_kl, g_lp, _):
        hs, ws, ht, wt, y = ctx.saved_tensors
        chunk, v = ctx.chunk, ctx.v
        need_h, need_w = ctx.needs_input_grad[0], ws is not None and ctx.needs_input_grad[1]
        gh = torch.zeros_like(hs) if need_h else None  # zeros: logit columns >= v get no gradient
        # fp32 accumulator so many bf16 chunk products do not lose precision when summed
        gw = torch.zeros(ws.shape, dtype=torch.promote_types(ws.dtype, torch.float32), device=ws.device) \
            if need_w else None
        for i in range(0, hs.shape[0], chunk):
            sl = slice(i, i + chunk)
            yc = None if y is None else y[sl]
            p, d, kl, _, _ = _chunk(hs[sl], ws, None if ht is None else ht[sl], wt, yc, v)
            # dKL/dz = p * (d - KL);  d lp(y)/dz = onehot(y) - p  ->  dz = p * (gk (d - KL) - gl) + gl onehot(y)
            gz = torch.zeros_like(p) if d is None else d.sub_(kl[:, None]).mul_(g_kl[sl, None].to(p.dtype))
            if y is not None:
                gl = g_lp[sl].to(p.dtype) * (yc >= 0)
                gz.sub_(gl[:, None]).mul_(p).scatter_add_(1, yc.clamp(min=0)[:, None], gl[:, None])
            else:
                gz.mul_(p)
            if ws is None:  # logits mode: gradient w.r.t. the logits themselves
                if need_h:
                    gh[sl, :v] = gz.to(hs.dtype)
                continue
            gzc = gz.to(ws.dtype)
            if need_h:
                gh[sl] = (gzc @ ws[:v]).to(hs.dtype)
            if need_w:
                hc = hs[sl].to(ws.dtype)
                if gw.dtype == ws.dtype:
                    gw[:v].addmm_(gzc.t(), hc)  # in place: no (V, H) temp
                else:
                    gw[:v] += gzc.t() @ hc  # bf16 GEMM speed, fp32 accumulation across chunks
        return gh, None if gw is None else gw.to(ws.dtype), None, None, None, None, None


def _flat(x):
    return x.reshape(-1, x.shape[-1])  # a view for contiguous inputs; vocab cut happens per chunk (no copy)


def kl_per_token(student_logits, teacher_logits, chunk_size: int = 1024):
    """Exact reverse KL(p_s || p_t) per position. student_logits (..., T, V_s), teacher_logits (..., T, V_t)
    -> (..., T) float32. Both cut to min(V_s, V_t) columns; teacher detached; chunk_size positions at a time."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    kl, _, _ = _ChunkedKL.apply(_flat(student_logits), None, _flat(teacher_logits.detach()), None, None,
                                chunk_size, v)
    return kl.reshape(student_logits.shape[:-1])


def token_logprobs(logits, tokens, chunk_size: int = 1024):
    """log_softmax(logits) (..., T, V) gathered at tokens (..., T) -> (..., T) float32; differentiable.
    Tokens < 0 (padding) give 0 and no gradient."""
    _, lp, _ = _ChunkedKL.apply(_flat(logits), None, None, None, tokens.reshape(-1), chunk_size, logits.shape[-1])
    return lp.reshape(tokens.shape)


def kl_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens,
                   chunk_size: int = 1024):
    """Exact reverse KL from final (post-norm) hidden states without materialising full logits.
    student_hidden (..., T, H_s), student_weight (V_s, H_s), teacher_hidden (..., T, H_t),
    teacher_weight (V_t, H_t), tokens (..., T) real ids < min(V_s, V_t) (< 0: padding, ignored).
    Returns (kl, student_logprobs, teacher_logprobs), each (..., T) float32; gradients flow through the
    first two to student_hidden and student_weight (in their dtypes); the teacher is constant."""
    v = min(student_weight.shape[0], teacher_weight.shape[0])
    outs = _ChunkedKL.apply(_flat(student_hidden), student_weight, _flat(teacher_hidden.detach()),
                            teacher_weight.detach(), tokens.reshape(-1), chunk_size, v)
    return tuple(o.reshape(tokens.shape) for o in outs)


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


def make_run_dir(args, run_dir: Path | None = None, config_name: str = "config.json") -> Path:
    """runs/{exp_name}__{seed}__{unix_time}/ with config.json (args, argv, versions, commit); a resume
    writes its own config_resume_{step}.json into the existing run folder."""
    import transformers

    if run_dir is None:
        run_dir = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(args=asdict(args), argv=sys.argv, git_commit=git_commit(), python=sys.version.split()[0],
                  torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__)
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
    """Optimizer state, step and RNG states; weights_only so that no pickled code runs."""
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True, map_location="cpu")
