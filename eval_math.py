"""Math evaluation: greedy final-answer accuracy, and with a teacher the per-token KL and constraint satisfaction.

For each problem the model answers the rendered prompt (chat template with a step-by-step,
\\boxed{} system prompt, or a plain "Question: ...\\nAnswer:" template), the one grader
(`common.is_correct`, also the training reward) checks the final answer, and with `--teacher` every
response is scored by the teacher: KLbar(y) = mean over response tokens of the exact reverse
KL(student || teacher), its cost under --constraint (the training scripts' definition) and CSR = fraction of
responses with cost <= --budget; the cost quantiles are what a pilot KD run's budget is picked from.
The training scripts' periodic eval calls the same `common.evaluate`.

With `--compare A/results.jsonl B/results.jsonl --judge J` it computes instead the Reasoning Win Rate
(docs/reasoning_win_rate.md) of model A vs model B: the judge J reads each problem and the two anonymised solutions
("Solution 1"/"Solution 2", no model names, no gold answer) in JUDGE_PROMPT, greedily, in both orders;
A wins a problem only if both orders prefer A, loses only if both prefer B, else it is a tie; a pair
with an unparseable verdict is counted and excluded. Rates come with seeded bootstrap 95% intervals.

    python eval_math.py                                              # toy student on the toy test split
    python eval_math.py --model toy --teacher toy --budget 0.05      # ... with KL and CSR to the toy teacher
    python eval_math.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --dataset gsm8k --max-new-tokens 1024 \\
        --teacher Qwen/Qwen2.5-Math-7B-Instruct                      # bf16 on CUDA
    python eval_math.py --compare runs/eval/A/results.jsonl runs/eval/B/results.jsonl \\
        --judge Qwen/Qwen2.5-7B-Instruct --judge-max-new-tokens 1024 # RWR of A vs B
"""

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

import common
import toy_math


@dataclass
class Args:
    """Evaluate a model's final-answer accuracy on a math dataset (and its KL to a teacher)."""

    model: str = "toy"
    """model to evaluate: a hub id, a local folder, a .gguf file, or 'toy' (the toy student)"""
    dataset: str = "toy"
    """'toy', 'gsm8k' (openai/gsm8k), 'math500' (HuggingFaceH4/MATH-500), 'gsm_symbolic', 'gsm_symbolic_p1',
    'gsm_symbolic_p2' (apple/GSM-Symbolic main/p1/p2, test split only) or a .jsonl/.json file"""
    split: str = "test"
    """split of a named dataset (ignored for files)"""
    limit: int | None = None
    """evaluate (with --compare: judge) the first N problems only; None: all"""
    batch_size: int = 64
    """prompts per generation batch (with --compare: judge prompts per batch)"""
    max_new_tokens: int = 512
    """response length cap in tokens (toy responses are ~25 tokens; use 1024+ for MATH)"""
    temperature: float = 0.0
    """sampling temperature; 0 = greedy"""
    sampler: Literal["dynamic", "static"] = "dynamic"
    """'dynamic' (the default): transformers' generate with a KV cache that grows with the response; 'static': one
    preallocated cache (--batch-size rows x the longest prompt + --max-new-tokens) and, on CUDA, the decode step
    compiled once with CUDA graphs (tens of seconds up front). The same tokens on CPU; on a GPU compiled kernels
    round differently, so in bf16 most tokens agree, not all. On CUDA the default may change to the faster one once a
    GPU has measured both (benchmark/bench_sampler.py). With --compare, also the judge's sampler"""
    teacher: str | None = None
    """teacher for KL and CSR (same tokenizer as the model); None: accuracy only"""
    budget: float = 0.05
    """KL budget d > 0: a response satisfies the constraint iff its cost <= d (CSR); nats per token for --constraint
    mean and prefix, nats per response for sum"""
    constraint: Literal["sum", "mean", "prefix"] = "mean"
    """cost of a response, as in the training scripts: the 'sum' of its per-token KLs, their 'mean',
    or the largest 'prefix' mean"""
    output_dir: str | None = None
    """where results.jsonl (--compare: verdicts.jsonl) and summary.json go;
    None: runs/eval/{model}__{dataset}__{unix_time} (--compare: runs/eval/rwr__{A}__vs__{B}__{unix_time})"""
    seed: int = 1
    """seed for sampling (temperature > 0) and of the bootstrap resampling of --compare"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'"""
    kl_chunk_size: int = 1024
    """positions per chunk in the exact KL (bounds the memory of the vocabulary-wide softmax)"""
    trust_remote_code: bool = False
    """allow models whose code lives in their hub repository (runs that code)"""

    # Reasoning Win Rate arguments
    compare: tuple[str, str] | None = None
    """two results.jsonl files A B of eval_math.py on the same problems: the Reasoning Win Rate of A vs B by --judge,
    instead of an accuracy eval"""
    judge: str | None = None
    """judge for --compare (instruction-tuned): hub id, local folder or .gguf file; its chat template if any; greedy"""
    judge_max_new_tokens: int = 1024
    """cap on the judge's output in tokens; a verdict cut off by it counts as unparseable"""


def check_args(args: Args) -> None:
    """Reject bad values with one sentence each (common.InputError), before anything loads."""
    common.check_finite(args)
    if args.limit is not None and args.limit <= 0:
        raise common.InputError(f"--limit must be a positive number of problems or omitted, got {args.limit}.")
    for name in ("batch_size", "max_new_tokens", "kl_chunk_size", "judge_max_new_tokens"):
        if getattr(args, name) <= 0:
            raise common.InputError(
                f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}."
            )
    if args.temperature < 0:
        raise common.InputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.budget <= 0:
        raise common.InputError(
            f"--budget must be > 0 (nats per token, or per response with --constraint sum), got {args.budget}."
        )
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise common.InputError(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}.")
    common.check_seed(args.seed)
    common.check_device(args.device)
    common.check_output_dir(args.output_dir or "runs/eval")
    if args.compare is not None:
        if args.judge is None:
            raise common.InputError(
                "--compare needs --judge, the judge model (a hub id, a local folder or a .gguf file)."
            )
        if args.judge == "toy":
            raise common.InputError(
                "--judge toy is not allowed: the toy models cannot read the judge prompt; "
                "pass an instruction-tuned model."
            )
        if args.teacher is not None:
            raise common.InputError(
                "--teacher has no use with --compare (the judge reads the saved responses; no model is evaluated)."
            )
        for path in args.compare:
            if not Path(path).expanduser().is_file():
                raise common.InputError(
                    f"--compare file {path!r} does not exist; pass two results.jsonl files written by eval_math.py."
                )
        common.check_model_path(args.judge, "--judge")
        return
    if args.judge is not None:
        raise common.InputError(
            "--judge is used only with --compare A/results.jsonl B/results.jsonl (the Reasoning Win Rate of A vs B)."
        )
    for flag, value in (("--model", args.model), ("--teacher", args.teacher)):
        if value not in (None, "toy"):
            common.check_model_path(value, flag)
    common.check_dataset(args.dataset, args.split)


def tag(name: str) -> str:
    return Path(name.rstrip("/")).name.removesuffix(".gguf").removesuffix(".jsonl").removesuffix(".json") or "model"


# ---------------------------------------------------------------------------------------------
# Reasoning Win Rate: the judge prompt, verdict parsing, the two-order rule, the bootstrap
# ---------------------------------------------------------------------------------------------

# The gold answer is not shown (our choice): accuracy already measures final answers, and with the reference
# in view a judge can decide by matching final answers alone; RWR is meant to compare the reasoning
# (docs/reasoning_win_rate.md).
JUDGE_PROMPT = """\
Below are a math problem and two solutions to it, written by two different students.

Problem:
{problem}

Solution 1:
{solution_1}

Solution 2:
{solution_2}

Which solution reasons better? Check whether each step is correct and follows from the previous ones, \
whether the reasoning is complete and clear, and whether it reaches the right final answer. Do not prefer \
a solution for its length or for coming first. Explain your judgement briefly, then end with a last line \
"Verdict: 1" if Solution 1 is better, "Verdict: 2" if Solution 2 is better, or "Verdict: tie" if they are \
equally good."""
OUTCOMES = ("win", "loss", "tie")  # of A vs B; "unparseable" pairs are counted apart
BOOTSTRAP_RESAMPLES = 1000
_VERDICT = re.compile(r"\bverdict[ \t]*:\s*(?:solution[ \t]*)?[\[(\"']?([^\s.,;:!?)\]\"']*)", re.IGNORECASE)
# Cut off at the very end: inside the word ("... Verdi"), or a line that starts a verdict ("Final Verdict"); the whole
# word ending a sentence ("Verdict: 1. That is my verdict") is no cut, and the complete verdict before it counts
_CUT_VERDICT = re.compile(r"(?:\bverd(?:ic?)?|^[ \t]*(?:final[ \t]+)?verdict)\s*\Z", re.IGNORECASE | re.MULTILINE)


def render_judge_prompt(tokenizer, problem: str, solution_1: str, solution_2: str) -> str:
    """JUDGE_PROMPT filled in, in the judge's chat template (one user turn) if it has one, else as is."""
    text = JUDGE_PROMPT.format(
        problem=problem.strip(),
        solution_1=solution_1.strip() or "(no solution)",
        solution_2=solution_2.strip() or "(no solution)",
    )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\n\n"


def parse_verdict(text: str) -> str | None:
    """'1', '2' or 'tie' from the LAST 'Verdict: X' in a judge output (case and markdown emphasis ignored;
    'Verdict: Solution 2' reads as 2); None when there is none, it says anything else ('Verdict: 3'), or the
    output ends inside a verdict ('Verdict:', 'Verdict: ti', '... Verdi', a last line 'Final Verdict')."""
    plain = re.sub(r"[*_`#]", "", text)
    if _CUT_VERDICT.search(plain):
        return None
    found = None
    for found in _VERDICT.finditer(plain):
        pass
    value = found.group(1).lower() if found else None
    return value if value in ("1", "2", "tie") else None


def preferred(verdict: str | None, a_first: bool) -> str | None:
    """One order's parsed verdict ('1', '2', 'tie', None) as the model it prefers: 'A', 'B', 'tie' or None."""
    if verdict in (None, "tie"):
        return verdict
    return "A" if (verdict == "1") == a_first else "B"


def combine_verdicts(verdict_ab: str | None, verdict_ba: str | None) -> str:
    """Outcome for A from the verdict with A as Solution 1 (ab) and with B as Solution 1 (ba): 'win' iff both
    orders prefer A, 'loss' iff both prefer B, 'unparseable' if either verdict is None, else 'tie'."""
    first, second = preferred(verdict_ab, a_first=True), preferred(verdict_ba, a_first=False)
    if first is None or second is None:
        return "unparseable"
    if first == second == "A":
        return "win"
    if first == second == "B":
        return "loss"
    return "tie"


def bootstrap_rates(outcomes: list[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 1) -> dict[str, tuple]:
    """{win, loss, tie: (rate, low, high)} over the parseable outcomes; (low, high) is the percentile 95%
    interval of the rate over `resamples` resamples of the problems with replacement (numpy default_rng(seed)).
    All None when no outcome is parseable."""
    kept = np.array([o for o in outcomes if o in OUTCOMES])  # (n,)
    if len(kept) == 0:
        return {o: (None, None, None) for o in OUTCOMES}
    resampled = kept[np.random.default_rng(seed).integers(0, len(kept), size=(resamples, len(kept)))]  # (R, n)
    rates = {}
    for o in OUTCOMES:
        low, high = np.percentile((resampled == o).mean(1), [2.5, 97.5])
        rates[o] = (float((kept == o).mean()), float(low), float(high))
    return rates


def read_results(path: str) -> list[dict]:
    """The records of an eval_math.py results.jsonl; common.InputError naming the line of the first bad one."""
    records = []
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise common.InputError(
            f"{path} is not UTF-8 text (byte {e.start}), not an eval_math.py results.jsonl."
        ) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise common.InputError(f"{path}: line {lineno} is not valid JSON ({e.msg}).") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("response"), str)
        ):
            raise common.InputError(
                f"{path}: line {lineno} is not an eval_math.py result (it needs prompt and response strings)."
            )
        records.append(record)
    if not records:
        raise common.InputError(f"{path} holds no results.")
    return records


def match_results(a: list[dict], b: list[dict], path_a: str, path_b: str) -> None:
    """Refuse (common.InputError) unless A and B answer the same problems in the same order: the same question
    (written by eval_math.py), or the same prompt for files without one."""
    redo = (
        "evaluate both models with this eval_math.py on the same --dataset and --limit, "
        "or pass --limit N to judge the first N of each"
    )
    if len(a) != len(b):
        raise common.InputError(
            f"{path_a} and {path_b} do not cover the same problems ({len(a)} vs {len(b)} results): {redo}."
        )
    key = "question" if all("question" in r for r in a + b) else "prompt"
    for i, (record_a, record_b) in enumerate(zip(a, b), 1):
        if record_a[key].strip() != record_b[key].strip():
            raise common.InputError(
                f"{path_a} and {path_b} do not cover the same problems (result {i} differs in its {key}: "
                f"{record_a[key][:60]!r} vs {record_b[key][:60]!r}): {redo}."
            )


def accuracy(records: list[dict]) -> float | None:
    """Accuracy of one evaluation on the judged problems (None for results without a `correct` field)."""
    return float(np.mean([r["correct"] for r in records])) if all("correct" in r for r in records) else None


def rwr(args: Args) -> dict:
    """Reasoning Win Rate of A vs B (--compare A B) by the --judge model; writes verdicts.jsonl and summary.json."""
    from tqdm.auto import tqdm

    common.seed_everything(args.seed)
    # 1. the two evaluations' answers to the same problems
    path_a, path_b = args.compare
    a, b = read_results(path_a)[: args.limit], read_results(path_b)[: args.limit]
    match_results(a, b, path_a, path_b)
    problems = [record_a.get("question") or record_a["prompt"] for record_a in a]

    # 2. the judge
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    tokenizer = common.load_tokenizer(args.judge, args.trust_remote_code)
    judge = common.load_model(args.judge, device, dtype, args.trust_remote_code)
    eos = common.eos_token_ids(judge, tokenizer)

    # 3. every pair judged twice, greedily: A as Solution 1, then B as Solution 1 (cancels position bias)
    start = time.time()
    prompts = [
        render_judge_prompt(tokenizer, p, ra["response"], rb["response"]) for p, ra, rb in zip(problems, a, b)
    ] + [render_judge_prompt(tokenizer, p, rb["response"], ra["response"]) for p, ra, rb in zip(problems, a, b)]
    cap = None  # the static sampler's one cache length: the longest judge prompt
    if args.sampler == "static" and prompts:
        cap = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    outputs, truncated, batch_size = [], [], min(args.batch_size, max(len(prompts), 1))  # no rows to pad
    for i in tqdm(range(0, len(prompts), batch_size), desc="judge", leave=False):
        for _, response_ids in common.generate(
            judge,
            tokenizer,
            prompts[i : i + batch_size],
            args.judge_max_new_tokens,
            0.0,
            batch_size,
            sampler=args.sampler,
            max_prompt_tokens=cap,
        ):
            outputs.append(tokenizer.decode(response_ids, skip_special_tokens=True))
            truncated.append(not response_ids or response_ids[-1] not in eos)

    # 4. verdicts, the two-order rule, rates with bootstrap intervals
    n = len(problems)
    verdicts = [parse_verdict(text) for text in outputs]
    records = []
    for i, problem in enumerate(problems):
        records.append(
            dict(
                index=i,
                question=problem,
                gold=a[i].get("gold"),
                correct_a=a[i].get("correct"),
                correct_b=b[i].get("correct"),
                judge_output_ab=outputs[i],
                judge_output_ba=outputs[n + i],
                verdict_ab=verdicts[i],
                verdict_ba=verdicts[n + i],
                truncated_ab=truncated[i],
                truncated_ba=truncated[n + i],
                outcome=combine_verdicts(verdicts[i], verdicts[n + i]),
            )
        )
    outcomes = [r["outcome"] for r in records]
    rates = bootstrap_rates(outcomes, BOOTSTRAP_RESAMPLES, args.seed)
    decided = [v for v in verdicts if v in ("1", "2")]
    summary = dict(
        a=path_a,
        b=path_b,
        judge=args.judge,
        n=n,
        wins=outcomes.count("win"),
        losses=outcomes.count("loss"),
        ties=outcomes.count("tie"),
        unparseable=outcomes.count("unparseable"),
    )
    for o in OUTCOMES:
        summary.update({f"{o}_rate": rates[o][0], f"{o}_ci95": list(rates[o][1:])})
    summary.update(
        bootstrap_resamples=BOOTSTRAP_RESAMPLES,
        seed=args.seed,
        solution_1_preferred=decided.count("1") / len(decided) if decided else None,  # 0.5: no position bias
        judge_truncated=sum(truncated),
        judge_max_new_tokens=args.judge_max_new_tokens,
        sampler=args.sampler,
        accuracy_a=accuracy(a),
        accuracy_b=accuracy(b),
        seconds=round(time.time() - start, 1),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )

    # 5. write and print
    out = Path(
        args.output_dir
        or f"runs/eval/rwr__{tag(str(Path(path_a).parent))}__vs__{tag(str(Path(path_b).parent))}__{int(time.time())}"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "verdicts.jsonl", records)
    common.write_json(out / "summary.json", summary)
    print(f"\nReasoning Win Rate of A = {path_a} vs B = {path_b}, judge {args.judge}, {n} problems")
    print(
        f"| {'outcome for A':<13} | {'count':>5} | {'rate':>6} | {'95% interval':>16} |\n"
        f"|{'-' * 15}|{'-' * 7}|{'-' * 8}|{'-' * 18}|"
    )
    for o in OUTCOMES:
        rate, low, high = rates[o]
        shown = ("-", "-") if rate is None else (f"{rate:.3f}", f"[{low:.3f}, {high:.3f}]")
        print(f"| {o:<13} | {outcomes.count(o):>5} | {shown[0]:>6} | {shown[1]:>16} |")
    print(f"| {'unparseable':<13} | {summary['unparseable']:>5} | {'-':>6} | {'excluded':>16} |")
    print(
        f"\n{summary['unparseable']} of {n} pairs had an unparseable verdict in at least one order "
        "and are excluded from the rates "
        f"({summary['judge_truncated']} of {2 * n} judge outputs hit --judge-max-new-tokens); "
        f"intervals: {BOOTSTRAP_RESAMPLES} bootstrap resamples of the problems, seed {args.seed}."
    )
    print(f"wrote {out / 'verdicts.jsonl'} and {out / 'summary.json'}")
    return summary


def main(args: Args) -> dict:
    check_args(args)
    if args.compare is not None:
        return rwr(args)
    dataset = toy_math.resolve(args.dataset, args.split if args.split in ("train", "test") else "test")
    problems = common.load_problems(dataset, args.split)[: args.limit]  # first: a hub dataset fails before a toy build
    model_path = toy_math.resolve(args.model, "student")
    teacher_path = toy_math.resolve(args.teacher, "teacher") if args.teacher else None
    tokenizer = common.load_tokenizer(model_path, args.trust_remote_code)
    if teacher_path:
        common.check_same_tokenizer(tokenizer, common.load_tokenizer(teacher_path, args.trust_remote_code))

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    model = common.load_model(model_path, device, dtype, args.trust_remote_code)
    teacher = common.load_model(teacher_path, device, dtype, args.trust_remote_code) if teacher_path else None
    start = time.time()
    records, summary = common.evaluate(
        model,
        tokenizer,
        problems,
        max_new_tokens=args.max_new_tokens,
        batch_size=min(args.batch_size, max(len(problems), 1)),  # the static sampler pads no rows to a larger batch
        temperature=args.temperature,
        teacher=teacher,
        budget=args.budget,
        constraint=args.constraint,
        kl_chunk_size=args.kl_chunk_size,
        seed=args.seed,
        progress=True,
        sampler=args.sampler,
    )
    # the question itself, so that --compare can match two models' results whatever their chat templates
    records = [{"question": problem["question"], **record} for problem, record in zip(problems, records)]
    summary.update(
        model=args.model,
        teacher=args.teacher,
        dataset=args.dataset,
        split=args.split if args.dataset == "toy" or args.dataset in common.HUB_DATASETS else None,  # a file has none
        sampler=args.sampler,
        seconds=round(time.time() - start, 1),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )

    out = Path(args.output_dir or f"runs/eval/{tag(args.model)}__{tag(args.dataset)}__{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", records)
    common.write_json(out / "summary.json", summary)
    print(f"\n| {'metric':<20} | {'value':>12} |\n|{'-' * 22}|{'-' * 14}|")
    for key in (
        "n",
        "accuracy",
        "lenient_accuracy",
        "mean_kl",
        "max_kl",
        "constraint",
        "mean_cost",
        "cost_p50",
        "cost_p90",
        "cost_p95",
        "budget",
        "csr",
        "mean_response_tokens",
        "seconds",
    ):
        if summary.get(key) is not None:
            value = summary[key]
            print(f"| {key:<20} | {value:>12.4f} |" if isinstance(value, float) else f"| {key:<20} | {value:>12} |")
    print(f"\nwrote {out / 'results.jsonl'} and {out / 'summary.json'}")
    return summary


# TRY NOT TO MODIFY: results written whole


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace `path` with one JSON line per record, atomically (as common.write_json): a crash leaves the old file or
    the new one, never half of one, and a second evaluation into the same folder replaces the first."""
    tmp = Path(f"{path}.tmp")
    tmp.unlink(missing_ok=True)
    common.append_jsonl(tmp, records)
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (common.InputError, OSError) as e:  # bad input, or a model or dataset that cannot load: one sentence
        raise SystemExit(common.one_sentence(e)) from None
