"""Several runs as one table: what tells them apart, seeds averaged with their spread, and which differences are
within the noise.

A run is labelled by what its method is (pruner / objective / model / calibration data) plus every command-line
setting that varies among the runs compared, except the seed and the sparsity targets. Runs with the same label are
repeats of one setting: the jobs of one trajectory (different targets) are merged, and different seeds (calibration
sampling seeds, `seed=0,1,2 -m`) are averaged: per level each metric's mean, its sample standard deviation over the
seeds (`{metric}_std`) and the number of seeds (`{metric}_n`). A single run keeps the standard error its evaluation
measured (`{metric}_stderr`: over the perplexity windows, over lm-eval's items).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from gisp.eval.protocols import current_metrics

IGNORED = ("seed", "sparsity", "split_seed", "hydra", "store_dir", "cache_dir", "data_dir", "threads", "progress",
           "logger", "trainer", "resume")
ERRORS = ("_stderr", "_std", "_n")


def is_value(metric: str) -> bool:
    """A metric, not one of the spreads that go with metrics."""
    return not metric.endswith(ERRORS)


def method_label(results: dict[str, Any]) -> str:
    """What a run is, in words: method (with its levels' reconstruction, gisp.reconstruct), objective, model and
    calibration data."""
    method = results.get("method") or {}
    calibration = results.get("calibration") or {}
    data = calibration.get("name") or calibration.get("dataset") or calibration.get("kind") or "?"
    pruner = method.get("pruner", "?")
    rebuilt = reconstruction_of(results)
    if rebuilt != "none":
        pruner = f"{pruner} + {rebuilt}"
    return f"{pruner} / {method.get('objective', '?')} / {results.get('model', '?')} / {data}"


def reconstruction_of(results: dict[str, Any]) -> str:
    """The reconstruction method of a run's levels ("none" for runs without one, and for gisp < 0.3)."""
    return ((results.get("reconstruction") or {}).get("definition") or {}).get("method", "none")


def seed_of(results: dict[str, Any]) -> int | None:
    if results.get("seed") is not None:
        return int(results["seed"])
    return (results.get("calibration") or {}).get("seed")


def _settings(results: dict[str, Any]) -> dict[str, str]:
    out = {}
    for override in results.get("overrides") or []:
        key, _, value = override.lstrip("+~").partition("=")
        if key.split(".")[0].split("/")[0] not in IGNORED:
            out[key] = value
    return out


def labels(runs: list[dict[str, Any]]) -> list[str]:
    """A label per run: its method label plus the settings that vary among `runs` (seeds and targets excluded)."""
    settings = [_settings(r) for r in runs]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1
               and k not in ("pruner", "objective", "model", "reconstruct")]
    return [method_label(r) + "".join(f", {k}={s.get(k, '-')}" for k in varying) for r, s in zip(runs, settings)]


def merge_targets(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The jobs of one trajectory and seed (they differ by their targets and recoveries) as one results.json."""
    targets: dict[str, dict] = {}
    for r in jobs:
        for key, entry in (r.get("targets") or {}).items():
            recovered = {**(targets.get(key) or {}).get("recovered", {}), **(entry.get("recovered") or {})}
            targets[key] = {**(targets.get(key) or {}), **entry, **({"recovered": recovered} if recovered else {})}
    return {**jobs[0], "targets": targets}


def _entries(results: dict[str, Any]) -> dict[str, tuple[float, dict]]:
    """{level: (sparsity, current metrics)} with recovered levels as "0.5+lora"."""
    out = {"dense": (0.0, current_metrics(results, results.get("dense") or {}))}
    for key, entry in (results.get("targets") or {}).items():
        if "sparsity" not in entry:  # a record without its level (gisp < 0.2 wrote some): nothing to show
            continue
        out[key] = (entry["sparsity"], current_metrics(results, entry))
        for name, rec in (entry.get("recovered") or {}).items():
            out[f"{key}+{name}"] = (entry["sparsity"], current_metrics(results, rec))
    return out


def average_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results.json for repeats of one setting: per level the mean metric, `_std` (sample std over the runs)
    and `_n`; a level present in one run only keeps that run's values and standard errors."""
    if len(runs) == 1:
        return runs[0]
    per_level: dict[str, list[tuple[float, dict]]] = {}
    for r in runs:
        for key, value in _entries(r).items():
            per_level.setdefault(key, []).append(value)
    out = {**runs[0], "seeds": sorted({s for s in map(seed_of, runs) if s is not None}), "targets": {},
           "dense": {"sparsity": 0.0}}
    out.pop("evaluation", None)  # metrics below are already the current protocol's
    for key, values in per_level.items():
        metrics: dict[str, float] = {}
        names = {m for _, ms in values for m in ms if is_value(m)}
        for m in names:
            xs = [ms[m] for _, ms in values if m in ms]
            metrics[m] = statistics.fmean(xs)
            if len(xs) > 1:
                metrics[f"{m}_std"], metrics[f"{m}_n"] = statistics.stdev(xs), len(xs)
            elif f"{m}_stderr" in values[0][1]:
                metrics[f"{m}_stderr"] = values[0][1][f"{m}_stderr"]
        sparsity = statistics.fmean(s for s, _ in values)
        level, _, name = key.partition("+")
        if key == "dense":
            out["dense"] = {"sparsity": 0.0, "metrics": metrics}
        elif name:
            out["targets"].setdefault(level, {"sparsity": sparsity, "metrics": {}}).setdefault(
                "recovered", {})[name] = {"metrics": metrics}
        else:
            out["targets"].setdefault(level, {}).update({"sparsity": sparsity, "metrics": metrics,
                                                          "step": (runs[0].get("targets") or {}).get(level, {})
                                                          .get("step")})
    return out


def group_runs(runs: list[tuple[str | None, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, results) per setting: runs labelled None get `labels()`; runs with the same label and seed are merged
    (the jobs of one trajectory), runs with the same label and different seeds averaged."""
    auto = labels([r for _, r in runs])
    named = [(label or automatic, r) for (label, r), automatic in zip(runs, auto)]
    by_label: dict[str, dict[Any, list[dict]]] = {}
    for label, r in named:
        by_label.setdefault(label, {}).setdefault(seed_of(r), []).append(r)
    return [(label, average_seeds([merge_targets(jobs) for jobs in seeds.values()]))
            for label, seeds in by_label.items()]


def spread(metrics: dict[str, float], metric: str) -> tuple[float | None, str]:
    """(the error of `metric`'s value: the standard error of the mean over seeds, else the evaluation's standard
    error; how it was obtained)."""
    if f"{metric}_std" in metrics:
        n = metrics.get(f"{metric}_n", 1)
        return metrics[f"{metric}_std"] / math.sqrt(n), f"std over {int(n)} seeds / sqrt(n)"
    if f"{metric}_stderr" in metrics:
        return metrics[f"{metric}_stderr"], "stderr of the evaluation"
    return None, "no error known"


def noise_notes(runs: list[tuple[str, dict[str, Any]]], metrics: list[str] | None = None) -> list[str]:
    """Per level and metric, the runs whose value is within the noise of the best run's (|difference| <= 2 x the
    root sum of squares of both errors); a difference beyond that is not listed."""
    notes = []
    table = [(label, _entries(results)) for label, results in runs]
    levels = sorted({k for _, entries in table for k in entries if k != "dense"},
                    key=lambda k: (float(k.partition("+")[0]), k))
    names = metrics or sorted({m for _, entries in table for _, ms in entries.values() for m in ms if is_value(m)})
    for level in levels:
        for metric in names:
            rows = [(label, entries[level][1]) for label, entries in table
                    if level in entries and metric in entries[level][1]]
            if len(rows) < 2:
                continue
            lower = "ppl" in metric
            best_label, best = min(rows, key=lambda r: r[1][metric] if lower else -r[1][metric])
            best_err, _ = spread(best, metric)
            close = []
            for label, ms in rows:
                err, _ = spread(ms, metric)
                if label == best_label or err is None or best_err is None:
                    continue
                if abs(ms[metric] - best[metric]) <= 2 * math.hypot(err, best_err):
                    close.append(f"{label} ({ms[metric]:.4g} +- {err:.2g})")
            if close:
                notes.append(f"{level} {metric}: best {best_label} ({best[metric]:.4g} +- {best_err:.2g}); within "
                             f"the noise of it: {'; '.join(close)}")
    return notes
