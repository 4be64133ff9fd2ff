"""Results as tables and figures: metric against sparsity, for wandb, a PNG in the run dir, and the markdown tables
of several runs (experiments/collect.py, the sweep summary)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gisp.eval.aggregate import is_value, reconstruction_of, spread
from gisp.eval.protocols import current_metrics, protocol_hash
from gisp.io import atomic_file

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["level", "sparsity", "step", "metric", "value", "stderr"]


def result_rows(results: dict[str, Any]) -> list[list]:
    """[level, sparsity, step, metric, value] for the dense model, every target and every recovered target
    ("0.5+lora") of a results.json (metrics of an older evaluation protocol left out)."""
    steps = {key: entry.get("step") for key, entry in (results.get("targets") or {}).items()}
    rows = []
    for key, sparsity, ms in levels(results):
        step = 0 if key == "dense" else steps.get(key.partition("+")[0])
        rows += [[key, sparsity, step, m, v, ms.get(f"{m}_stderr")] for m, v in sorted(ms.items()) if is_value(m)]
    return rows


def levels_text(results: dict[str, Any]) -> str:
    """Every level of a results.json as a plain-text table (level, sparsity, step, one column per metric), recovered
    levels under the level they recover: what a command prints last."""
    metrics = sorted({m for _, _, ms in levels(results) for m in ms if is_value(m)})
    rows = [["level", "sparsity", "step", *metrics]]
    steps = {key: entry.get("step") for key, entry in (results.get("targets") or {}).items()}
    for key, sparsity, ms in levels(results):
        step = 0 if key == "dense" else steps.get(key.partition("+")[0])
        rows.append([key, f"{sparsity:.4f}", "-" if step is None else str(step), *(fmt(m, ms.get(m)) for m in metrics)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    mixed = results.get("mixed_protocols")
    if mixed:
        lines.append(f"(not shown: metrics of an older evaluation protocol at {mixed}; re-evaluate those levels)")
    if reconstruction_of(results) != "none":
        lines.append(f"(pruned levels reconstructed with {reconstruction_of(results)}: gisp.reconstruct)")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str | Path) -> Path | None:
    """One panel per metric, value against measured sparsity (dense at 0), one line for the pruned levels and one
    per recovery; perplexities on a log axis.

    Written to a temporary file and renamed, so a PNG in the run dir is always complete."""
    lines = series(results)
    metrics = sorted({m for rows in lines.values() for _, _, ms in rows for m in ms if is_value(m)})
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on nodes and in CI
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, rows in lines.items():
            points = sorted((s, ms[metric], spread(ms, metric)[0] or 0.0) for _, s, ms in rows if metric in ms)
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=f"recovered: {name}" if name else "pruned")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("parameter sparsity")
        if "ppl" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    rebuilt = reconstruction_of(results)
    fig.suptitle(f"{results.get('model', '')} ({results.get('method', {}).get('objective', '')}"
                 f"{'' if rebuilt == 'none' else ', reconstruct=' + rebuilt})", fontsize=10)
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
    """(level label, measured sparsity, metrics) for dense and every target by sparsity, each followed by its
    recovered levels ("0.5+lora", gisp.recover). Only metrics measured with the run's current evaluation protocol
    (gisp.eval.protocols): a level left with values of an older protocol by an unfinished re-evaluation shows none
    of them."""
    out = [("dense", 0.0, current_metrics(results, results.get("dense") or {}))]
    for key, entry in sorted((results.get("targets") or {}).items(), key=lambda kv: float(kv[0])):
        if "sparsity" not in entry:  # a record without its level (gisp < 0.2 wrote some): nothing to show
            continue
        out.append((key, entry["sparsity"], current_metrics(results, entry)))
        for name, recovered in sorted((entry.get("recovered") or {}).items()):
            out.append((f"{key}+{name}", entry["sparsity"], current_metrics(results, recovered)))
    return out


def series(results: dict[str, Any]) -> dict[str, list[tuple[str, float, dict]]]:
    """The levels as lines: "" the pruned ones, then one per recovery (its name), each starting at the dense model."""
    rows = levels(results)
    out: dict[str, list] = {"": [r for r in rows if "+" not in r[0]]}
    for row in rows:
        if "+" in row[0]:
            out.setdefault(row[0].partition("+")[2], [rows[0]]).append(row)
    return out


def fmt(metric: str, value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent and "ppl" not in metric:
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if value >= 10 else f"{value:.4f}"


def cell(metric: str, ms: dict, percent: bool = False) -> str:
    """A table cell: the value, +- its spread (std over seeds, with n; else the evaluation's standard error)."""
    value = ms.get(metric)
    if value is None:
        return "-"
    scale = 100 if percent and "ppl" not in metric else 1
    if f"{metric}_std" in ms:
        return f"{fmt(metric, value, percent)} +- {scale * ms[f'{metric}_std']:.2g} (n={int(ms[f'{metric}_n'])})"
    if f"{metric}_stderr" in ms:
        return f"{fmt(metric, value, percent)} +- {scale * ms[f'{metric}_stderr']:.2g}"
    return fmt(metric, value, percent)


def runs_table(runs: list[tuple[str, dict]], metrics: list[str] | None = None, percent: bool = False) -> str:
    """One row per (run, level), the metrics as columns (all of them if none are given)."""
    if not metrics:
        metrics = sorted({m for _, r in runs for _, _, ms in levels(r) for m in ms if is_value(m)})
    lines = ["| run | level | sparsity | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for label, results in runs:
        for level, sparsity, ms in levels(results):
            cells = " | ".join(cell(m, ms, percent) for m in metrics)
            lines.append(f"| {label} | {level} | {sparsity:.4f} | {cells} |")
    return "\n".join(lines)


def protocol_notes(runs: list[tuple[str, dict]]) -> list[str]:
    """Warnings for a table of several runs: a run whose levels mix evaluation protocols (its stale values are left
    out), and a task measured with different protocols in different runs (their values are not comparable)."""
    notes = []
    by_task: dict[str, dict[str, list[str]]] = {}
    for label, results in runs:
        if results.get("mixed_protocols"):
            notes.append(f"{label}: an unfinished re-evaluation left levels {results['mixed_protocols']} with an older "
                         "protocol; their values are not shown")
        for task, description in (results.get("evaluation") or {}).items():
            by_task.setdefault(task, {}).setdefault(protocol_hash(description), []).append(label)
    for task, hashes in sorted(by_task.items()):
        if len(hashes) > 1:
            groups = "; ".join(f"{', '.join(labels)}" for labels in hashes.values())
            notes.append(f"{task} was measured with {len(hashes)} different protocols (windows, context, items or "
                         f"data differ) in these groups of runs: {groups}; compare values only within a group")
    return notes


def runs_pivot(runs: list[tuple[str, dict]], metric: str, percent: bool = False) -> str:
    """One row per run (and per recovery of it, "run + lora"), one column per level (dense, 0.2, 0.3, ...), like the
    paper's tables."""
    lines_of = [(f"{label} + {name}" if name else label, rows) for label, results in runs
                for name, rows in series(results).items()]
    keys = sorted({row[0].partition("+")[0] for _, rows in lines_of for row in rows} - {"dense"}, key=float)
    keys = ["dense", *keys]
    lines = [f"| {metric} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, rows in lines_of:
        by_level = {row[0].partition("+")[0]: row[2] for row in rows}
        lines.append(f"| {label} | " + " | ".join(cell(metric, by_level.get(k) or {}, percent) for k in keys) + " |")
    return "\n".join(lines)


def plot_runs(runs: list[tuple[str, dict]], path: str | Path, title: str = "") -> Path | None:
    """One panel per metric: every run's (label's) values against measured sparsity; perplexities on a log axis."""
    by_metric: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, results in runs:
        for name, rows in series(results).items():
            line = f"{label} + {name}" if name else label
            for _, sparsity, ms in rows:
                for m, v in ms.items():
                    if is_value(m) and isinstance(v, (int, float)) and not isinstance(v, bool):
                        by_metric.setdefault(m, {}).setdefault(line, []).append((sparsity, v,
                                                                                 spread(ms, m)[0] or 0.0))
    if not by_metric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted(by_metric)
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, points in sorted(by_metric[metric].items()):
            points = sorted(set(points))
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=label)
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
