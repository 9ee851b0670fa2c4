"""Evaluate and aggregate the toy sweep (benchmark/toy_sweep.sh): a markdown table and two plots.

For every finished run in the sweep directory, its last checkpoint is evaluated by eval_math.py (greedy,
all 500 toy test problems, per-response KL to the toy teacher) unless that was done already; the
starting student and the teacher are evaluated once as reference rows. Each response's mean KL is in
eval_final/results.jsonl, so CSR is reported at every budget of the sweep, for every run. Outputs:
{sweep}/results.md (mean ± std over seeds per method and budget), docs/accuracy_vs_csr.png (one point
per run, one panel per budget) and docs/mean_kl_over_training.png (training curves at budget 0.05, and GRPO).

    python benchmark/toy_results.py runs/sweep          # plots need: pip install matplotlib==3.11.2
    python benchmark/toy_results.py runs/sweep /tmp/plots   # plots elsewhere than docs/
"""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import toy_math  # noqa: E402

BUDGETS = (0.02, 0.05, 0.1)  # the sweep's budgets; budget-free baselines are scored at all of them
ORDER = ("cmdp", "dual", "fixed", "grpo", "kd")  # table and legend order by exp-name prefix


def evaluate(model, budget: float, out: Path) -> tuple[dict, np.ndarray]:
    """eval_math.py's summary and per-response mean KLs for `model` (a path, or a function giving one), cached in `out`."""
    if not (out / "summary.json").exists():
        model = model() if callable(model) else model
        subprocess.run([sys.executable, str(ROOT / "eval_math.py"), "--model", str(model), "--teacher", "toy", "--budget", str(budget),
                        "--max-new-tokens", "64", "--output-dir", str(out)], check=True, cwd=ROOT)
    kls = np.array([json.loads(line)["mean_kl"] for line in (out / "results.jsonl").read_text().splitlines()])
    return json.loads((out / "summary.json").read_text()), kls


def sort_key(name: str) -> tuple:
    prefix = next((i for i, p in enumerate(ORDER) if name.startswith(p)), len(ORDER))
    return prefix, name


def main(sweep: Path, docs: Path = ROOT / "docs") -> None:
    runs = defaultdict(list)  # exp_name -> [dict(seed, args, summary, kls, metrics)]
    for run in sorted(p for p in sweep.iterdir() if (p / "config.json").exists()):
        args = json.loads((run / "config.json").read_text())["args"]
        checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints or int(checkpoints[-1].name.split("-")[1]) != args["num_steps"]:
            print(f"skipping unfinished run {run}")
            continue
        summary, kls = evaluate(checkpoints[-1], args["budget"], run / "eval_final")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[args["exp_name"]].append(dict(seed=args["seed"], args=args, summary=summary, kls=kls, metrics=metrics))
    if not runs:
        sys.exit(f"no finished runs in {sweep}: run benchmark/toy_sweep.sh first")
    # the budget each method was trained for (None for the budget-free baselines) and its colour family
    own_budget = {name: rs[0]["args"]["budget"] if name.startswith(("cmdp", "dual")) else None for name, rs in runs.items()}
    family = {name: name.split("_d")[0] if own_budget[name] is not None else name for name in runs}  # cmdp_d0.05 -> cmdp
    reference = {name: evaluate(lambda name=name: toy_math.resolve("toy", name), 0.05, sweep / f"eval_{name}") for name in ("teacher", "student")}

    def cell(values, bold=False):
        text = f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
        return f"**{text}**" if bold else text

    def train_minutes(r):  # sampling + teacher scoring + update, without the periodic evals
        return sum(m["perf/generate_s"] + m["perf/score_s"] + m["perf/update_s"] for m in r["metrics"] if "perf/generate_s" in m) / 60

    csr_head = " | ".join(f"CSR at {b}" for b in BUDGETS)
    lines = [f"| method | budget | seeds | accuracy | mean KL | {csr_head} | steps | train min/run |",
             "|---|---|---|---|---|" + "---|" * len(BUDGETS) + "---|---|"]
    for name, (summary, kls) in reference.items():
        csrs = " | ".join(f"{np.mean(kls <= b):.3f}" for b in BUDGETS)
        lines.append(f"| {name} (reference) | - | - | {summary['accuracy']:.3f} | {summary['mean_kl']:.3f} | {csrs} | - | - |")
    for name in sorted(runs, key=sort_key):
        rs, budget = runs[name], own_budget[name]
        csrs = " | ".join(cell([np.mean(r["kls"] <= b) for r in rs], bold=b == budget) for b in BUDGETS)
        lines.append(f"| {name} | {budget if budget is not None else '-'} | {len(rs)} | {cell([r['summary']['accuracy'] for r in rs])} | "
                     f"{cell([r['summary']['mean_kl'] for r in rs])} | {csrs} | {rs[0]['args']['num_steps']} | "
                     f"{np.mean([train_minutes(r) for r in rs]):.1f} |")
    table = "\n".join(lines)
    print(table)
    (sweep / "results.md").write_text(table + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {sweep / 'results.md'}; plots skipped: pip install matplotlib")
        return
    docs.mkdir(parents=True, exist_ok=True)
    names = sorted(runs, key=sort_key)
    families = list(dict.fromkeys(family[n] for n in names))
    colors = {n: plt.cm.tab10(families.index(family[n]) % 10) for n in names}  # one colour per method, whatever the budget

    # accuracy vs CSR: one panel per budget, CMDP and dual ascent at that budget, budget-free baselines everywhere
    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(5 * len(BUDGETS), 4.5), sharey=True)
    for ax, b in zip(axes, BUDGETS):
        for name in names:
            if own_budget[name] not in (None, b):
                continue
            rs = runs[name]
            ax.scatter([np.mean(r["kls"] <= b) for r in rs], [r["summary"]["accuracy"] for r in rs], color=colors[name], s=30,
                       marker="^" if own_budget[name] is None else "o", label=name)
        for name, (summary, kls) in reference.items():
            ax.scatter([np.mean(kls <= b)], [summary["accuracy"]], marker="*", s=160, color="black" if name == "teacher" else "gray", label=name)
        ax.set_title(f"budget {b}")
        ax.set_xlabel(f"CSR (fraction of responses with mean KL <= {b})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("greedy accuracy, 500 toy test problems")
    fig.tight_layout()
    fig.savefig(docs / "accuracy_vs_csr.png", dpi=110)

    # training curves at budget 0.05: mean over seeds of a 10-step moving average (lambda unsmoothed), ± one std over seeds
    panels = [("train/mean_kl", "mean per-token KL of sampled responses"), ("train/csr", "CSR of sampled responses (budget 0.05)"),
              ("dual/lambda", "lambda (Lagrangian runs)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, label) in zip(axes, panels):
        for name in names:
            if not (own_budget[name] == 0.05 or name.startswith(("fixed", "grpo"))) or not any(key in m for m in runs[name][0]["metrics"]):
                continue
            curves = [[(m["step"], m[key]) for m in r["metrics"] if key in m] for r in runs[name]]
            length = min(len(c) for c in curves)
            window = min(10, length) if key.startswith("train/") else 1  # short runs: a shorter window
            steps = np.array([s for s, _ in curves[0][:length]])[window - 1 :]
            curves = np.array([np.convolve([v for _, v in c[:length]], np.ones(window) / window, mode="valid") for c in curves])
            ax.plot(steps, curves.mean(0), color=colors[name], label=name)
            ax.fill_between(steps, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0), color=colors[name], alpha=0.15)
        if key == "train/mean_kl":
            ax.axhline(0.05, color="black", linestyle="--", label="budget 0.05")
        if key == "dual/lambda":
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("step (10-step moving average)" if key.startswith("train/") else "step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "mean_kl_over_training.png", dpi=110)
    print(f"wrote {sweep / 'results.md'}, {docs / 'accuracy_vs_csr.png'} and {docs / 'mean_kl_over_training.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/sweep"), Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs")
