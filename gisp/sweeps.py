"""Sweeps (Hydra multiruns): a summary of every job when the multirun ends, and the wandb group of a sweep.

`SweepSummary` is a Hydra callback (conf/config.yaml, `hydra.callbacks.sweep_summary`): at the end of a multirun
it reads each job's results.json under the sweep dir and writes `summary.md` (one table of every level's metrics,
one row per job and level) and `summary.png` (every metric against sparsity, one line per method / objective /
model / calibration set) with the report code of gisp.eval.report. Like the command lines, it is Hydra glue.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gisp.eval.report import plot_runs, protocol_notes, runs_table
from gisp.io import read_json, write_text_atomic

log = logging.getLogger("gisp")


def job_label(results: dict[str, Any]) -> str:
    """What a sweep varies, in words: method, objective, model and calibration data (targets are the x axis)."""
    method = results.get("method") or {}
    calibration = results.get("calibration") or {}
    data = calibration.get("name") or calibration.get("dataset") or calibration.get("kind") or "?"
    return f"{method.get('pruner', '?')} / {method.get('objective', '?')} / {results.get('model', '?')} / {data}"


def collect(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(label, results) of every complete job of a sweep dir, labels made unique by the job's folder."""
    runs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        results = read_json(path)
        if results.get("complete") or results.get("mixed_protocols"):  # mixed: its current values are shown
            runs.append((job_label(results), results, path.parent.name))
    groups: dict[str, list[tuple[str, dict]]] = {}
    for label, results, job in runs:
        groups.setdefault(label, []).append((job, results))
    out = []
    for label, jobs in groups.items():
        targets: dict[str, dict] = {}
        for _, r in jobs:  # jobs of one trajectory differ only by their targets and recoveries: one line
            for key, entry in (r.get("targets") or {}).items():
                recovered = {**(targets.get(key) or {}).get("recovered", {}), **(entry.get("recovered") or {})}
                targets[key] = {**(targets.get(key) or {}), **entry, **({"recovered": recovered} if recovered else {})}
        out.append((label, {**jobs[0][1], "targets": targets}))
    return out


def write_summary(sweep_dir: str | Path) -> Path | None:
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir)
    if not runs:
        log.warning("sweep %s: no complete job results to summarize", sweep_dir)
        return None
    table = runs_table(runs)
    notes = "".join(f"\n> note: {n}\n" for n in protocol_notes(runs))
    write_text_atomic(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n{table}\n{notes}")
    plot_runs(runs, sweep_dir / "summary.png", title=f"sweep {sweep_dir.name}")
    log.info("sweep summary: %s and %s", sweep_dir / "summary.md", sweep_dir / "summary.png")
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        write_summary(config.hydra.sweep.dir)
