"""Evaluation protocols: what a metric was measured with, as a hash, so values of different protocols are never
presented as one series.

Every level of a results.json records, per evaluation task, the hash of the protocol its metrics were measured with
(`evaluated`), and which task produced each metric (`metric_tasks`); `evaluation` describes the protocol of each task
now. A level whose hash for a task differs from the current one holds metrics of an older protocol: they are stale.
While a command switches a task to a new protocol, results.json says so (`mixed_protocols`, and `complete: false`)
until every level is measured again; the tables and figures leave stale values out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def protocol(description: Any) -> Any:
    """An evaluation task's description without what is only known after evaluating (items evaluated)."""
    if isinstance(description, dict):
        return {k: protocol(v) for k, v in description.items() if k not in ("n_evaluated",)}
    return description


def protocol_hash(description: Any) -> str:
    return hashlib.sha256(json.dumps(protocol(description), sort_keys=True, default=str).encode()).hexdigest()[:12]


def level_entries(results: dict) -> dict[str, dict]:
    """{"dense": entry, "0.4": entry, "0.4+lora": entry, ...} of a results.json: the levels and the recovered levels
    (gisp.recover: `targets[key]["recovered"][name]`), which carry their own metrics and protocol hashes. No copies:
    entries can be updated in place."""
    targets = results.get("targets") or {}
    out = {"dense": results.get("dense") or {}, **targets}
    for key, entry in targets.items():
        for name, recovered in (entry.get("recovered") or {}).items():
            out[f"{key}+{name}"] = recovered
    return out


def task_of(entry: dict, metric: str) -> str:
    """The evaluation task that measured `metric` at a level (a perplexity metric is its own task)."""
    return (entry.get("metric_tasks") or {}).get(metric, metric)


def stale_tasks(results: dict, entry: dict) -> set[str]:
    """The tasks whose metrics at this level were measured with another protocol than results.json's current one."""
    current = {task: protocol_hash(d) for task, d in (results.get("evaluation") or {}).items()}
    done = entry.get("evaluated") or {}
    return {task for task, h in done.items() if task in current and h != current[task]}


def current_metrics(results: dict, entry: dict) -> dict[str, float]:
    """A level's metrics measured with the current protocol of their task (stale ones left out)."""
    stale = stale_tasks(results, entry)
    return {m: v for m, v in (entry.get("metrics") or {}).items() if task_of(entry, m) not in stale}


def mixed_protocols(results: dict) -> dict[str, list[str]]:
    """{task: levels still holding that task's metrics of an older protocol}; empty when every level agrees."""
    out: dict[str, list[str]] = {}
    for key, entry in level_entries(results).items():
        for task in stale_tasks(results, entry):
            out.setdefault(task, []).append(key)
    return {task: sorted(levels, key=_order) for task, levels in out.items()}


def _order(key: str) -> tuple[float, str]:
    level, _, name = key.partition("+")
    return (-1.0 if level == "dense" else float(level), name)


def mark_mixed(results: dict) -> bool:
    """Record in results.json whether its levels mix protocols (`mixed_protocols`, and never `complete` then);
    returns True when they do."""
    mixed = mixed_protocols(results)
    if mixed:
        results["mixed_protocols"] = mixed
        results["complete"] = False
    else:
        results.pop("mixed_protocols", None)
    return bool(mixed)
