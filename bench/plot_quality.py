"""Accuracy vs sparse token budget, one line per policy and context length, dense as a dashed level:
the picture of a `bench/quality.py --out` results file.

    python -m bench.plot_quality RESULTS.json --task needle --out bench/plots/NAME.png [--title TEXT]

Reads the harness's keys (task/length/policy/budget -> a cell of answers, or an older file's accuracy %);
needs matplotlib (`.[plots]`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bench.quality import accuracy


def curves(results: dict, task: str) -> tuple[dict, dict]:
    """-> ({(length, policy): [(budget, accuracy)]}, {length: dense accuracy}) for one task."""
    lines: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)
    dense: dict[int, float] = {}
    for key, cell in results.items():
        parts = key.split("/")
        value = accuracy(cell)
        if len(parts) != 4 or parts[0] != task or value is None:
            continue
        _, length, policy, budget = parts
        if policy == "dense":
            dense[int(length)] = value
        else:
            lines[(int(length), policy)].append((int(budget), value))
    return {k: sorted(v) for k, v in sorted(lines.items())}, dense


def plot(results: dict, task: str, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, dense = curves(results, task)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {length: f"C{i}" for i, length in enumerate(sorted(dense | {k[0]: 0 for k in lines}))}
    styles = ["-o", "--s", ":^", "-.v"]
    policies = sorted({p for _, p in lines})
    for (length, policy), points in lines.items():
        budgets, accuracy = zip(*points, strict=True)
        ax.plot(budgets, accuracy, styles[policies.index(policy) % len(styles)], color=colors[length],
                label=f"{length // 1024}K {policy}")
    for length, value in dense.items():
        ax.axhline(value, color=colors[length], lw=0.8, ls=(0, (6, 3)), label=f"{length // 1024}K dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sparse token budget")
    ax.set_ylabel(f"{task} accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a bench/quality.py --out file")
    ap.add_argument("--task", default="needle", help="the harness task to draw")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="", help="the plot's title")
    args = ap.parse_args()
    plot(json.loads(Path(args.results).read_text()), args.task, Path(args.out), args.title)


if __name__ == "__main__":
    main()
