"""Recover levels of a run, evaluate the recovered models, record both in its results.json: the library of
`python -m gisp.recover` (`recover_run`) and of `gisp.run recover=...` (`recover_into`, in the pruning process).

    recover_run("outputs/smollm2_135m/<run>", recover_settings({"method": "lora"}), sparsity=[0.3, 0.5])

Each recovered level is recorded next to the pruned one: `targets["0.5"]["recovered"]["lora"]` holds its metrics
(measured with the run's evaluation protocols through the one level loop, gisp.level_loop), tokens, wall time,
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
from gisp.eval.suite import EvalTaskSpec, build_evaluator, build_suites, eval_task_specs
from gisp.level_loop import LevelJob, evaluate_levels, reconstruction_context, record_reconstruction
from gisp.memory.scoring import visible_device_memory
from gisp.memory.shapes import model_config
from gisp.memory.training import fits, plan_recovery
from gisp.prune.levels import Level
from gisp.prune.trajectory import target_key
from gisp.recovery.artefacts import Recovery, recovered_model
from gisp.recovery.fit import rank_zero, recover_levels
from gisp.recovery.settings import RecoverSettings, check_positions
from gisp.results import Results, recovered_key
from gisp.runs import LiveModel, RunDir, claim, save_level

log = logging.getLogger(__name__)


def recover_run(run_dir: str | Path, settings: RecoverSettings, sparsity: list[float] | None = None,
                tasks: tuple[EvalTaskSpec, ...] | list[EvalTaskSpec] | None = None, trainer: dict | None = None,
                loggers: Callable[[Path, dict], list] | None = None, progress: bool = True,
                data_dir: Path | None = None, cache_dir: str | Path | None = None,
                trust_remote_code: bool = False, hint: list[str] | None = None, reconstruct: dict | None = None
                ) -> dict[str, Any] | None:
    """Recover the `sparsity` levels (default: the run's) of a finished run as `settings` say and evaluate them with
    `tasks` (None: the run's evaluation settings; empty: no evaluation). Returns results.json (None on processes
    > 0). `hint`: the command's evaluation overrides, for a refusal that names how to re-evaluate. The levels start
    from the run's reconstruction (`reconstruct`: a conf/reconstruct node; it must be the run's own)."""
    if not settings.enabled:
        raise GispError("recover=none recovers nothing: choose recover=lora, recover=distill or recover=nested")
    run = RunDir(run_dir)
    with claim(run.path) if rank_zero() else contextlib.nullcontext():
        results = run.finished_results()
        levels = [float(k) for k in results.target_keys()] if sparsity is None else list(sparsity)
        if settings.method == "nested" and settings.levels:  # the deprecated recover.levels add to the levels
            levels = sorted(set(levels) | set(settings.levels))
        if not levels:
            raise GispError("no levels to recover: give sparsity=[0.3,0.5] (sparsity levels of the run)")
        run.check_reaches(levels)
        config = run.config
        rebuild = run.reconstruct_settings(reconstruct)
        results.check_reconstruction(rebuild.definition(), [o for o in results.get("overrides") or []
                                                            if not o.lstrip("+~").startswith("reconstruct")])
        check_positions_early(run.model_spec(), settings)
        masks = {target_key(t): run.level(target=t, masks_only=True).masks for t in levels}  # checked: no load
        plan = plan_recovery(run.model_spec(), settings, masks, (config.get("prune") or {}).get("gqa_mode") or "query")
        if plan is not None and rank_zero():
            log.info("%s", plan.table())
            refusal = fits(plan, visible_device_memory(trainer or {}))
            if refusal:
                raise GispError(refusal)
        recipe = recipe_from_fields(settings.data if settings.data is not None else config.get("data") or {})
        data_dir = resolve_data_dir(data_dir if data_dir is not None else config.get("data_dir"))
        if results.get("eval_settings") is None:  # a run of gisp < 0.2: its config's settings are what it holds
            results.record_eval_settings(eval_task_specs(config.get("eval")))
        tasks = eval_task_specs(results.eval_settings(config.get("eval"))) if tasks is None else tasks
        suites = build_suites(tasks, data_dir, work_dir=run.path / "eval_data")
        live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        evaluator = build_evaluator(tasks, live.tokenizer, data_dir, work_dir=run.path / "eval_data",
                                    max_positions=getattr(live.model.config, "max_position_embeddings", None),
                                    suites=suites) if tasks else None
        reconstructor = run.reconstructor(live, rebuild, data_dir)
        record_reconstruction(results, reconstructor, results.get("overrides") or [])
        context = {"trajectory": run.trajectory.id, "model": run.model_spec().name,
                   **reconstruction_context(reconstructor)}
        recover_into(results, settings, live, [reconstructor.level(run.level(target=t, live=live)) for t in levels],
                     recipe=recipe, data_dir=data_dir, trainer=trainer or {"accelerator": "auto", "devices": 1},
                     loggers=loggers or (lambda folder, hp: []), progress=progress, evaluator=evaluator,
                     context=context, hint=hint, specs=tasks)
        if not rank_zero():
            return None
        return results.finish(figure=True)


def check_positions_early(spec, settings: RecoverSettings) -> None:
    """recover.seq_len against the model's positions from its config alone (before loading); a model whose config
    cannot be read without loading it is checked again once loaded (recover_levels)."""
    try:
        config = model_config(spec)
    except GispError:
        return
    check_positions(settings, getattr(config, "max_position_embeddings", None), spec.name)


def recover_into(results: Results, settings: RecoverSettings, live: LiveModel, levels: list[Level], *, recipe,
                 data_dir: Path | None, trainer: dict, loggers: Callable[[Path, dict], list], progress: bool,
                 evaluator, context: dict, hint: list[str] | None = None, specs=()) -> None:
    """Recover `levels`, record the recovery and its levels in `results` and evaluate the recovered models through
    the level loop (results.json written after each level). Shared by gisp.recover and gisp.run recover=..."""
    for level in levels if rank_zero() else []:  # a level the run never recorded (one its trajectory reaches) is
        entry = results.entry(target_key(level.target))  # recorded first, as gisp.evaluate records one
        if "sparsity" not in entry:
            entry.update(level.record(), masks=save_level(results.run_dir, target_key(level.target), level),
                         added_by="gisp.recover")
    curve = (lambda model: evaluator(model, progress=False)) if evaluator is not None else None
    recovered = recover_levels(results.run_dir, settings, live, levels, recipe=recipe, data_dir=data_dir,
                               trainer=trainer, loggers=loggers, progress=progress, context=context, evaluate=curve)
    if not rank_zero():
        return
    name = settings.key
    record = Recovery(results.run_dir, name).require()
    results.record_recovery(name, record["definition"], {r.key: r.record for r in recovered})
    results.write()
    fresh = {r.key: r.model for r in recovered if r.model is not None}
    jobs = []
    for level in levels:
        key = target_key(level.target)
        model = (lambda key=key, level=level:
                 recovered_model(results.run_dir, name, live, level, fresh.pop(key, None)))
        jobs.append(LevelJob(recovered_key(key, name), results.entry(recovered_key(key, name)), model, level.step))
    evaluate_levels(results, jobs, evaluator, specs=specs, progress=progress, hint=hint)
    live.set_level(None)
    log.info("recovered levels %s with %s: %s", [target_key(v.target) for v in levels], name,
             {job.key: job.entry.get("metrics") for job in jobs})
