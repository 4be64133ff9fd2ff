"""Collect run dirs (their results.json) into markdown tables.

    python experiments/collect.py RUN_DIR[=LABEL] ... [--metrics m1 m2 ...] [--pivot METRIC] [--percent]

Runs are labelled by LABEL, or else by their method and the settings that vary among the runs given (not the seed):
runs with the same label are repeats of one setting, so seeds (`seed=0,1,2 -m`) are averaged: mean +- std (n=...).
A single run shows its evaluation's standard error (+- ...). Below the table: which differences are within the noise,
and evaluation protocols that differ between runs (values not comparable) or are mixed within one.
Without --pivot: one row per (setting, level) with the chosen metrics as columns (all metrics if none are given).
With --pivot METRIC: one row per setting (and per recovery), one column per level, like the paper's tables.
Accuracies are fractions in results.json; --percent prints them x100 (perplexities are left alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gisp.eval.aggregate import group_runs, noise_notes
from gisp.eval.report import protocol_notes, runs_pivot, runs_table


def load_runs(specs: list[str]) -> list[tuple[str | None, dict]]:
    runs = []
    for spec in specs:
        path, _, label = spec.partition("=")
        results_path = Path(path) / "results.json"
        if not results_path.exists():
            raise SystemExit(f"no {results_path}: is {path} a finished gisp run dir?")
        runs.append((label or None, json.loads(results_path.read_text())))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs, optionally RUN_DIR=LABEL (same label: seeds averaged)")
    parser.add_argument("--metrics", nargs="*", default=None)
    parser.add_argument("--pivot", default=None, help="one metric: runs x levels")
    parser.add_argument("--percent", action="store_true", help="accuracies x100")
    args = parser.parse_args()
    loaded = load_runs(args.runs)
    runs = group_runs(loaded)
    print(runs_pivot(runs, args.pivot, args.percent) if args.pivot else runs_table(runs, args.metrics, args.percent))
    for note in noise_notes(runs, [args.pivot] if args.pivot else args.metrics):
        print(f"\n> within the noise: {note}")
    for note in protocol_notes([(label or "run", r) for label, r in loaded]):  # stale values, differing protocols
        print(f"\n> note: {note}")


if __name__ == "__main__":
    main()
