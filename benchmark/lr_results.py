"""The learning-rate sweep's table (benchmark/lr_sweep.sh): per method and learning rate, mean ± std over seeds.

Reads each run's metrics.jsonl only (no model is evaluated): the in-run greedy eval on the first 200 toy test
problems at step 0 and at the last step, the sampled training reward (T = 1) over the first and the last 10 steps,
and the final eval's mean KL and CSR at the run's budget (0.05).

    python benchmark/lr_results.py runs/lr_sweep
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def summarise(run: Path) -> dict | None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    args = json.loads((run / "config.json").read_text())["args"]
    evals = [r for r in records if "eval/accuracy" in r]
    train = [r for r in records if "train/reward" in r]
    if len(train) < args["num_steps"]:
        return None  # unfinished
    return dict(
        seed=args["seed"],
        acc0=evals[0]["eval/accuracy"],
        acc=evals[-1]["eval/accuracy"],
        reward0=np.mean([r["train/reward"] for r in train[:10]]),
        reward=np.mean([r["train/reward"] for r in train[-10:]]),
        kl=evals[-1]["eval/mean_kl"],
        csr=evals[-1]["eval/csr"],
    )


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(sweep: Path) -> None:
    cells = defaultdict(list)  # (method, lr) -> [summary per seed]
    for config in sorted(sweep.glob("*/config.json")):
        name = json.loads(config.read_text())["args"]["exp_name"]
        method, lr = name.rsplit("_lr", 1)
        if (summary := summarise(config.parent)) is not None:
            cells[method, float(lr)].append(summary)
    order = ["cmdp", "grpo", "fixed1", "dual", "kd"]
    print(
        "| method | learning rate | seeds | greedy accuracy, step 0 | greedy accuracy, last step | change | "
        "sampled reward, first 10 steps | sampled reward, last 10 steps | mean KL, last step | CSR at 0.05, last step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (method, lr), runs in sorted(
        cells.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])
    ):
        get = lambda key: [r[key] for r in runs]  # noqa: E731
        change = [r["acc"] - r["acc0"] for r in runs]
        print(
            f"| {method} | {lr:g} | {len(runs)} | {fmt(get('acc0'))} | {fmt(get('acc'))} | "
            f"{np.mean(change):+.3f} (min {min(change):+.3f}) | "
            f"{fmt(get('reward0'))} | {fmt(get('reward'))} | {fmt(get('kl'))} | {fmt(get('csr'))} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lr_sweep"))
