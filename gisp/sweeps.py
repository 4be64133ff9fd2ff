"""Sweeps (Hydra multiruns): a summary of every job when the multirun ends, and the wandb group of a sweep.

`SweepSummary` is a Hydra callback (conf/config.yaml, `hydra.callbacks.sweep_summary`): at the end of a multirun
it reads each job's results.json under the sweep dir and writes `summary.md` (one table of every level's metrics,
one row per setting and level, seeds averaged: mean +- std (n); then which differences are within the noise) and
`summary.png` (every metric against sparsity, one line per setting, error bars) with the report code of
gisp.eval.report and gisp.eval.aggregate. Like the command lines, it is Hydra glue.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from gisp.cli import FAILED_JOBS, mark_started
from gisp.eval.aggregate import group_runs, noise_notes
from gisp.eval.report import plot_runs, protocol_notes, runs_pivot, runs_table
from gisp.io import read_json, write_text_atomic

log = logging.getLogger("gisp")


def collect(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(label, results) per setting of a sweep dir: its complete jobs labelled by what varies among them, the jobs of
    one trajectory merged, seeds averaged (mean +- std, gisp.eval.aggregate)."""
    runs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        results = read_json(path)
        if results.get("complete") or results.get("mixed_protocols"):  # mixed: its current values are shown
            runs.append((None, results))
    return group_runs(runs)


def failed_jobs(sweep_dir: Path) -> list[dict]:
    """The records of the jobs that failed (gisp.cli writes one per failed job), by job number."""
    records = [read_json(p) for p in (sweep_dir / FAILED_JOBS).glob("*.json")]
    return sorted(records, key=lambda r: r.get("job", 0))


def failures_text(failed: list[dict]) -> str:
    lines = [f"- job {r['job']} ({' '.join(r.get('overrides') or []) or 'no overrides'}): {r['kind']}: {r['error']}"
             f" (dir {r['dir']}{', log ' + r['log'] if r.get('log') else ''})" for r in failed]
    return "\n## Failed jobs\n\n" + "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, pivot: str | None = None, percent: bool = False) -> Path | None:
    """summary.md and summary.png of a sweep dir; `pivot`: also one row per setting, one column per level, of this
    metric (like the paper's tables; `percent`: accuracies x100). Failed jobs are named at the end."""
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir)
    failed = failed_jobs(sweep_dir)
    if not runs:
        log.warning("sweep %s: no complete job results to summarize", sweep_dir)
        if not failed:
            return None
        write_text_atomic(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\nNo job finished.\n"
                          + failures_text(failed))
        return sweep_dir / "summary.md"
    table = runs_table(runs, percent=percent)
    if pivot:
        table = f"## {pivot}\n\n{runs_pivot(runs, pivot, percent)}\n\n## Every metric\n\n{table}"
    notes = "".join(f"\n> note: {n}\n" for n in protocol_notes(runs))
    noise = noise_notes(runs)
    within = ("\n## Differences within the noise\n\n" + "\n".join(f"- {n}" for n in noise) + "\n") if noise else ""
    failures = failures_text(failed) if failed else ""
    write_text_atomic(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n{table}\n{notes}{within}{failures}")
    plot_runs(runs, sweep_dir / "summary.png", title=f"sweep {sweep_dir.name}")
    log.info("sweep summary: %s and %s", sweep_dir / "summary.md", sweep_dir / "summary.png")
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    """`pivot` (a metric) and `percent`: set by a grid's config (hydra.callbacks.sweep_summary.pivot=...)."""

    def __init__(self, pivot: str | None = None, percent: bool = False) -> None:
        self.pivot, self.percent = pivot, percent

    def on_multirun_start(self, config, **kwargs) -> None:
        import shutil

        mark_started()  # from here on an exit is the sweep's, not Hydra refusing the command line
        shutil.rmtree(Path(config.hydra.sweep.dir) / FAILED_JOBS, ignore_errors=True)  # an earlier sweep's records

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        write_summary(sweep_dir, self.pivot, self.percent)
        failed = failed_jobs(sweep_dir)
        if failed:  # every other job ran and is summarized; the multirun still reports that it did not all succeed
            log.error("%d job(s) of sweep %s failed (named in %s):%s", len(failed), sweep_dir,
                      sweep_dir / "summary.md", failures_text(failed).split("\n", 3)[3].rstrip("\n").join(["\n", ""]))
            sys.exit(1)
