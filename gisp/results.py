"""The one owner of a run dir's results.json: every command reads, merges and writes it through `Results`.

results.json is a merge: levels and metrics added by later commands (gisp.evaluate, gisp.recover) survive, and every
metric remembers the evaluation protocol it was measured with (gisp.eval.protocols), so values of different protocols
are never presented as one series. It is rewritten atomically after every level, and marked `complete` only when a
command has finished every level it was asked for with one protocol per task: a killed command never leaves results
that look complete.

    results = Results.load(run_dir)
    results.check_protocols(descriptions, ["dense", "0.4"], hint)   # refuse to mix protocols
    results.record_metrics(results.entry("0.4"), metrics, descriptions, metric_tasks)
    results.write()                                                  # after each level
    results.finish()                                                 # complete (unless mixed), figure, wandb table

Level keys: "dense", a target ("0.4"), a recovered level ("0.4+lora": `targets["0.4"]["recovered"]["lora"]`).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from gisp.errors import GispError
from gisp.eval.protocols import level_entries, mark_mixed, protocol, protocol_hash
from gisp.eval.report import log_results_table, plot_results
from gisp.io import read_json, write_json_atomic

log = logging.getLogger(__name__)

FILE = "results.json"
INVOCATIONS = "invocations.json"
FIGURE = "metrics.png"


# The settings of a command line that define how levels are evaluated (repeated in a suggested re-evaluation)
EVALUATION_KEYS = ("eval", "split_seed", "data_dir")


def evaluation_settings(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The evaluation settings among a command's overrides."""
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in EVALUATION_KEYS]


def recovered_key(level_key: str, name: str) -> str:
    """How a recovered level is named among the levels of a results.json (protocol checks, tables)."""
    return f"{level_key}+{name}"


class Results:
    def __init__(self, run_dir: str | Path, data: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = data if data is not None else {}

    @classmethod
    def load(cls, run_dir: str | Path) -> Results:
        """The run dir's results.json (empty when there is none yet)."""
        path = Path(run_dir) / FILE
        return cls(run_dir, read_json(path) if path.is_file() else {})

    @property
    def path(self) -> Path:
        return self.run_dir / FILE

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    # -- reading ---------------------------------------------------------------------------------------------------

    def require_finished(self) -> Results:
        """Refuse a run that did not finish (a command on a run dir needs its levels); a re-evaluation that was
        stopped half-way (mixed protocols) counts as finished: running it again continues it."""
        if not self.data or not (self.data.get("complete", True) or self.data.get("mixed_protocols")):
            raise GispError(f"no complete {self.path}: the run did not finish; finish it first with gisp.run (the same "
                            f"command with hydra.run.dir={self.run_dir} resumes it)")
        return self

    def target_keys(self) -> list[str]:
        """The targets results.json holds, by sparsity."""
        return sorted(self.data.get("targets") or {}, key=float)

    def entries(self) -> dict[str, dict]:
        """{"dense": entry, "0.4": entry, "0.4+lora": entry, ...}: in place (updates go into results.json)."""
        return level_entries(self.data)

    def entry(self, key: str) -> dict:
        """The record of a level (made when absent): "dense", "0.4" or "0.4+lora"."""
        if key == "dense":
            return self.data.setdefault("dense", {"sparsity": 0.0, "metrics": {}})
        level, _, recovery = key.partition("+")
        entry = self.data.setdefault("targets", {}).setdefault(level, {})
        return entry.setdefault("recovered", {}).setdefault(recovery, {}) if recovery else entry

    # -- recording ---------------------------------------------------------------------------------------------------

    def update(self, record: dict[str, Any]) -> None:
        """Merge a command's run-level record (model, method, calibration, trajectory, ...) into results.json, keeping
        the levels and metrics earlier commands added."""
        self.data.update(record)
        self.data.setdefault("evaluation", {})
        self.data.setdefault("dense", {"sparsity": 0.0, "metrics": {}})
        self.data.setdefault("targets", {})

    @staticmethod
    def needs_evaluation(entry: dict, descriptions: dict[str, dict]) -> bool:
        """Whether a level lacks a task's metrics measured with its current protocol."""
        done = entry.get("evaluated") or {}
        return any(done.get(task) != protocol_hash(d) for task, d in descriptions.items())

    def record_metrics(self, entry: dict, metrics: dict, descriptions: dict[str, dict],
                       metric_tasks: dict[str, str]) -> None:
        """Merge a level's new metrics, remember each task's protocol for the level (and which task measured each
        metric) and in results["evaluation"]; results.json says whether its levels now mix protocols."""
        entry.setdefault("metrics", {}).update(metrics)
        entry.setdefault("metric_tasks", {}).update({m: metric_tasks.get(m, m) for m in metrics})
        entry.setdefault("evaluated", {}).update({task: protocol_hash(d) for task, d in descriptions.items()})
        self.data.setdefault("evaluation", {}).update(descriptions)
        mark_mixed(self.data)

    def record_eval_settings(self, specs) -> None:
        """Remember the evaluation tasks the levels are now measured with (`eval_settings`, as a conf/eval node), so
        that a later command without `eval=` measures with them: the run's current protocol, which may no longer be
        the one its config.yaml names (gisp.evaluate changed it)."""
        tasks = self.data.setdefault("eval_settings", {"tasks": {}})["tasks"]
        tasks.update({spec.name: {"kind": spec.kind, **spec.fields} for spec in specs})

    def eval_settings(self, config_eval: dict | None) -> dict | None:
        """The evaluation settings of the run now: the recorded ones, or those of its config.yaml."""
        return self.data.get("eval_settings") or config_eval

    def record_recovery(self, name: str, definition: dict, levels: dict[str, dict]) -> None:
        """A recovery's definition and its per-level records (training figures): `recovery[name]` and
        `targets[level]["recovered"][name]`. Other weights under the same name (retrained) drop the metrics of the
        old ones."""
        self.data.setdefault("recovery", {})[name] = definition
        for key, record in levels.items():
            slot = self.entry(recovered_key(key, name))
            if slot.get("artefact_sha256") != record.get("artefact_sha256"):
                slot.clear()
            slot.update({k: v for k, v in record.items() if k != "status"})

    def record_invocation(self, started_at: str, seconds: float, status: str) -> None:
        """Every invocation of a run dir (resumed, interrupted, re-run) adds its wall time to invocations.json; a
        complete results.json's `seconds` is their sum."""
        path = self.run_dir / INVOCATIONS
        invocations = read_json(path) if path.exists() else []
        invocations.append({"started": started_at, "seconds": round(seconds, 1), "status": status})
        write_json_atomic(path, invocations)
        if status == "complete" and self.path.exists():
            self.data = read_json(self.path)
            self.data["seconds"] = round(sum(i["seconds"] for i in invocations), 1)
            self.data["invocations"] = len(invocations)
            self.write()

    def reconstruction(self) -> dict[str, Any]:
        """The reconstruction the run's levels were evaluated with (gisp.reconstruct; none for a run of gisp < 0.3)."""
        return (self.data.get("reconstruction") or {}).get("definition") or {"method": "none"}

    def check_reconstruction(self, definition: dict[str, Any], overrides: list[str]) -> None:
        """A run dir holds its levels under ONE reconstruction: refuse another one while pruned levels have metrics of
        the recorded one (they would be presented as one series), naming the command that makes a run dir of it
        (the trajectory is reused from the store: only the reconstruction and the evaluation are computed)."""
        recorded = self.reconstruction()
        if _comparable(recorded, definition) == _comparable(definition, recorded):
            return
        measured = [k for k in self.target_keys() if (self.entry(k).get("metrics") or {})]
        if not measured:
            return
        raise GispError(
            f"{self.path} holds levels {measured} evaluated with reconstruct={recorded.get('method')} "
            f"({_differs(_comparable(recorded, definition), _comparable(definition, recorded))}); a run dir holds "
            "one reconstruction of its levels. Measure this one "
            f"in a new run dir, which reuses the trajectory from the store:\n  {new_run_command(overrides)}")

    def record_reconstruction(self, definition: dict[str, Any], plan: dict[str, Any] | None) -> None:
        """The reconstruction of the run's levels: its definition (settings, data provenance and hash) and memory plan
        (each level's own record, time and store id, is under the level's `reconstruction` key)."""
        self.data["reconstruction"] = {"definition": definition, "memory_plan": plan}

    # -- protocols ---------------------------------------------------------------------------------------------------

    def check_protocols(self, descriptions: dict[str, dict], evaluating: list[str], hint: list[str] | None = None
                        ) -> None:
        """Refuse to record a task under a new protocol while levels that this command does not re-evaluate keep the
        task's values of the old one (they would be presented as one series). The refusal names the commands that
        re-evaluate every level holding the task (`hint`: this command's evaluation overrides, repeated in them)."""
        recorded = self.data.get("evaluation") or {}
        levels = self.entries()
        for task, description in descriptions.items():
            new = protocol_hash(description)
            stale = sorted(key for key, entry in levels.items() if key not in evaluating
                           and (entry.get("evaluated") or {}).get(task) not in (None, new))
            if not stale:
                continue
            old = protocol(recorded.get(task) or {})
            changed = sorted(k for k in set(old) | set(protocol(description))
                             if old.get(k) != protocol(description).get(k))
            holders = {key for key, entry in levels.items() if task in (entry.get("evaluated") or {})}
            raise GispError(
                f"{self.path} holds {task} of levels {stale} measured with other settings ("
                f"{', '.join(changed) or 'another protocol'} differ); metrics of different protocols are never mixed. "
                "Evaluate with the recorded settings, or re-evaluate every level with the new ones:\n  "
                + "\n  ".join(shlex.join(c) for c in self._reevaluation(holders | set(evaluating), hint)))

    def _reevaluation(self, keys: set[str], hint: list[str] | None) -> list[list[str]]:
        """The one gisp.evaluate command that measures `keys` again: the dense model, the pruned levels, and with
        `recovered=all` every recovered level of them (a re-evaluation split over two commands would be refused by
        each, the other's levels still holding the old protocol)."""
        extra = list(hint) if hint is not None else ["eval=..."]
        levels = sorted({k.partition("+")[0] for k in keys if k != "dense"}, key=float)
        recovered = ["recovered=all"] if any("+" in k for k in keys) else []
        return [["python", "-m", "gisp.evaluate", f"run_dir={self.run_dir}", f"sparsity=[{','.join(levels)}]",
                 "dense=true", *recovered, *extra]]

    def mark_mixed(self) -> bool:
        """Record whether the levels mix protocols (`mixed_protocols`, and never `complete` then)."""
        return mark_mixed(self.data)

    # -- writing -----------------------------------------------------------------------------------------------------

    def write(self) -> None:
        """Atomically: results.json is whole or absent, never half-written."""
        self.mark_mixed()
        write_json_atomic(self.path, self.data)

    def finish(self, complete: bool = True, seconds: float | None = None, figure: bool = True,
               loggers: list | tuple = ()) -> dict[str, Any]:
        """The end of a command: complete (when `complete` and no level mixes protocols; a stage that follows keeps it
        open), its wall time, written, metrics.png drawn, the loggers' results table logged; returns the data."""
        self.data["complete"] = bool(complete) and not self.mark_mixed()
        if seconds is not None:
            self.data["seconds"] = round(seconds, 1)
        write_json_atomic(self.path, self.data)
        if figure:
            plot_results(self.data, self.run_dir / FIGURE)
        log_results_table(list(loggers), self.data)
        return self.data


def _comparable(definition: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """A reconstruction definition as compared with `other`: `none` is the method alone, and the data's record only
    when both have it (the settings are checked before the data is built)."""
    if definition.get("method", "none") == "none":
        return {"method": "none"}
    if definition.get("data") is None or other.get("data") is None:
        return {k: v for k, v in definition.items() if k != "data"}
    return definition


def new_run_command(overrides: list[str]) -> str:
    """The gisp.run command of `overrides` in a new run dir (the trajectory is reused from the store)."""
    kept = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return shlex.join(["python", "-m", "gisp.run", *kept, "hydra.run.dir=NEW_RUN_DIR"])


def _differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "this command's differs in " + ", ".join(keys) if keys else "another reconstruction"
