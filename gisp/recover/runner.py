"""`python -m gisp.recover`: recover levels of a finished run, evaluate them, record them in its results.json.

    recover_run("outputs/smollm2_135m/<run>", recover_settings({"method": "lora"}), targets=[0.3, 0.5])

Each recovered level is recorded next to the pruned one: `targets["0.5"]["recovered"]["lora"]` holds its metrics
(measured with the run's evaluation protocols, checked like every other metric of the run dir), tokens, wall time,
tokens/s, validation loss and curve; `recovery["lora"]` holds the recovery's definition (method, data and its hash,
budget, hyperparameters, seed) and where its weights are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gisp.data.recipes import recipe_from_fields
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.protocols import level_entries, mark_mixed
from gisp.eval.report import plot_results
from gisp.eval.suite import EvalTaskSpec, build_evaluator, build_suites
from gisp.io import write_json_atomic
from gisp.plan import visible_device_memory
from gisp.prune.trajectory import target_key
from gisp.recover.artefacts import Recovery, load_recovered
from gisp.recover.plan import fits, plan_recovery
from gisp.recover.settings import RecoverSettings
from gisp.recover.stage import rank_zero, recover_levels
from gisp.runs import RunDir, check_protocols, claim, needs_evaluation, record_metrics

log = logging.getLogger(__name__)


def recovered_key(level_key: str, name: str) -> str:
    """How a recovered level is named among the levels of a results.json (protocol checks, tables)."""
    return f"{level_key}+{name}"


def record_recovery(results: dict, name: str, definition: dict, entries: dict[str, dict]) -> None:
    """Put a recovery's definition and its per-level records (training figures) into results.json."""
    results.setdefault("recovery", {})[name] = definition
    for key, record in entries.items():
        target = results.setdefault("targets", {}).setdefault(key, {})
        slot = target.setdefault("recovered", {}).setdefault(name, {})
        if slot.get("artefact_sha256") != record.get("artefact_sha256"):
            slot.clear()  # other weights under this name (retrained): their metrics are not these weights'
        slot.update({k: v for k, v in record.items() if k != "status"})


def evaluate_recovered(results: dict, name: str, keys: list[str], models: Callable[[str], torch.nn.Module],
                       evaluator, run_dir: Path, progress: bool, write: Callable[[], None]) -> None:
    """Evaluate each recovered level that lacks metrics of the current protocols; `models(key)` gives its model.
    Written after each level (an interrupted evaluation keeps what it finished)."""
    if evaluator is None:
        return
    descriptions = evaluator.describe()
    check_protocols(results, descriptions, [recovered_key(k, name) for k in keys], run_dir)
    for key in keys:
        entry = results["targets"][key]["recovered"][name]
        if not needs_evaluation(entry, descriptions):
            log.info("%s: already evaluated with these settings", recovered_key(key, name))
            continue
        log.info("evaluating %s", recovered_key(key, name))
        metrics = evaluator(models(key), progress=progress)
        descriptions = evaluator.describe()
        record_metrics(results, entry, metrics, descriptions, evaluator.metric_tasks)
        log.info("%s: %s", recovered_key(key, name), metrics)
        write()


def recover_run(run_dir: str | Path, settings: RecoverSettings, targets: list[float] | None = None,
                tasks: tuple[EvalTaskSpec, ...] | list[EvalTaskSpec] | None = None, trainer: dict | None = None,
                loggers: Callable[[Path, dict], list] | None = None, progress: bool = True,
                data_dir: Path | None = None, cache_dir: str | Path | None = None,
                trust_remote_code: bool = False) -> dict[str, Any] | None:
    """Recover `targets` (default: the run's) of a finished run as `settings` say and evaluate them with `tasks`
    (None: the run's evaluation settings; empty: no evaluation). Returns results.json (None on processes > 0)."""
    if not settings.enabled:
        raise GispError("recover=none recovers nothing: choose recover=lora, recover=distill or recover=nested")
    run = RunDir(run_dir)
    with claim(run.path) if rank_zero() else contextlib.nullcontext():
        results = run.results()
        if results is None or not (results.get("complete", True) or results.get("mixed_protocols")):
            raise GispError(f"no complete {run.results_path}: the run did not finish; finish it first with gisp.run "
                            f"(the same command with hydra.run.dir={run.path} resumes it)")
        targets = sorted(float(k) for k in results.get("targets", {})) if targets is None else list(targets)
        if settings.method == "nested" and settings.levels:
            targets = sorted(set(targets) | set(settings.levels))
        if not targets:
            raise GispError("no levels to recover: give targets=[0.3,0.5] (sparsity levels of the run)")
        beyond = [t for t in targets if t > run.trajectory.reached]
        if beyond:
            raise GispError(f"sparsity {beyond} is not a level of this trajectory (it reaches "
                            f"{run.trajectory.reached:.4f}); extend it with gisp.run first")
        config = run.config
        masks = {target_key(t): run.level(target=t, masks_only=True).masks for t in targets}  # checked: no load
        plan = plan_recovery(run.model_spec(), settings, masks, (config.get("prune") or {}).get("gqa_mode") or "query")
        if plan is not None and rank_zero():
            log.info("%s", plan.table())
            refusal = fits(plan, visible_device_memory(trainer or {}))
            if refusal:
                raise GispError(refusal)
        recipe = recipe_from_fields(settings.data if settings.data is not None else config.get("data") or {})
        data_dir = resolve_data_dir(data_dir if data_dir is not None else config.get("data_dir"))
        if tasks is None:
            from gisp.config import eval_tasks

            tasks = eval_tasks(config.get("eval") or {})
        suites = build_suites(tasks, data_dir, work_dir=run.path / "eval_data")
        live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        levels = [run.level(target=t, live=live) for t in targets]
        evaluator = build_evaluator(tasks, live.tokenizer, data_dir, work_dir=run.path / "eval_data",
                                    max_positions=getattr(live.model.config, "max_position_embeddings", None),
                                    suites=suites) if tasks else None
        def write() -> None:
            mark_mixed(results)
            write_json_atomic(run.results_path, results)

        recover_into(results, run.path, settings, live, levels, recipe=recipe, data_dir=data_dir,
                     trainer=trainer or {"accelerator": "auto", "devices": 1},
                     loggers=loggers or (lambda folder, hp: []), progress=progress, evaluator=evaluator,
                     context={"trajectory": run.trajectory.id, "model": run.model_spec().name}, write=write)
        if not rank_zero():
            return None
        results["complete"] = not mark_mixed(results)
        write_json_atomic(run.results_path, results)
        plot_results(results, run.path / "metrics.png")
        return results


def recover_into(results: dict, run_dir: Path, settings: RecoverSettings, live, levels: list, *, recipe,
                 data_dir: Path | None, trainer: dict, loggers: Callable[[Path, dict], list], progress: bool,
                 evaluator, context: dict, write: Callable[[], None]) -> None:
    """Recover `levels`, record the recovery and its levels in `results` and evaluate the recovered models
    (`write()` saves results.json after each step). Shared by gisp.recover and gisp.run recover=..."""
    curve = (lambda model: evaluator(model, progress=False)) if evaluator is not None else None
    recovered = recover_levels(run_dir, settings, live, levels, recipe=recipe, data_dir=data_dir, trainer=trainer,
                               loggers=loggers, progress=progress, context=context, evaluate=curve)
    if not rank_zero():
        return
    record = Recovery(run_dir, settings.key).require()
    record_recovery(results, settings.key, record["definition"], {r.key: r.record for r in recovered})
    fresh = {r.key: r.model for r in recovered if r.model is not None}
    by_key = {target_key(level.target): level for level in levels}

    def model_of(key: str) -> torch.nn.Module:
        if key in fresh:
            return fresh[key]
        model = load_recovered(run_dir, settings.key, live, by_key[key])
        if model is live.model:  # nested: the recovered dense weights, under the level's masks
            live.set_level(by_key[key])
        return model

    write()
    evaluate_recovered(results, settings.key, list(by_key), model_of, evaluator, run_dir, progress, write)
    live.set_level(None)
    log.info("recovered levels %s with %s: %s", list(by_key), settings.key,
             {k: results["targets"][k]["recovered"][settings.key].get("metrics") for k in by_key})


def recovered_levels(results: dict) -> dict[str, dict]:
    """{"0.5+lora": entry, ...}: the recovered levels of a results.json (gisp.eval.protocols names them so)."""
    return {k: v for k, v in level_entries(results).items() if "+" in k}
