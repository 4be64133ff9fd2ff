"""Collect run dirs (their results.json) into markdown tables.

    python experiments/collect.py RUN_DIR[=LABEL] ... [--metrics m1 m2 ...] [--pivot METRIC] [--percent]

Without --pivot: one row per (run, level) with the chosen metrics as columns (all metrics if none are given).
With --pivot METRIC: one row per run, one column per level (dense, 0.2, 0.3, ...), like the paper's tables.
Accuracies are fractions in results.json; --percent prints them x100 (perplexities are left alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_runs(specs: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for spec in specs:
        path, _, label = spec.partition("=")
        results_path = Path(path) / "results.json"
        if not results_path.exists():
            raise SystemExit(f"no {results_path}: is {path} a finished gisp run dir?")
        results = json.loads(results_path.read_text())
        runs.append((label or Path(path).name, results))
    return runs


def levels(results: dict) -> list[tuple[str, float, dict]]:
    """(level label, measured sparsity, metrics) for dense and every target, by sparsity."""
    out = [("dense", 0.0, results["dense"].get("metrics") or {})]
    for key, entry in sorted(results["targets"].items(), key=lambda kv: float(kv[0])):
        out.append((key, entry["sparsity"], entry.get("metrics") or {}))
    return out


def fmt(metric: str, value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    if percent and "ppl" not in metric:
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if value >= 10 else f"{value:.4f}"


def table(runs: list[tuple[str, dict]], metrics: list[str] | None, percent: bool) -> str:
    if not metrics:
        metrics = sorted({m for _, r in runs for _, _, ms in levels(r) for m in ms})
    lines = ["| run | level | sparsity | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for label, results in runs:
        for level, sparsity, ms in levels(results):
            cells = " | ".join(fmt(m, ms.get(m), percent) for m in metrics)
            lines.append(f"| {label} | {level} | {sparsity:.4f} | {cells} |")
    return "\n".join(lines)


def pivot(runs: list[tuple[str, dict]], metric: str, percent: bool) -> str:
    keys = []
    for _, results in runs:
        for level, _, _ in levels(results):
            if level not in keys:
                keys.append(level)
    keys = ["dense"] + sorted((k for k in keys if k != "dense"), key=float)
    lines = [f"| {metric} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, results in runs:
        by_level = {level: ms.get(metric) for level, _, ms in levels(results)}
        lines.append(f"| {label} | " + " | ".join(fmt(metric, by_level.get(k), percent) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs, optionally RUN_DIR=LABEL")
    parser.add_argument("--metrics", nargs="*", default=None)
    parser.add_argument("--pivot", default=None, help="one metric: runs x levels")
    parser.add_argument("--percent", action="store_true", help="accuracies x100")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    print(pivot(runs, args.pivot, args.percent) if args.pivot else table(runs, args.metrics, args.percent))


if __name__ == "__main__":
    main()
