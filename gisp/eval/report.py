"""Results as a table and a figure: metric against sparsity, for wandb and for a PNG in the run dir."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gisp.io import atomic_file

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["level", "sparsity", "step", "metric", "value"]


def result_rows(results: dict[str, Any]) -> list[list]:
    """[level, sparsity, step, metric, value] for the dense model and every target of a results.json."""
    rows = [["dense", 0.0, 0, m, v] for m, v in sorted((results.get("dense", {}).get("metrics") or {}).items())]
    for key, entry in sorted(results.get("targets", {}).items(), key=lambda kv: float(kv[0])):
        for m, v in sorted((entry.get("metrics") or {}).items()):
            rows.append([key, entry["sparsity"], entry["step"], m, v])
    return rows


def plot_results(results: dict[str, Any], path: str | Path) -> Path | None:
    """One panel per metric, value against measured sparsity (dense at 0); perplexities on a log axis.

    Written to a temporary file and renamed, so a PNG in the run dir is always complete."""
    rows = result_rows(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on nodes and in CI
    import matplotlib.pyplot as plt

    metrics = sorted({r[3] for r in rows})
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        points = sorted((r[1], r[4]) for r in rows if r[3] == metric)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("parameter sparsity")
        if "ppl" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{results.get('model', '')} ({results.get('method', {}).get('objective', '')})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    log.info("figure: %s", path)
    return path


def log_results_table(loggers: list, results: dict[str, Any], key: str = "results") -> None:
    """A wandb Table (level, sparsity, step, metric, value) on every WandbLogger among ``loggers``."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        logger.experiment.log({key: wandb.Table(columns=TABLE_COLUMNS, data=result_rows(results))})
