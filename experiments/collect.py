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

from gisp.eval.report import protocol_notes, runs_pivot, runs_table


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs, optionally RUN_DIR=LABEL")
    parser.add_argument("--metrics", nargs="*", default=None)
    parser.add_argument("--pivot", default=None, help="one metric: runs x levels")
    parser.add_argument("--percent", action="store_true", help="accuracies x100")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    print(runs_pivot(runs, args.pivot, args.percent) if args.pivot else runs_table(runs, args.metrics, args.percent))
    for note in protocol_notes(runs):  # stale values of an unfinished re-evaluation, protocols that differ
        print(f"\n> note: {note}")


if __name__ == "__main__":
    main()
