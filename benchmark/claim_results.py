"""Tables and front plots of the claim sweep (benchmark/claim_sweep.py), from its committed compact results alone.

For every run (one result file per run and seed): greedy accuracy on its evaluation split, CSR at each budget (a
response satisfies the per-token constraint when its mean per-token KL <= d, compared at full precision), the sum
form's CSR on its own per-response budget (summed KL <= d x 19.5), the fraction both correct and within budget, how
many steps the in-run evals (200 validation problems, every 50 steps) took to settle, and the median gradient norms
of the two loss terms. Mean ± sample standard deviation (n - 1) over seeds. Then, per budget, each method family's
Pareto front of greedy accuracy against CSR over its settings, one plot per budget (docs/claim_fronts_d{d}.png) with
the starting student and the teacher as reference points, and the setting each family would choose on the
validation split: the highest "correct and within budget" (per-token, the yardstick of every family); ties go to the
higher CSR, then the higher accuracy, then the lower mean KL.

    python benchmark/claim_results.py                   # prints the markdown tables; plots need matplotlib==3.11.2
    python benchmark/claim_results.py --out /tmp/plots  # plots elsewhere than docs/
"""

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmark" / "results" / "claim"
BUDGETS = (0.013, 0.05, 0.1)  # d_pilot (docs/results.md, "Choosing the budget"), the default, twice it
FAMILIES = {
    "cmdp": "CMDP (per-token mean)",
    "cmdpsum": "CMDP (sum form)",
    "dual": "dual ascent",
    "fixed": "fixed lambda",
}
COLOURS = {"cmdp": "tab:blue", "cmdpsum": "tab:cyan", "dual": "tab:orange", "fixed": "tab:green"}
# not lr-ablation: no method tunes its learning rate
TUNING_CHUNKS = ("tune-d0.05", "refine-d0.05", "tune-d0.1", "tune-d0.013")
MEAN_TOKENS = 19.5  # the sum form's per-response budget is d x MEAN_TOKENS (benchmark/claim_sweep.py)
TARGET_CSR, TARGET_ACC = 0.9, 0.95  # "reaches the budget without losing the reward": what a user would search for
SETTLE_TOL = {"eval/accuracy": 0.03, "eval/csr": 0.05}  # in-run evals: 200 problems, standard error about 0.02-0.03


def load(results: Path, split: str, chunks: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    """Run name -> its result files (one per seed) evaluated on `split` (val.jsonl or test.jsonl), optionally only
    those of some chunks."""
    runs = defaultdict(list)
    for path in sorted(results.glob("*/*.json")):
        if path.parent.name == "reference" or (chunks is not None and path.parent.name not in chunks):
            continue
        r = json.loads(path.read_text())
        if r["eval_split"] != split:
            continue
        for key in ("correct", "mean_kl", "response_tokens"):
            r[key] = np.array(r[key], dtype=float)
        r["sum_kl"] = r["mean_kl"] * r["response_tokens"]
        runs[r["run"]].append(r)
    return runs


def reference(split: Path, name: str) -> dict:
    """The starting student's or the teacher's greedy eval on `split` (computed once, then read from its file)."""
    out = RESULTS / "reference" / f"{name}__{split.stem}.json"
    if not out.exists():
        sys.path.insert(0, str(ROOT))
        import toy_math

        tmp = ROOT / "runs" / "claim" / f"reference_{name}_{split.stem}"
        subprocess.run(
            [
                sys.executable,
                "eval_math.py",
                "--model",
                toy_math.resolve("toy", name),
                "--teacher",
                "toy",
                "--dataset",
                str(split),
                "--max-new-tokens",
                "64",
                "--batch-size",
                "250",
                "--output-dir",
                str(tmp),
            ],
            cwd=ROOT,
            check=True,
        )
        rows = [json.loads(line) for line in (tmp / "results.jsonl").read_text().splitlines()]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "run": name,
                    "correct": [int(r["correct"]) for r in rows],
                    "mean_kl": [r["mean_kl"] for r in rows],  # full precision: CSR compares it with d
                }
            )
            + "\n"
        )
    r = json.loads(out.read_text())
    return {k: np.array(r[k], dtype=float) for k in ("correct", "mean_kl")}


def family(name: str) -> str:
    return name.split("_")[0]


def own_budget(r: dict) -> float | None:
    """The per-token budget a run was trained for (the sum form's: its per-response budget / 19.5 tokens); None if
    budget-free."""
    words = r["command"].split()
    if family(r["run"]) == "fixed":
        return None
    budget = float(words[words.index("--budget") + 1])
    return round(budget / 19.5, 4) if "--constraint" in words else budget


def settle_step(r: dict, key: str) -> int:
    """First in-run eval step from which every later eval stays within SETTLE_TOL of the mean of the last three."""
    evals = [(e["step"], e[key]) for e in r["in_run_evals"]]
    final = np.mean([v for _, v in evals[-3:]])
    for i, (step, _) in enumerate(evals):
        if all(abs(v - final) <= SETTLE_TOL[key] for _, v in evals[i:]):
            return step
    return evals[-1][0]


def setting(name: str) -> dict:
    """A run name's knobs, e.g. cmdp_n20_centred_b0.3_lr3e-05 -> n 20, centred, beta 0.3, lr 3e-05."""
    parts = name.split("_")
    lr = float(next((w[2:] for w in parts if w.startswith("lr")), "1e-4"))  # 1e-4: every method's default
    return dict(n=parts[1][1:], adv=parts[2], beta=parts[3][1:], lr=f"{lr:.0e}")


def is_sum_form(r: dict) -> bool:
    return "--constraint sum" in r["command"]


def metrics(r: dict, budget: float) -> dict:
    """A run's scores at the per-token budget d; csr_own: the sum form's on its own budget d x 19.5 per response."""
    within = r["mean_kl"] <= budget
    within_own = r["sum_kl"] <= budget * MEAN_TOKENS if is_sum_form(r) else within
    diag = r.get("train_diagnostic_steps", [])
    pg = np.median([d["losses/pg_grad_norm"] for d in diag]) if diag else float("nan")
    kl = np.median([d["losses/kl_grad_norm"] for d in diag]) if diag else float("nan")
    return dict(
        acc=r["correct"].mean(),
        csr=within.mean(),
        csr_own=within_own.mean(),
        both=(within & (r["correct"] > 0)).mean(),
        kl=r["mean_kl"].mean(),
        settle_acc=settle_step(r, "eval/accuracy"),
        settle_csr=settle_step(r, "eval/csr"),
        pg=pg,
        klg=kl,
    )


def std(values: list[float]) -> float:
    """The sample standard deviation (n - 1) over seeds."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def cell(values: list[float], fmt: str = ".3f") -> str:
    return f"{np.mean(values):{fmt}} ± {std(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"


def choose(rows: list[tuple[str, list[dict]]]) -> tuple[str, float]:
    """A family's setting on validation: the highest correct-and-within; ties go to the higher CSR, then the higher
    accuracy, then the lower mean KL (then the name, for a total order)."""

    def key(row):
        name, ms = row
        mean = lambda k: round(float(np.mean([m[k] for m in ms])), 9)  # noqa: E731
        return (-mean("both"), -mean("csr"), -mean("acc"), mean("kl"), name)

    name, ms = min(rows, key=key)
    return name, float(np.mean([m["both"] for m in ms]))


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points not dominated on (CSR, accuracy), sorted by CSR."""
    return sorted(p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--split",
        type=Path,
        default=ROOT / "runs" / "claim" / "data" / "val.jsonl",
        help="the split the tuning runs were evaluated on (for the reference rows; written by claim_sweep.py)",
    )
    args = parser.parse_args()
    runs = load(args.results, "val.jsonl", TUNING_CHUNKS)
    if not runs:
        raise SystemExit(f"no result files under {args.results}: run benchmark/claim_sweep.py first.")
    refs = {}
    if (RESULTS / "reference").exists() or args.split.exists():
        refs = {name: reference(args.split, name) for name in ("student", "teacher")}
    lines, chosen, reach = [], {}, []
    for budget in BUDGETS:
        lines += [
            f"### Budget d = {budget} (validation split, greedy; CSR: mean per-token KL <= {budget})",
            "",
            "| run | trained for d | seeds | accuracy | CSR | CSR, sum form's own budget | correct and within "
            "| mean KL | settled by step (acc / CSR) | median grad norm, PG / cost term |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [reference_row(name, ref, budget, 2, 2) for name, ref in refs.items()]
        rows = []
        for name, rs in sorted(runs.items(), key=lambda kv: (list(FAMILIES).index(family(kv[0])), kv[0])):
            trained = own_budget(rs[0])
            if trained not in (None, budget):
                continue
            ms = [metrics(r, budget) for r in rs]
            rows.append((name, ms))
            get = lambda k: [m[k] for m in ms]  # noqa: E731
            own = cell(get("csr_own")) if is_sum_form(rs[0]) else "-"
            lines.append(
                f"| {name} | {trained if trained else 'any'} | {len(rs)} | {cell(get('acc'))} | {cell(get('csr'))} | "
                f"{own} | {cell(get('both'))} | {cell(get('kl'))} | {np.mean(get('settle_acc')):.0f} / "
                f"{np.mean(get('settle_csr')):.0f} | {np.mean(get('pg')):.2g} / {np.mean(get('klg')):.2g} |"
            )
        lines.append("")
        families = [f for f in FAMILIES if any(family(name) == f for name, _ in rows)]
        best = {f: choose([row for row in rows if family(row[0]) == f]) for f in families}
        chosen[budget] = {f: name for f, (name, _) in best.items()}
        lines += [
            f"Chosen on validation at d = {budget} (highest correct-and-within; ties: CSR, accuracy, mean KL): "
            + ", ".join(f"{FAMILIES[f]}: `{name}` ({score:.3f})" for f, (name, score) in best.items()),
            "",
        ]
        for f in FAMILIES:  # how many of a family's settings reach the target: what a search over its knob costs
            ms = [
                np.mean([m["csr"] for m in r]) >= TARGET_CSR and np.mean([m["acc"] for m in r]) >= TARGET_ACC
                for name, r in rows
                if family(name) == f
            ]
            if ms:
                reach.append(
                    f"| {budget} | {FAMILIES[f]} | {len(ms)} | {sum(ms)} | "
                    f"{len(ms) / sum(ms) if sum(ms) else float('inf'):.1f} |"
                )
        plot_front(budget, rows, refs, args.out)
    lines += [
        f"### Settings that reach the target (validation): CSR >= {TARGET_CSR} at d and accuracy >= {TARGET_ACC}",
        "",
        "| d | method | settings run | reach the target | runs per hit, drawing settings at random |",
        "|---|---|---|---|---|",
        *reach,
        "",
    ]
    lines += ablation(load(args.results, "val.jsonl", ("tune-d0.05", "refine-d0.05", "lr-ablation")))
    finals = {float(d.name.removeprefix("final-d")): d.name for d in sorted(args.results.glob("final-d*"))}
    if finals:
        test = Path("test.jsonl")  # the toy test split: built (if need be) only when its reference rows are missing
        if not all((RESULTS / "reference" / f"{name}__test.json").exists() for name in ("student", "teacher")):
            sys.path.insert(0, str(ROOT))
            import toy_math

            test = Path(toy_math.resolve("toy", "test"))
        test_refs = {name: reference(test, name) for name in ("student", "teacher")}
        for budget, chunk in sorted(finals.items(), key=lambda kv: kv[0] != 0.05):  # the default budget first
            final = load(args.results, "test.jsonl", (chunk,))
            lines += final_table(final, test_refs, budget)
            plot_final(final, test_refs, budget, args.out)
    table = "\n".join(lines)
    print(table)
    (args.results / "tables.md").write_text(table + "\n")
    (args.results / "chosen.json").write_text(json.dumps({str(b): c for b, c in chosen.items()}, indent=1) + "\n")


def ablation(runs: dict[str, list[dict]]) -> list[str]:
    """CMDP's speed against n, the advantage normalisation, beta and the learning rate (its own runs, d = 0.05)."""
    lines = [
        "### Ablation of CMDP's speed (validation, d = 0.05, seed 1)",
        "",
        "| n | advantage | beta | learning rate | accuracy | CSR | mean KL | settled by step (acc / CSR) "
        "| median grad norm, PG / term (II) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cmdp = {name: rs for name, rs in runs.items() if family(name) == "cmdp"}

    def order(name: str) -> tuple:
        k = setting(name)
        return int(k["n"]), k["adv"], float(k["beta"]), name

    for name, rs in sorted(cmdp.items(), key=lambda kv: order(kv[0])):
        k, m = setting(name), metrics(rs[0], 0.05)
        settled = f"{m['settle_acc']} / {m['settle_csr']}" if m["kl"] < 1 else f"diverged (mean KL {m['kl']:.1f})"
        lines.append(
            f"| {k['n']} | {k['adv']} | {k['beta']} | {k['lr']} | {m['acc']:.3f} | {m['csr']:.3f} | {m['kl']:.3f} "
            f"| {settled} | {m['pg']:.2g} / {m['klg']:.2g} |"
        )
    return lines + [""]


def final_table(runs: dict[str, list[dict]], refs: dict, budget: float) -> list[str]:
    """The chosen settings on the test split: mean ± std over seeds, and each seed's values."""
    lines = [
        f"### Test split, d = {budget}: each method's chosen setting, 600 steps, mean ± std over seeds",
        "",
        "| method, setting | seeds | accuracy | CSR | CSR, sum form's own budget | correct and within | mean KL "
        "| per seed: correct and within |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [reference_row(name, ref, budget, 1, 1) for name, ref in refs.items()]
    for name, rs in sorted(runs.items(), key=lambda kv: (list(FAMILIES).index(family(kv[0])), kv[0])):
        ms = [metrics(r, budget) for r in sorted(rs, key=lambda r: r["seed"])]
        get = lambda k: [m[k] for m in ms]  # noqa: E731
        own = cell(get("csr_own")) if is_sum_form(rs[0]) else "-"
        lines.append(
            f"| {FAMILIES[family(name)]}, `{name}` | {len(ms)} | {cell(get('acc'))} | {cell(get('csr'))} | {own} | "
            f"{cell(get('both'))} | {cell(get('kl'))} | {' '.join(f'{b:.3f}' for b in get('both'))} |"
        )
    return lines + [""]


def pyplot():
    """matplotlib.pyplot (headless), or None with a note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib==3.11.2")
        return None
    return plt


def reference_row(name: str, ref: dict, budget: float, blanks_before: int, blanks_after: int) -> str:
    """A table row for the starting student or the teacher: accuracy, CSR, (-), correct and within, mean KL."""
    within = ref["mean_kl"] <= budget
    return (
        f"| {name} (reference) |{' - |' * blanks_before} {ref['correct'].mean():.3f} | {within.mean():.3f} |"
        f" - | {(within & (ref['correct'] > 0)).mean():.3f} | {ref['mean_kl'].mean():.3f} |"
        f"{' - |' * blanks_after}"
    )


def plot_references(ax, refs: dict, budget: float) -> None:
    for name, ref in refs.items():
        ax.scatter(
            [(ref["mean_kl"] <= budget).mean()],
            [ref["correct"].mean()],
            marker="*",
            s=180,
            color="black" if name == "teacher" else "gray",
            label=f"{name} (reference)",
            zorder=5,
        )


def save(plt, fig, ax, budget: float, split: str, title: str, legend_size: int, legend_loc: str, path: Path) -> None:
    ax.set_xlabel(f"CSR at d = {budget} (fraction of greedy responses with mean per-token KL <= d)")
    ax.set_ylabel(f"greedy accuracy ({split}, 500 problems)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc=legend_loc)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final(runs: dict[str, list[dict]], refs: dict, budget: float, out: Path) -> None:
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    markers, seen, lowest = iter("osD^v<>"), set(), 1.0
    extra = iter(("tab:purple", "tab:brown", "tab:pink", "tab:olive"))  # a family's second setting, each its own
    for name, rs in sorted(runs.items()):
        ms = [metrics(r, budget) for r in rs]
        xs, ys, marker = [m["csr"] for m in ms], [m["acc"] for m in ms], next(markers)
        colour = COLOURS[family(name)] if family(name) not in seen else next(extra)
        seen.add(family(name))
        lowest = min([lowest, *ys])
        ax.scatter(xs, ys, s=18, alpha=0.5, color=colour, marker=marker)
        ax.errorbar(
            np.mean(xs),
            np.mean(ys),
            xerr=std(xs),
            yerr=std(ys),
            color=colour,
            marker=marker,
            ms=8,
            capsize=3,
            label=f"{FAMILIES[family(name)]}, {name} ({len(ms)} seeds)",
        )
    plot_references(ax, refs, budget)
    lowest = min([lowest] + [ref["correct"].mean() for ref in refs.values()])
    ax.set_ylim(lowest - 0.01, 1.005)
    title = f"Chosen settings on the test split, d = {budget}, 600 steps (small: seeds; large: mean ± std)"
    save(plt, fig, ax, budget, "toy test split", title, 7, "center left", out / f"claim_final_d{budget}.png")


def plot_front(budget: float, rows: list, refs: dict, out: Path) -> None:
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    by_family = defaultdict(list)
    for name, ms in rows:
        x, y = np.mean([m["csr"] for m in ms]), np.mean([m["acc"] for m in ms])
        by_family[family(name)].append((x, y, name))
        if len(ms) > 1:
            ax.errorbar(
                x,
                y,
                xerr=std([m["csr"] for m in ms]),
                yerr=std([m["acc"] for m in ms]),
                color=COLOURS[family(name)],
                capsize=2,
                lw=0.8,
            )
    for f, points in by_family.items():
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=22, alpha=0.45, color=COLOURS[f])
        front = pareto(points)
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            "-o",
            ms=5,
            color=COLOURS[f],
            label=f"{FAMILIES[f]} ({len(points)} settings)",
        )
        if f == "fixed":  # lambda next to each point, alternately above and below so that neighbours stay legible
            for k, (x, y, name) in enumerate(sorted(points)):
                ax.annotate(
                    f"λ={name.removeprefix('fixed_l')}",
                    (x, y),
                    fontsize=7,
                    xytext=(4, 6 if k % 2 else -10),
                    textcoords="offset points",
                    color=COLOURS[f],
                )
    plot_references(ax, refs, budget)
    x0, y0 = 0.8, min([0.95] + [ref["correct"].mean() - 0.02 for ref in refs.values()])  # the region that matters
    off = [f"{name} ({x:.2f}, {y:.2f})" for points in by_family.values() for x, y, name in points if x < x0 or y < y0]
    off += [
        f"{name} ({(r['mean_kl'] <= budget).mean():.2f}, {r['correct'].mean():.2f})"
        for name, r in refs.items()
        if (r["mean_kl"] <= budget).mean() < x0 or r["correct"].mean() < y0
    ]
    if off:
        ax.text(
            0.01,
            0.01,
            "outside the axes (CSR, accuracy):\n" + "\n".join(off),
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
            ha="left",
            bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"),
        )
    ax.set_xlim(x0, 1.01)
    ax.set_ylim(y0, 1.005)
    title = f"Accuracy vs constraint satisfaction, d = {budget}, 600 steps (lines: each method's Pareto front)"
    save(plt, fig, ax, budget, "validation", title, 8, "center left", out / f"claim_fronts_d{budget}.png")


if __name__ == "__main__":
    main()
