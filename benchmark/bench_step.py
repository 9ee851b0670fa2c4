"""Benchmark: wall time of one training step of this project's scripts against TRL's trainers on the same work.

Rows (the same toy teacher and student, the same prompts in the same order, 16 prompts x 8 sampled responses per step):
  kd    on-policy reverse-KL distillation: `lagrangian_distill.py --method kd`
        vs trl.DistillationTrainer(beta=1.0): the student samples every step, exact reverse KL over the vocabulary
  grpo  GRPO without a teacher: `lagrangian_distill.py --method grpo` (it still runs the teacher,
        to log the KL) vs trl.GRPOTrainer(beta=0.0, loss_type="dr_grpo", scale_rewards="none"), rewarded by the
        project's grader common.is_correct
  cmdp  `cmdp_distill.py` alone (no TRL equivalent)
Shared settings: max_new_tokens / max_completion_length 64, sampling temperature 1.0 with top-k and top-p off,
learning rate 1e-4 (constant AdamW, no weight decay), gradient clipping at 1.0, float32 on CPU, no gradient
checkpointing, the same optimizer steps, micro-batches of 64 sequences (TRL: per_device_train_batch_size 64 x
gradient_accumulation_steps 2).

How: every run is its own subprocess, one after the other, never two at once. Our side runs the scripts as a user
would (`--eval-interval 0 --eval-limit 1`: one-problem evals at the start and the end, outside the steps; the
checkpoint only at the end) and reads each step's perf/generate_s + perf/score_s + perf/update_s from the run's
metrics.jsonl (step start to after optimizer.step; logging, the end eval and the checkpoint come after). TRL's side
times each optimizer step with a TrainerCallback, from on_step_begin to on_step_end (generation, scoring, forward,
backward, clipping, optimizer and scheduler step; logging comes after). Reported: the median over steps
skip+1..N (default 3..10), the ratio ours / TRL, the mean response length each side produced, the machine.

    pip install -r requirements-bench.txt                 # TRL, for this benchmark only
    python benchmark/bench_step.py                        # all rows, 10 steps each, the cached toy task
    python benchmark/bench_step.py --steps 4 --works kd --toy-dir /tmp/v2c --threads 1   # quick check
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# work -> (row title, our script and its method flags, the TRL trainer doing the same work or None)
WORKS = {
    "kd": ("on-policy reverse-KL distillation", ["lagrangian_distill.py", "--method", "kd"], "DistillationTrainer"),
    "grpo": ("GRPO without a teacher", ["lagrangian_distill.py", "--method", "grpo"], "GRPOTrainer"),
    "cmdp": ("CMDP distillation", ["cmdp_distill.py"], None),
}
TRL_PIN = "1.16.0"  # requirements-bench.txt
PHASES = ("perf/generate_s", "perf/score_s", "perf/update_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (N)")
    p.add_argument(
        "--skip",
        type=int,
        default=2,
        help="first steps left out of the median (warm-up): the median is over steps skip+1..N",
    )
    p.add_argument("--works", nargs="+", default=list(WORKS), choices=list(WORKS), help="rows to run, in this order")
    p.add_argument(
        "--toy-dir",
        default=None,
        help="folder with student/, teacher/, train.jsonl, test.jsonl; "
        "default: the cached toy task (toy_math.resolve, built on first use)",
    )
    p.add_argument(
        "--out", default="runs/bench_step.json", help="JSON results; the runs' logs go to <out without .json>_logs/"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in every run (OMP_NUM_THREADS, MKL_NUM_THREADS); default: inherited / torch's",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of both sides (data order, sampling, torch)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="distinct prompts per optimizer step")
    p.add_argument("--group-size", type=int, default=8, help="responses sampled per prompt")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=64,
        help="sequences per forward/backward (ours: --micro-batch-size; TRL: per_device_train_batch_size)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="response length cap in tokens (TRL: max_completion_length)"
    )
    p.add_argument(
        "--learning-rate", type=float, default=1e-4, help="constant AdamW learning rate (our scripts' default)"
    )
    p.add_argument(
        "--child", choices=list(WORKS), default=None, help=argparse.SUPPRESS
    )  # internal: run TRL on this work
    p.add_argument(
        "--child-result", default=None, help=argparse.SUPPRESS
    )  # internal: where the TRL child writes its JSON
    args = p.parse_args(argv)
    if args.skip < 0 or args.steps <= args.skip:
        p.error(
            "--steps must be larger than --skip (at least one timed step), "
            f"got --steps {args.steps} and --skip {args.skip}."
        )
    for name in ("threads", "prompts_per_step", "group_size", "micro_batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.group_size < 2:
        p.error(f"--group-size must be >= 2 (GRPO's advantages are relative to the group), got {args.group_size}.")
    if (args.prompts_per_step * args.group_size) % args.micro_batch_size:
        p.error(
            f"--micro-batch-size {args.micro_batch_size} must divide --prompts-per-step x --group-size = "
            f"{args.prompts_per_step * args.group_size}."
        )
    if args.learning_rate <= 0:
        p.error(f"--learning-rate must be > 0, got {args.learning_rate}.")
    return args


# Pure helpers: the arithmetic of the report (tested in tests/test_bench_step.py)
def timed_median(step_times: list[float], skip: int) -> float:
    """Median of the per-step times after the first `skip` steps (steps skip+1..N, 1-based)."""
    timed = step_times[skip:]
    if not timed:
        raise ValueError(f"no timed steps: {len(step_times)} steps recorded, {skip} skipped as warm-up.")
    return statistics.median(timed)


def ratio(ours: float, trl: float | None) -> float | None:
    """ours / TRL (below 1: this project is faster); None when there is no TRL side."""
    return None if trl is None else ours / trl


def our_step_records(records: list[dict]) -> list[dict]:
    """The training-step records of a run's metrics.jsonl, in step order (the step-0 eval record has no perf keys),
    each with step_s = generate + score + update, the step start to after optimizer.step."""
    steps = sorted((r for r in records if all(k in r for k in PHASES)), key=lambda r: r["step"])
    return [dict(r, step_s=sum(r[k] for k in PHASES)) for r in steps]


def summarize_ours(records: list[dict], skip: int) -> dict:
    """Per-step times, the median of each phase and of the step, and the mean response length of the timed steps."""
    steps = our_step_records(records)
    summary = dict(
        step_times=[r["step_s"] for r in steps],
        median_s=timed_median([r["step_s"] for r in steps], skip),
        mean_response_tokens=statistics.fmean(r["train/response_tokens"] for r in steps[skip:]),
    )
    for key in PHASES:
        summary[f"median_{key.removeprefix('perf/')}"] = timed_median([r[key] for r in steps], skip)
    return summary


def summarize_trl(child: dict, skip: int) -> dict:
    """TRL's per-step times (from the callback) reduced like ours; TRL's own step_time metric (its training_step calls,
    without clipping and the optimizer step) beside it as a cross-check."""
    return dict(
        child,
        median_s=timed_median(child["step_times"], skip),
        median_logged_step_time_s=timed_median(child["logged_step_times"], skip)
        if child["logged_step_times"]
        else None,
        mean_response_tokens=statistics.fmean(child["response_tokens"][skip:]),
    )


def format_tables(results: list[dict], machine: dict, settings: dict) -> str:
    """The markdown report: one row per work, then our per-phase medians, then the machine."""

    def s(x):
        return "-" if x is None else f"{x:.3f}"

    steps = f"median of steps {settings['skip'] + 1}-{settings['steps']}"
    lines = [
        f"| work | TRL {machine.get('trl') or '-'} (s/step) | this project (s/step) | ratio (ours / TRL) | "
        "mean response tokens (TRL / ours) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        trl, ours = r.get("trl"), r["ours"]
        trl_name = f"{r['trl_trainer']}: " if trl else ""
        lengths = (
            f"{trl['mean_response_tokens']:.1f} / {ours['mean_response_tokens']:.1f}"
            if trl
            else f"- / {ours['mean_response_tokens']:.1f}"
        )
        lines.append(
            f"| {r['title']} ({trl_name}`{r['command']}`) | {s(trl and trl['median_s'])} | {s(ours['median_s'])} | "
            f"{s(r['ratio'])} | {lengths} |"
        )
    lines += [
        "",
        f"This project per phase ({steps}, s):",
        "",
        "| script | generate | score | update | step |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        o = r["ours"]
        lines.append(
            f"| `{r['command']}` | {o['median_generate_s']:.3f} | {o['median_score_s']:.3f} | "
            f"{o['median_update_s']:.3f} | {o['median_s']:.3f} |"
        )
    lines += [
        "",
        f"{settings['prompts_per_step']} prompts x {settings['group_size']} responses per step, "
        f"at most {settings['max_new_tokens']} new tokens, "
        f"{steps}, float32 on CPU; machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads; "
        f"torch {machine['torch']}, transformers {machine['transformers']}, commit {machine['git_commit'] or '?'}"
        f"{' (uncommitted changes)' if machine.get('dirty') else ''}.",
    ]
    return "\n".join(lines)


def require_trl() -> None:
    """One sentence and exit when TRL is missing (it is a benchmark-only dependency)."""
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "TRL is not installed, and this benchmark compares against it: pip install -r requirements-bench.txt"
        )


# TRY NOT TO MODIFY: machine, paths, subprocesses
def child_env(args) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def machine_info(args) -> dict:
    """CPU model, cores, the torch threads a run gets (probed in a subprocess with the runs' environment), versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    probe = (
        "import json, torch, transformers, importlib.metadata as m, importlib.util as u; "
        "print(json.dumps(dict(torch_threads=torch.get_num_threads(), "
        "torch=torch.__version__, transformers=transformers.__version__, "
        "trl=m.version('trl') if u.find_spec('trl') else None)))"
    )
    versions = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], env=child_env(args), capture_output=True, text=True, check=True
        ).stdout
    )
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        python=platform.python_version(),
        git_commit=git.stdout.strip() or None,
        dirty=bool(dirty.stdout.strip()),
        **versions,
    )


def toy_paths(toy_dir: str | None) -> dict[str, str]:
    """student/teacher folders and train/test files: from --toy-dir, else the cached toy task (built if missing)."""
    if toy_dir is None:
        sys.path.insert(0, str(ROOT))
        import toy_math

        return {kind: toy_math.resolve("toy", kind) for kind in ("student", "teacher", "train", "test")}
    folder = Path(toy_dir)
    paths = dict(
        student=folder / "student", teacher=folder / "teacher", train=folder / "train.jsonl", test=folder / "test.jsonl"
    )
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(
            f"--toy-dir {toy_dir} lacks {', '.join(missing)}; "
            "pass a toy build folder (student/, teacher/, train.jsonl, test.jsonl)."
        )
    return {k: str(p) for k, p in paths.items()}


def run_logged(cmd: list[str], log_path: Path, env: dict) -> float:
    """Run one side to completion with its output in log_path; exit with the log's tail if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(
            f"{tail}\n`{' '.join(cmd)}` failed with exit status {proc.returncode}; its full output is in {log_path}."
        )
    return time.time() - start


def our_command(work: str, args, paths: dict, output_dir: str) -> list[str]:
    """Our script as a user would run it, with every setting the comparison depends on spelled out."""
    script, *method_flags = WORKS[work][1]
    return [
        sys.executable,
        script,
        *method_flags,
        "--student",
        paths["student"],
        "--teacher",
        paths["teacher"],
        "--dataset",
        paths["train"],
        "--eval-dataset",
        paths["test"],
        "--output-dir",
        output_dir,
        "--exp-name",
        f"bench_{work}",
        "--seed",
        str(args.seed),
        "--num-steps",
        str(args.steps),
        "--eval-interval",
        "0",
        "--eval-limit",
        "1",
        "--save-interval",
        "0",
        "--diagnostic-interval",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-gradient-checkpointing",
        "--prompts-per-step",
        str(args.prompts_per_step),
        "--group-size",
        str(args.group_size),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--temperature",
        "1.0",
        "--learning-rate",
        str(args.learning_rate),
        "--max-grad-norm",
        "1.0",
        "--update-epochs",
        "1",
    ]


def run_ours(work: str, args, paths: dict, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(
        prefix=f"bench_{work}_", dir=log_dir
    ) as output_dir:  # the run folder, checkpoint included
        cmd = our_command(work, args, paths, output_dir)
        run_logged(cmd, log_dir / f"ours_{work}.log", child_env(args))
        (run_dir,) = Path(output_dir).iterdir()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(summarize_ours(records, args.skip), argv=[Path(cmd[1]).name, *cmd[2:]])


def run_trl(work: str, args, log_dir: Path) -> dict:
    result = log_dir / f"trl_{work}.json"
    result.unlink(missing_ok=True)
    settings = (
        "steps",
        "skip",
        "toy_dir",
        "threads",
        "seed",
        "prompts_per_step",
        "group_size",
        "micro_batch_size",
        "max_new_tokens",
        "learning_rate",
    )
    flags = [
        x
        for name in settings
        if getattr(args, name) is not None
        for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))
    ]
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags, "--child", work, "--child-result", str(result)]
    run_logged(cmd, log_dir / f"trl_{work}.log", child_env(args))
    return summarize_trl(json.loads(result.read_text()), args.skip)


# ALGO LOGIC: TRL's side, run in its own process (--child)
def trl_child(args) -> None:
    """Train with TRL's trainer for `args.child` for args.steps optimizer steps and write per-step times as JSON."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT))
    import common
    from lagrangian_distill import batch_indices

    paths = toy_paths(args.toy_dir)
    batch_size = args.prompts_per_step * args.group_size  # completions per optimizer step
    tokenizer = common.load_tokenizer(paths["student"])  # left padding, pad token set, as our scripts load it
    problems = common.load_problems(paths["train"], "train")  # gold: the text after ####
    # the prompts of our run, step by step (the same seeded order); shuffle_dataset=False keeps it
    order = [
        i
        for step in range(args.steps + 1)
        for i in batch_indices(step, args.prompts_per_step, len(problems), args.seed)
    ]
    student = common.load_model(paths["student"], torch.device("cpu"), torch.float32)

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin to on_step_end) and the logged mean completion length."""

        def __init__(self):
            self.step_times, self.response_tokens, self.logged_step_times, self.start = [], [], [], None

        def on_step_begin(self, training_args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, training_args, state, control, **kwargs):
            self.step_times.append(time.perf_counter() - self.start)

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # logging_steps=1: this step's mean
                self.response_tokens.append(logs["completions/mean_length"])
                self.logged_step_times.append(logs.get("step_time"))

    timer = StepTimer()
    output_dir = tempfile.mkdtemp(prefix="bench_trl_")  # TRL writes nothing with save_strategy="no"; removed below
    shared = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        # gradient checkpointing (its transformers 5 name): TRL defaults it on; ours is off
        activation_checkpointing=False,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=batch_size // args.micro_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW as in our scripts (not the fused variant)
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        shuffle_dataset=False,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    specific = (
        dict(beta=1.0)
        if args.child == "kd"
        else dict(
            num_generations=args.group_size,
            beta=0.0,
            loss_type="dr_grpo",
            scale_rewards="none",
            num_iterations=1,
            epsilon=0.2,
        )
    )
    if args.child == "kd":
        # DistillationTrainer samples one completion per dataset row: each prompt appears group_size times in a row
        rows = [
            dict(prompt=common.render_prompt(tokenizer, problems[i]["question"]))
            for i in order
            for _ in range(args.group_size)
        ]
        config = trl.DistillationConfig(**shared, **specific)  # beta 1: reverse KL(student || teacher); on-policy only
        teacher = common.load_model(paths["teacher"], torch.device("cpu"), torch.float32).eval().requires_grad_(False)
        trainer = trl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    else:

        def correctness(completions, answer, **kwargs) -> list[float]:
            """The project's grader, as our training reward: 1.0 when the completion's final answer equals the gold."""
            return [float(common.is_correct(c, a)) for c, a in zip(completions, answer)]

        rows = [
            dict(prompt=common.render_prompt(tokenizer, problems[i]["question"]), answer=problems[i]["answer"])
            for i in order
        ]
        config = trl.GRPOConfig(**shared, **specific)  # beta 0: no reference model; Dr. GRPO: no std scaling
        trainer = trl.GRPOTrainer(
            model=student,
            reward_funcs=correctness,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    config = {k: v for k, v in {**shared, **specific}.items() if k != "output_dir"}
    Path(args.child_result).write_text(
        json.dumps(
            dict(
                step_times=timer.step_times,
                response_tokens=timer.response_tokens,
                logged_step_times=[t for t in timer.logged_step_times if t is not None],
                trainer=type(trainer).__name__,
                trl=trl.__version__,
                config=config,
                torch_threads=torch.get_num_threads(),
            )
        )
    )


def main(args) -> None:
    if args.child:
        trl_child(args)
        return
    if any(WORKS[w][2] for w in args.works):
        require_trl()
    if args.toy_dir is not None:  # the runs start in the repository root: absolute paths only
        args.toy_dir = str(Path(args.toy_dir).resolve())
    paths = toy_paths(args.toy_dir)
    out = Path(args.out).resolve()
    log_dir = out.parent / f"{out.stem}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args)
    if machine["trl"] is not None and machine["trl"] != TRL_PIN:
        print(f"note: TRL {machine['trl']} is installed; requirements-bench.txt pins {TRL_PIN}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_result")}
    results = []
    for work in args.works:  # one process at a time: ours, then TRL's
        title, (script, *method_flags), trl_trainer = WORKS[work]
        print(f"{work}: {' '.join([script, *method_flags])} ...", flush=True)
        ours = run_ours(work, args, paths, log_dir)
        trl_side = None
        if trl_trainer:
            print(f"{work}: trl.{trl_trainer} ...", flush=True)
            trl_side = run_trl(work, args, log_dir)
            if trl_side["torch_threads"] != machine["torch_threads"]:
                print(
                    f"warning: TRL ran with {trl_side['torch_threads']} torch threads, "
                    f"our scripts with {machine['torch_threads']}",
                    flush=True,
                )
        results.append(
            dict(
                work=work,
                title=title,
                command=" ".join([script, *method_flags]),
                trl_trainer=trl_trainer,
                ours=ours,
                trl=trl_side,
                ratio=ratio(ours["median_s"], trl_side and trl_side["median_s"]),
            )
        )
    print(format_tables(results, machine, settings))
    out.write_text(json.dumps(dict(machine=machine, settings=settings, toy=paths, results=results), indent=2) + "\n")
    print(f"results: {out}; the runs' output: {log_dir}/")


if __name__ == "__main__":
    main(parse_args())
