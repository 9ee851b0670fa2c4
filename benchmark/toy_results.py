"""Evaluate and aggregate the toy sweep (benchmark/toy_sweep.sh): a markdown table and two plots.

For every run folder in the sweep directory, its last checkpoint is evaluated by eval_math.py (greedy,
all 500 toy test problems, KL and CSR to the toy teacher at the run's own budget) unless that was done
already; then the table (mean +- std over seeds per method and budget, with the starting student and
the teacher as reference rows) is printed and written to {sweep}/results.md, and the plots go to docs/:
accuracy vs CSR (one point per run) and mean KL over training steps with the budget as a line.

    python benchmark/toy_results.py runs/sweep          # plots need: pip install matplotlib
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


def evaluate(model: str, budget: float, out: Path) -> dict:
    if not (out / "summary.json").exists():
        subprocess.run([sys.executable, str(ROOT / "eval_math.py"), "--model", model, "--teacher", "toy", "--budget", str(budget),
                        "--max-new-tokens", "64", "--output-dir", str(out)], check=True, cwd=ROOT)
    return json.loads((out / "summary.json").read_text())


def main(sweep: Path) -> None:
    rows = defaultdict(list)  # exp_name -> [(seed, summary, metrics, args)]
    for run in sorted(p for p in sweep.iterdir() if (p / "config.json").exists()):
        args = json.loads((run / "config.json").read_text())["args"]
        checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints or int(checkpoints[-1].name.split("-")[1]) != args["num_steps"]:
            print(f"skipping unfinished run {run}")
            continue
        summary = evaluate(str(checkpoints[-1]), args["budget"], run / "eval_final")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[args["exp_name"]].append((args["seed"], summary, metrics, args))
    budgets = sorted({a["budget"] for runs in rows.values() for *_, a in runs}) or [0.05]
    reference = {name: evaluate(str(toy_math.resolve("toy", name)), b, sweep / f"eval_{name}_{b}") for name in ("student", "teacher") for b in budgets[:1]}

    def cell(values):
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    lines = ["| method | budget | seeds | accuracy | mean KL | CSR at budget | steps |", "|---|---|---|---|---|---|---|"]
    for name, run in reference.items():
        lines.append(f"| {name} (reference) | {budgets[0]} | - | {run['accuracy']:.3f} | {run['mean_kl']:.3f} | {run['csr']:.3f} | - |")
    for name, runs in sorted(rows.items()):
        s = [r[1] for r in runs]
        lines.append(f"| {name} | {runs[0][3]['budget']} | {len(runs)} | {cell([x['accuracy'] for x in s])} | "
                     f"{cell([x['mean_kl'] for x in s])} | {cell([x['csr'] for x in s])} | {runs[0][3]['num_steps']} |")
    table = "\n".join(lines)
    print(table)
    (sweep / "results.md").write_text(table + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib")
        return
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, runs in sorted(rows.items()):
        ax.scatter([r[1]["csr"] for r in runs], [r[1]["accuracy"] for r in runs], label=name, s=30)
    for name, run in reference.items():
        ax.scatter([run["csr"]], [run["accuracy"]], marker="*", s=150, color="black" if name == "teacher" else "gray", label=f"{name} (start)" if name == "student" else name)
    ax.set_xlabel("CSR (fraction of responses with mean KL <= budget)")
    ax.set_ylabel("greedy accuracy (500 toy test problems)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "accuracy_vs_csr.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, runs in sorted(rows.items()):
        if not name.startswith(("cmdp", "dual", "fixed")) or runs[0][3]["budget"] != 0.05:
            continue
        steps = [m["step"] for m in runs[0][2] if "train/mean_kl" in m]
        curves = np.array([[m["train/mean_kl"] for m in r[2] if "train/mean_kl" in m] for r in runs])
        ax.plot(steps, curves.mean(0), label=name)
    ax.axhline(0.05, color="black", linestyle="--", label="budget 0.05")
    ax.set_xlabel("step")
    ax.set_ylabel("mean per-token KL of sampled responses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "mean_kl_over_training.png", dpi=120)
    print(f"wrote {docs / 'accuracy_vs_csr.png'} and {docs / 'mean_kl_over_training.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep"))
