"""Evaluate and aggregate the toy sweep (benchmark/toy_sweep.sh): markdown tables and two plots.

Every finished run's last checkpoint is evaluated twice by eval_math.py on all 500 toy test problems with the toy
teacher: greedily (`eval_greedy/`) and with one sampled response per problem at temperature 1 (`eval_sampled/`),
unless that was done already; the starting student and the teacher are evaluated once as reference rows. Each
response's cost is in results.jsonl, so CSR is reported at every budget of the sweep for every run, budget-free
baselines included. Outputs: {sweep}/results.md (one table per budget: mean ± std over seeds; one of greedy accuracy,
CSR and cost on the toy task's "sells" problems against the others), {docs}/accuracy_vs_csr.png
(one point per method and setting, greedy and sampled, one panel per budget) and {docs}/training_curves.png (sampled
CSR, mean KL and lambda over training at the default budget).

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

DEFAULT_BUDGET = 0.05  # the training curves' panel
ORDER = ("cmdp", "dual", "fixed", "grpo", "kd")  # table and legend order by exp-name prefix
DECODINGS = {"greedy": 0.0, "sampled": 1.0}


def evaluate(model, out: Path, temperature: float) -> tuple[dict, np.ndarray]:
    """eval_math.py's summary and per-response costs for `model` (a path, or a function giving one), cached in `out`."""
    if not (out / "summary.json").exists():
        model = model() if callable(model) else model
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "eval_math.py"),
                "--model",
                str(model),
                "--teacher",
                "toy",
                "--max-new-tokens",
                "64",
                "--temperature",
                str(temperature),
                "--batch-size",
                "250",
                "--output-dir",
                str(out),
            ],
            check=True,
            cwd=ROOT,
        )
    costs = np.array([json.loads(line)["cost"] for line in (out / "results.jsonl").read_text().splitlines()])
    return json.loads((out / "summary.json").read_text()), costs


def correct_and_sells(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per problem of the evaluation in `out` (results.jsonl order): answered correctly; has a "sells" step (the toy
    task's shared blind spot, where reward and teacher disagree)."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return np.array([r["correct"] for r in records], dtype=bool), np.array(
        [" sells " in r["question"] for r in records]
    )


def sort_key(name: str) -> tuple:
    prefix = next((i for i, p in enumerate(ORDER) if name.startswith(p)), len(ORDER))
    return prefix, name


def cell(values, bold=False) -> str:
    text = f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    return f"**{text}**" if bold else text


def main(sweep: Path, docs: Path = ROOT / "docs") -> None:
    runs = defaultdict(
        list
    )  # exp_name -> [dict(seed, args, greedy, sampled, metrics)], greedy/sampled = (summary, costs)
    for run in sorted(p for p in sweep.iterdir() if (p / "config.json").exists()):
        args = json.loads((run / "config.json").read_text())["args"]
        checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints or int(checkpoints[-1].name.split("-")[1]) != args["num_steps"]:
            print(f"skipping unfinished run {run}")
            continue
        evals = {d: evaluate(checkpoints[-1], run / f"eval_{d}", t) for d, t in DECODINGS.items()}
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[args["exp_name"]].append(
            dict(
                seed=args["seed"],
                args=args,
                metrics=metrics,
                correct=correct_and_sells(run / "eval_greedy")[0],
                **evals,
            )
        )
    if not runs:
        sys.exit(f"no finished runs in {sweep}: run benchmark/toy_sweep.sh first")
    # the budget each method was trained for (None for the budget-free baselines)
    own_budget = {
        name: rs[0]["args"]["budget"] if name.startswith(("cmdp", "dual")) else None for name, rs in runs.items()
    }
    budgets = sorted({b for b in own_budget.values() if b is not None}) or [DEFAULT_BUDGET]
    reference = {
        name: {
            d: evaluate(lambda name=name: toy_math.resolve("toy", name), sweep / f"eval_{name}_{d}", t)
            for d, t in DECODINGS.items()
        }
        for name in ("teacher", "student")
    }
    g_correct = {name: correct_and_sells(sweep / f"eval_{name}_greedy")[0] for name in reference}
    sells = correct_and_sells(sweep / "eval_student_greedy")[1]
    names = sorted(runs, key=sort_key)

    def train_minutes(r):  # sampling + teacher scoring + update, without the periodic evals
        return (
            sum(
                m["perf/generate_s"] + m["perf/score_s"] + m["perf/update_s"]
                for m in r["metrics"]
                if "perf/generate_s" in m
            )
            / 60
        )

    lines = []
    for b in budgets:
        lines += [
            f"### Budget {b} (CSR: fraction of responses with cost <= {b})",
            "",
            "| method | seeds | greedy accuracy | sampled accuracy | greedy CSR | sampled CSR | "
            "greedy: correct and within budget | mean KL (greedy) | steps | train min/run |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, ev in reference.items():
            (g, gc), (s, sc) = ev["greedy"], ev["sampled"]
            lines.append(
                f"| {name} (reference) | - | {g['accuracy']:.3f} | {s['accuracy']:.3f} | "
                f"{np.mean(gc <= b):.3f} | {np.mean(sc <= b):.3f} | "
                f"{np.mean((gc <= b) & g_correct[name]):.3f} | {g['mean_kl']:.3f} | - | - |"
            )
        for name in names:
            if own_budget[name] not in (None, b):
                continue
            rs = runs[name]
            own = own_budget[name] == b
            lines.append(
                f"| {name} | {len(rs)} | {cell([r['greedy'][0]['accuracy'] for r in rs])} | "
                f"{cell([r['sampled'][0]['accuracy'] for r in rs])} | "
                f"{cell([np.mean(r['greedy'][1] <= b) for r in rs], bold=own)} | "
                f"{cell([np.mean(r['sampled'][1] <= b) for r in rs], bold=own)} | "
                f"{cell([np.mean((r['greedy'][1] <= b) & r['correct']) for r in rs])} | "
                f"{cell([r['greedy'][0]['mean_kl'] for r in rs])} | {rs[0]['args']['num_steps']} | "
                f"{np.mean([train_minutes(r) for r in rs]):.1f} |"
            )
        lines.append("")
    # where reward and teacher disagree: the problems with a "sells" step (greedy responses, each run's own budget)
    lines += [
        f'### Greedy responses on the {sells.sum()} problems with a "sells" step and on the {(~sells).sum()} others '
        f"(CSR at the run's own budget; budget-free runs at {DEFAULT_BUDGET})",
        "",
        "| method | accuracy, sells | accuracy, others | CSR, sells | CSR, others | "
        "median cost, sells | median cost, others |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["student", *names]:
        evals = (
            [(g_correct[name], reference[name]["greedy"][1])]
            if name == "student"
            else [(r["correct"], r["greedy"][1]) for r in runs[name]]
        )
        b = own_budget.get(name) or DEFAULT_BUDGET
        cols = [
            [f(c, k) for c, k in evals]
            for f in (
                lambda c, k: c[sells].mean(),
                lambda c, k: c[~sells].mean(),
                lambda c, k: np.mean(k[sells] <= b),
                lambda c, k: np.mean(k[~sells] <= b),
                lambda c, k: np.median(k[sells]),
                lambda c, k: np.median(k[~sells]),
            )
        ]
        lines.append(
            f"| {name if name != 'student' else 'student (reference)'} | " + " | ".join(cell(v) for v in cols) + " |"
        )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    (sweep / "results.md").write_text(table)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {sweep / 'results.md'}; plots skipped: pip install matplotlib==3.11.2")
        return
    docs.mkdir(parents=True, exist_ok=True)
    families = list(dict.fromkeys(name.split("_")[0] for name in names))
    markers = dict(zip(sorted({name for name in names if own_budget[name] is None}), "^sDvP<>"))

    def style(name):  # one colour per method family; budget-free baselines get their own markers
        return dict(color=plt.cm.tab10(families.index(name.split("_")[0]) % 10), marker=markers.get(name, "o"))

    # accuracy vs CSR: one panel per budget and decoding; mean over seeds with a one-std cross, seeds faint
    fig, axes = plt.subplots(2, len(budgets), figsize=(5 * len(budgets), 9), squeeze=False)
    for row, decoding in enumerate(DECODINGS):
        for ax, b in zip(axes[row], budgets):
            for name in names:
                if own_budget[name] not in (None, b):
                    continue
                xs = [np.mean(r[decoding][1] <= b) for r in runs[name]]
                ys = [r[decoding][0]["accuracy"] for r in runs[name]]
                ax.scatter(xs, ys, s=12, alpha=0.3, **style(name))
                ax.errorbar(
                    np.mean(xs),
                    np.mean(ys),
                    xerr=np.std(xs),
                    yerr=np.std(ys),
                    ms=8,
                    capsize=2,
                    label=name,
                    **style(name),
                )
            for name, ev in reference.items():
                summary, costs = ev[decoding]
                ax.scatter(
                    [np.mean(costs <= b)],
                    [summary["accuracy"]],
                    marker="*",
                    s=160,
                    color="black" if name == "teacher" else "gray",
                    label=name,
                )
            ax.set_title(f"budget {b}, {decoding} responses")
            ax.set_xlabel(f"CSR (fraction of responses with cost <= {b})")
            ax.set_ylabel(f"{decoding} accuracy, 500 toy test problems")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(docs / "accuracy_vs_csr.png", dpi=100)

    # training curves at the default budget: 10-step moving average (lambda unsmoothed), mean ± std over seeds
    panels = [
        ("train/csr", f"CSR of sampled responses (budget {DEFAULT_BUDGET})"),
        ("train/mean_kl", "mean per-token KL of sampled responses"),
        ("train/reward", "sampled reward (accuracy at T = 1)"),
        ("dual/lambda", "lambda (Lagrangian runs)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2))
    for ax, (key, label) in zip(axes, panels):
        for name in names:
            if own_budget[name] not in (None, DEFAULT_BUDGET) or not any(key in m for m in runs[name][0]["metrics"]):
                continue
            curves = [
                [(m["step"], m[key]) for m in r["metrics"] if key in m and "train/reward" in m] for r in runs[name]
            ]
            length = min(len(c) for c in curves)
            window = min(10, length) if key.startswith("train/") else 1
            steps = np.array([s for s, _ in curves[0][:length]])[window - 1 :]
            curves = np.array(
                [np.convolve([v for _, v in c[:length]], np.ones(window) / window, mode="valid") for c in curves]
            )
            ax.plot(
                steps,
                curves.mean(0),
                color=style(name)["color"],
                linestyle="-" if name.startswith("cmdp") else "--" if own_budget[name] else ":",
                marker=style(name)["marker"] if own_budget[name] is None else None,
                markevery=25,
                ms=4,
                label=name,
            )
            ax.fill_between(
                steps,
                curves.mean(0) - curves.std(0),
                curves.mean(0) + curves.std(0),
                color=style(name)["color"],
                alpha=0.12,
            )
        if key == "train/mean_kl":
            ax.axhline(DEFAULT_BUDGET, color="black", linestyle="--", linewidth=0.8, label=f"budget {DEFAULT_BUDGET}")
        if key == "dual/lambda":
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("step (10-step moving average)" if key.startswith("train/") else "step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(docs / "training_curves.png", dpi=100)
    print(f"wrote {sweep / 'results.md'}, {docs / 'accuracy_vs_csr.png'} and {docs / 'training_curves.png'}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/sweep"),
        Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs",
    )
