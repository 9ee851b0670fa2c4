"""The fair test of the paper's claim on the toy task: every method's knob tuned alike, in resumable chunks.

Each chunk is a list of training runs (600 steps, the default learning rate, in-run greedy evals on the validation
split every 50 steps) that this script runs JOBS at a time, one thread each. After each run it evaluates the final
student greedily on all problems of the chunk's evaluation split and writes one compact result file,
benchmark/results/claim/{chunk}/{run}__{seed}.json: the command, the commit, the in-run evals, the training record
of every 10th step (rewards, CSR, each loss term's gradient norm), the final eval summary, and per problem whether
the answer was correct, its mean per-token KL (full precision) and its length in tokens, so that CSR at any budget
and either constraint form can be rebuilt without the checkpoints. A run whose result file exists is skipped; an
interrupted run resumes from its last checkpoint (every 100 steps). Drivers in several shells can share a chunk (a
lock file per run keeps them apart). benchmark/claim_results.py turns the result files into the tables and plots.

Settings are chosen on a validation split: 500 problems held out of the toy training set (seeded) that no run of
the sweep trains on (the toy build pretrained the student and the teacher on the whole training set, these
problems included); every run trains on the remaining 19,500.

    python benchmark/claim_sweep.py list tune-d0.05             # the chunk's runs as plain commands
    python benchmark/claim_sweep.py run tune-d0.05 --jobs 2     # run it (re-run to resume)

Chunks: tune-d0.05 (31 runs on the validation split, seed 1: CMDP's beta in {0.3, 1, 3, 10, 20} x n in {1, 20}
with centred advantages, std-normalised advantages at beta 1 and 20, the sum form; fixed lambda on a grid of 9; dual
ascent step size x starting lambda), refine-d0.05 (14: one step either side of each family's best on validation,
REFINE below), lr-ablation (2: the paper's setting at a third and three times the learning rate), tune-d0.1 and
tune-d0.013 (16 each: CMDP and dual ascent trained for that budget, CMDP's beta in {1, 10, 20} x n in {1, 20}, the
std-normalised at beta 20, the sum form; fixed lambda's runs at d = 0.05 serve every budget), final-d0.05 /
final-d0.1 / final-d0.013 (each method's setting that benchmark/claim_results.py chose on validation at that budget,
benchmark/results/claim/chosen.json, and the paper's n = 20 and beta = 1 in both the per-token and the paper's sum
form, seeds 1-5, evaluated on the toy test split). A run whose seed-1 training already exists in --out (the tuning
run of the same name) is only evaluated on the new split.

    python benchmark/claim_sweep.py run final-d0.05 --seeds 2 3 4 5 --jobs 16 --extra "--device cuda --dtype float32"
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmark" / "results" / "claim"
STEPS = 600
NUM_VAL = 500
MEAN_TOKENS = 19.5  # mean response tokens of the starting student (toy build report): d_sum = d x MEAN_TOKENS
LRS = ("3e-05", "0.0003")  # the default is 1e-4
# beta, term (II)'s weight: 1 is the paper's (the derivative of J_n); ~20 (the mean response length) is the weight
# (II) had in every run of the sweep before this grid, when it was divided by the step's responses, not its tokens
BETAS = ("0.3", "1", "3", "10", "20")
LAMBDAS = ("1", "3", "5", "7", "10", "14", "20", "30", "100")  # reward per unit of cost (nats per token)
DUAL_LRS = ("10", "100", "1000")
DUAL_INITS = ("0", "10")
PAPER = "cmdp_n20_centred_b1"  # the paper's n = 20 and beta = 1 under the per-token mean constraint (the default form)
PAPER_SUM = "cmdpsum_n20_centred_b1"  # the paper's form: its summed-KL constraint, n = 20, beta = 1, centred


def cmdp_run(budget: float, n: str, norm: str, beta: str, form: str = "mean") -> tuple[str, int, str]:
    """One CMDP setting: per-token mean constraint at d, or the sum form at d x MEAN_TOKENS nats per response."""
    tag = "" if budget == 0.05 else f"_d{budget:g}"
    flags = f"--penalty {n} --explicit-coef {beta}" + " --norm-adv-std" * (norm == "std")
    if form == "sum":
        return (
            f"cmdpsum_n{n}_{norm}_b{beta}{tag}",
            1,
            f"cmdp_distill.py --constraint sum --budget {budget * MEAN_TOKENS:g} {flags}",
        )
    return f"cmdp_n{n}_{norm}_b{beta}{tag}", 1, f"cmdp_distill.py --budget {budget:g} {flags}"


def cmdp_grid(budget: float) -> list[tuple[str, int, str]]:
    """CMDP's own knobs at one budget: beta over BETAS x n in {1, 20} with centred advantages, GRPO's std-normalised
    advantages at beta 1 and 20, and the paper's sum form (n = 20, beta = 1, both normalisations). At the other
    budgets, beta over {1, 10, 20} (where d = 0.05's outcome changes) and the std-normalised at beta 20."""
    betas, std_betas = (BETAS, ("1", "20")) if budget == 0.05 else (("1", "10", "20"), ("20",))
    runs = [cmdp_run(budget, n, "centred", beta) for n in ("1", "20") for beta in betas]
    runs += [cmdp_run(budget, n, "std", beta) for n in ("1", "20") for beta in std_betas]
    return runs + [cmdp_run(budget, "20", norm, "1", "sum") for norm in ("centred", "std")]


def fixed_grid() -> list[tuple[str, int, str]]:
    return [(f"fixed_l{lam}", 1, f"lagrangian_distill.py --method fixed --lambda-init {lam}") for lam in LAMBDAS]


def dual_grid(budget: float) -> list[tuple[str, int, str]]:
    tag = "" if budget == 0.05 else f"_d{budget:g}"
    return [
        (
            f"dual_eta{lr}_l{init}{tag}",
            1,
            f"lagrangian_distill.py --method dual --budget {budget:g} --lambda-init {init} --lambda-lr {lr}",
        )
        for lr in DUAL_LRS
        for init in DUAL_INITS
    ]


# most informative first, so that a chunk cut short still compares the methods: the paper's setting and each
# baseline near its best of the earlier sweep, then the weights between, then the grids' ends
FIRST = (
    PAPER,
    "fixed_l10",
    "cmdp_n1_centred_b1",
    "dual_eta1000_l0",
    "cmdp_n20_centred_b20",
    "fixed_l5",
    "cmdp_n1_centred_b20",
    "fixed_l14",
    "cmdp_n20_centred_b3",
    "cmdp_n1_centred_b3",
    "fixed_l7",
    "cmdp_n20_centred_b10",
    "cmdp_n1_centred_b10",
    "dual_eta100_l0",
    "fixed_l3",
    "fixed_l20",
    "cmdp_n20_centred_b0.3",
    "cmdp_n1_centred_b0.3",
    "dual_eta1000_l10",
    "cmdp_n20_std_b1",
    "cmdp_n1_std_b1",
    "cmdpsum_n20_centred_b1",
    "cmdpsum_n20_std_b1",
)
# refine-d0.05: after tune-d0.05, one step either side of each family's best setting on validation (or beyond it where
# the best sat at the grid's end), alike for every family; fixed lambda: best 7 (5: 0.942, 10: 0.964); CMDP, n = 1:
# best beta 10; n = 20 (the default's): best beta 20, the grid's end; the sum form: best beta 1 with std advantages;
# dual ascent: best eta 1000, the grid's end, its outcome flat in eta; then, while a family's best sat at the end of
# its refinement, one more step the same way: the sum form's beta 10 (after 3) and 30 (after 10), dual ascent's eta
# 100000 (after 10000)
REFINE = (
    [cmdp_run(0.05, "1", "centred", beta) for beta in ("6", "14")]
    + [cmdp_run(0.05, "20", "centred", beta) for beta in ("14", "40")]
    + [cmdp_run(0.05, "20", "std", beta, "sum") for beta in ("0.3", "3", "10", "30")]
    + [(f"fixed_l{lam}", 1, f"lagrangian_distill.py --method fixed --lambda-init {lam}") for lam in ("6", "8.5")]
    + [
        (
            f"dual_eta10000_l{init}",
            1,
            f"lagrangian_distill.py --method dual --budget 0.05 --lambda-init {init} --lambda-lr 10000",
        )
        for init in ("0", "10")
    ]
    + [
        (
            f"dual_eta100000_l{init}",
            1,
            f"lagrangian_distill.py --method dual --budget 0.05 --lambda-init {init} --lambda-lr 100000",
        )
        for init in ("0", "10")
    ]
)
OTHER_BUDGETS = ("0.1", "0.013")  # twice the default, and the pilot's (docs/results.md, "Choosing the budget")
CHUNKS = (
    "tune-d0.05",
    "refine-d0.05",
    "tune-d0.1",
    "tune-d0.013",
    "lr-ablation",
    "final-d0.05",
    "final-d0.1",
    "final-d0.013",
)


def chunk_runs(chunk: str) -> list[tuple[str, int, str]]:
    """(run name, seed, script and method flags) of every run of a chunk, most informative first."""
    if chunk == "tune-d0.05":  # fixed lambda is budget-free: its front at every budget comes from these runs
        runs = cmdp_grid(0.05) + fixed_grid() + dual_grid(0.05)
    elif chunk == "refine-d0.05":
        runs = list(REFINE)
    elif chunk.removeprefix("tune-d") in OTHER_BUDGETS:  # CMDP and dual ascent trained for that budget
        budget = float(chunk.removeprefix("tune-d"))
        runs = cmdp_grid(budget) + dual_grid(budget)
    elif chunk == "lr-ablation":
        method = dict((name, m) for name, _, m in cmdp_grid(0.05))[PAPER]
        runs = [(f"{PAPER}_lr{lr}", 1, f"{method} --learning-rate {lr}") for lr in LRS]
    elif chunk.removeprefix("final-d") in ("0.05", *OTHER_BUDGETS):
        budget = chunk.removeprefix("final-d")
        path = RESULTS / "chosen.json"
        chosen = json.loads(path.read_text()).get(budget, {}) if path.exists() else {}
        if not all(f in chosen for f in ("cmdp", "dual", "fixed")):
            raise SystemExit(
                f"{chunk}: no settings chosen at d = {budget} yet; run tune-d{budget}, then benchmark/claim_results.py."
            )
        refined = list(REFINE) if budget == "0.05" else []
        tuned = {name: method for name, _, method in chunk_runs(f"tune-d{budget}") + fixed_grid() + refined}
        tag = "" if budget == "0.05" else f"_d{budget}"
        names = list(dict.fromkeys([*chosen.values(), PAPER + tag, PAPER_SUM + tag]))
        return [(name, seed, tuned[name]) for seed in range(1, 6) for name in names]  # seed by seed
    else:
        raise SystemExit(f"unknown chunk {chunk!r}: {', '.join(CHUNKS)}.")
    base = [name.split("_d0")[0] for name, _, _ in runs]  # the d = 0.05 name of a run trained for another budget
    order = [FIRST.index(b) if b in FIRST else len(FIRST) for b in base]
    return [run for _, run in sorted(zip(order, runs), key=lambda pair: pair[0])]


def select(chunk: str, seeds: list[int] | None = None, only: list[str] | None = None) -> list[tuple[str, int, str]]:
    """The chunk's runs with these seeds and these names (None: all), in the chunk's order."""
    runs = [r for r in chunk_runs(chunk) if seeds is None or r[1] in seeds]
    if unknown := sorted(set(only or ()) - {name for name, _, _ in runs}):
        raise SystemExit(f"--only: {', '.join(unknown)} not among {chunk}'s runs (`list {chunk}`).")
    return [r for r in runs if only is None or r[0] in only]


def split_data(out: Path) -> tuple[Path, Path]:
    """The toy training set less 500 seeded validation problems, and those 500 (written once)."""
    sys.path.insert(0, str(ROOT))
    import toy_math

    train_fit, val = out / "data" / "train_fit.jsonl", out / "data" / "val.jsonl"
    if not val.exists():
        lines = Path(toy_math.resolve("toy", "train")).read_text().splitlines()
        held = set(random.Random(0).sample(range(len(lines)), NUM_VAL))
        val.parent.mkdir(parents=True, exist_ok=True)
        train_fit.write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in held))
        val.write_text("".join(lines[i] + "\n" for i in sorted(held)))
    return train_fit, val


def flag(evaluation: Path) -> str:
    """The evaluation split as a --dataset value: the validation file, or 'toy' (the toy test split)."""
    return str(evaluation) if evaluation.name == "val.jsonl" else "toy"


def command(name: str, seed: int, method: str, out: Path, train: Path, extra: str = "") -> str:
    """A run's training command: in-run evals on the validation split whatever the chunk, so that the test split is
    used once, by the final evaluation of the chosen settings."""
    return (
        f"python {method} --seed {seed} --num-steps {STEPS} --eval-interval 50 --save-interval 100 "
        f"--output-dir {out / 'runs'} --exp-name {name} --dataset {train} --eval-dataset {train.parent / 'val.jsonl'} "
        f"{extra}"
    ).strip()


def eval_dir_of(run_dir: Path, evaluation: Path) -> Path:
    """The final evaluation's folder: eval/ for the validation split, eval-test/ for the test split."""
    return run_dir / ("eval" if evaluation.name == "val.jsonl" else f"eval-{evaluation.stem}")


def take_lock(out: Path, name: str, seed: int) -> bool:
    """Whether this driver may run `name` now: no live driver holds out/locks/{name}__{seed}, so that several
    drivers (in other shells) can share a chunk; a lock whose process has ended is taken over."""
    lock = out / "locks" / f"{name}__{seed}"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one driver wins
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                os.kill(int(lock.read_text()), 0)
                return False  # its driver is alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale
    return False


def run_one(
    chunk: str, name: str, seed: int, method: str, out: Path, train: Path, evaluation: Path, extra: str = ""
) -> str:
    result = RESULTS / chunk / f"{name}__{seed}.json"
    if result.exists():
        return f"done already: {result.name}"
    if not take_lock(out, name, seed):
        return f"running in another driver: {name}__{seed}"
    try:
        return train_and_evaluate(chunk, name, seed, method, out, train, evaluation, extra, result)
    finally:
        (out / "locks" / f"{name}__{seed}").unlink(missing_ok=True)


def train_and_evaluate(
    chunk: str, name: str, seed: int, method: str, out: Path, train: Path, evaluation: Path, extra: str, result: Path
) -> str:
    cmd = command(name, seed, method, out, train, extra)
    checkpoints = sorted(out.glob(f"runs/{name}__{seed}__*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    log = out / "logs" / f"{name}__{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start, trained = time.time(), not checkpoints or int(checkpoints[-1].name.split("-")[1]) < STEPS
    if trained:
        resume = f" --resume {checkpoints[-1]}" if checkpoints else ""
        with open(log, "a") as f:
            if subprocess.run(shlex.split(cmd + resume), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
                return f"FAILED ({log}): {cmd}"
    run_dir = sorted(out.glob(f"runs/{name}__{seed}__*/checkpoint-{STEPS}"))[-1].parent
    train_seconds = time.time() - start if trained else None  # None: trained earlier (a tuning run), only evaluated
    eval_dir = eval_dir_of(run_dir, evaluation)
    if not (eval_dir / "summary.json").exists():
        eval_cmd = (
            f"python eval_math.py --model {run_dir / f'checkpoint-{STEPS}'} --teacher toy --dataset {flag(evaluation)} "
            f"--max-new-tokens 64 --batch-size 250 --output-dir {eval_dir} {extra}"
        ).strip()
        with open(log, "a") as f:
            if subprocess.run(shlex.split(eval_cmd), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
                return f"FAILED eval ({log}): {eval_cmd}"
    return write_result(result, chunk, name, seed, run_dir, evaluation, train_seconds)


def write_result(
    result: Path,
    chunk: str,
    name: str,
    seed: int,
    run_dir: Path,
    evaluation: Path,
    train_seconds: float | None,
) -> str:
    """The compact, committed result of one finished and evaluated run (written atomically)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eval_dir = eval_dir_of(run_dir, evaluation)
    per_problem = [json.loads(line) for line in (eval_dir / "results.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    compact = {
        "chunk": chunk,
        "run": name,
        "seed": seed,
        "command": " ".join(["python", *config["argv"]]).replace(str(run_dir.parent.parent), "runs/claim"),  # as run
        "commit": config.get("git_commit"),
        "steps": STEPS,
        "train_seconds_this_call": None if train_seconds is None else round(train_seconds),
        "eval_split": evaluation.name,
        "in_run_evals": [r for r in records if "eval/accuracy" in r],
        "train_diagnostic_steps": [r for r in records if "losses/pg_grad_norm" in r],  # every 10th step, grad norms
        "final_eval": json.loads((eval_dir / "summary.json").read_text()),
        "correct": [int(r["correct"]) for r in per_problem],
        "mean_kl": [r["mean_kl"] for r in per_problem],  # full precision: CSR is a comparison with d
        "response_tokens": [r["response_tokens"] for r in per_problem],  # sum of KLs = mean_kl x response_tokens
    }
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(compact) + "\n")
    os.replace(tmp, result)
    minutes = "" if train_seconds is None else f" in {train_seconds / 60:.1f} min"
    return f"finished {result.name}{minutes} (acc {compact['final_eval']['accuracy']:.3f})"


def recompact(chunk: str, out: Path, evaluation: Path) -> None:
    """Rewrite the result files of a chunk's finished runs from their run folders (keeps the recorded train time)."""
    for name, seed, _ in chunk_runs(chunk):
        dirs = sorted(out.glob(f"runs/{name}__{seed}__*/{eval_dir_of(Path(), evaluation).name}/summary.json"))
        if not dirs:
            continue
        result = RESULTS / chunk / f"{name}__{seed}.json"
        seconds = json.loads(result.read_text()).get("train_seconds_this_call") if result.exists() else None
        print(write_result(result, chunk, name, seed, dirs[-1].parent.parent, evaluation, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("list", "run", "compact"))
    parser.add_argument("chunk")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each when > 1)")
    parser.add_argument("--out", default="runs/claim", help="run folders, logs and the validation split")
    parser.add_argument("--seeds", type=int, nargs="+", help="only the chunk's runs with these seeds")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="only the chunk's runs of these names")
    parser.add_argument("--extra", default="", help="flags added to every training and evaluation command")
    args = parser.parse_args()
    runs, out = select(args.chunk, args.seeds, args.only), (ROOT / args.out).resolve()
    subprocess.run(
        [sys.executable, "toy_math.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )  # build once, first
    train, val = split_data(out)
    if args.chunk.startswith("final-"):
        sys.path.insert(0, str(ROOT))
        import toy_math

        val = Path(toy_math.resolve("toy", "test"))
    if args.action == "list":
        for name, seed, method in runs:
            print(command(name, seed, method, out, train, args.extra))
        return
    if args.action == "compact":
        return recompact(args.chunk, out, val)
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # several processes must not oversubscribe the cores
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        for message in pool.map(lambda r: run_one(args.chunk, *r, out, train, val, args.extra), runs):
            print(f"[{(time.time() - start) / 60:6.1f} min] {message}", flush=True)
    print(f"chunk {args.chunk}: {(time.time() - start) / 60:.1f} min with --jobs {args.jobs}")


if __name__ == "__main__":
    main()
