"""Results as tables and figures: metric against sparsity, for wandb, a PNG in the run dir, and the markdown tables
of several runs (experiments/collect.py, the sweep summary)."""

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


# ---------------------------------------------------------------------------------------------------------------
# Several runs: markdown tables and one figure per metric (experiments/collect.py, gisp.sweeps)


def levels(results: dict[str, Any]) -> list[tuple[str, float, dict]]:
    """(level label, measured sparsity, metrics) for dense and every target, by sparsity."""
    out = [("dense", 0.0, (results.get("dense") or {}).get("metrics") or {})]
    for key, entry in sorted((results.get("targets") or {}).items(), key=lambda kv: float(kv[0])):
        out.append((key, entry["sparsity"], entry.get("metrics") or {}))
    return out


def fmt(metric: str, value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent and "ppl" not in metric:
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if value >= 10 else f"{value:.4f}"


def runs_table(runs: list[tuple[str, dict]], metrics: list[str] | None = None, percent: bool = False) -> str:
    """One row per (run, level), the metrics as columns (all of them if none are given)."""
    if not metrics:
        metrics = sorted({m for _, r in runs for _, _, ms in levels(r) for m in ms})
    lines = ["| run | level | sparsity | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for label, results in runs:
        for level, sparsity, ms in levels(results):
            cells = " | ".join(fmt(m, ms.get(m), percent) for m in metrics)
            lines.append(f"| {label} | {level} | {sparsity:.4f} | {cells} |")
    return "\n".join(lines)


def runs_pivot(runs: list[tuple[str, dict]], metric: str, percent: bool = False) -> str:
    """One row per run, one column per level (dense, 0.2, 0.3, ...), like the paper's tables."""
    keys: list[str] = []
    for _, results in runs:
        keys += [level for level, _, _ in levels(results) if level not in keys]
    keys = ["dense"] + sorted((k for k in keys if k != "dense"), key=float)
    lines = [f"| {metric} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, results in runs:
        by_level = {level: ms.get(metric) for level, _, ms in levels(results)}
        lines.append(f"| {label} | " + " | ".join(fmt(metric, by_level.get(k), percent) for k in keys) + " |")
    return "\n".join(lines)


def plot_runs(runs: list[tuple[str, dict]], path: str | Path, title: str = "") -> Path | None:
    """One panel per metric: every run's (label's) values against measured sparsity; perplexities on a log axis."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, results in runs:
        for _, sparsity, ms in levels(results):
            for m, v in ms.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    series.setdefault(m, {}).setdefault(label, []).append((sparsity, v))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted(series)
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, points in sorted(series[metric].items()):
            points = sorted(set(points))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("parameter sparsity")
        if "ppl" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
