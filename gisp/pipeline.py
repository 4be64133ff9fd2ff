"""The GISP pipeline: load, calibrate, extend (or reuse) the stored trajectory, read out every target, evaluate.

`run(settings, run_dir)` takes the typed settings of gisp.config (never the Hydra config); the command line
(`gisp.run`) and the tests build those settings with `gisp.config.load_settings`. The trajectory lives in the
store (gisp.prune.trajectory), shared by every job with the same definition; the run dir holds this job's levels
(their masks under `levels/`), metrics and results.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from gisp.config import RunSettings
from gisp.errors import GispError
from gisp.eval.suite import build_evaluator, build_suites
from gisp.io import check_writable, read_json, write_json_atomic, write_text_atomic
from gisp.level_loop import LevelJob, evaluate_levels, pruned_level, reconstruction_context, record_reconstruction
from gisp.lightning.callbacks import IterativePruning, OneShotPruning
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.progress import ScoringProgressBar
from gisp.lightning.scoring import PASSES, ActivationPass
from gisp.lightning.sharding import STRATEGY_NAME
from gisp.loggers import Loggers
from gisp.memory.scoring import check_fits, plan_for_run, visible_device_memory
from gisp.memory.training import fits, plan_recovery
from gisp.models.families import family_spec, get_submodule
from gisp.models.identity import model_identity
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.structure import LayerModules, ModelStructure, describe, layer_modules
from gisp.prune.importance import get_score
from gisp.prune.levels import read_level
from gisp.prune.masks import MaskApplier, Masks, masks_record
from gisp.prune.ranking import check_owl
from gisp.prune.trajectory import Trajectory, TrajectoryStore, target_key, trajectory_id
from gisp.reconstruct.build import token_batches
from gisp.reconstruct.levels import Reconstructor
from gisp.reconstruct.slimgpt import slimgpt_level
from gisp.recovery.runner import check_positions_early, recover_into
from gisp.results import Results, evaluation_settings
from gisp.runs import LiveModel, claim, save_level

log = logging.getLogger(__name__)


def check_targets(targets: tuple[float, ...], structure: ModelStructure) -> None:
    """Refuse targets the protected layers cannot allow, before any expensive work."""
    top = targets[-1]
    if top >= structure.max_sparsity:
        raise GispError(
            f"sparsity target {top} is not reachable: with layers {list(structure.protected)} protected, at most "
            f"{structure.max_sparsity:.4f} of the decoder parameters can be pruned (every head and channel of every "
            "other layer). Lower the target or protect fewer layers (prune.protect_first_fraction / protect_last)."
        )


def run(settings: RunSettings, run_dir: str | Path, on_start: Callable[[Path], None] | None = None
        ) -> dict[str, Any] | None:
    """Reach every target of `settings` on the stored trajectory (computing only the missing steps), evaluate
    the levels, write results.json; returns the results (None when stopped early by prune.max_steps_per_run).

    The run dir is claimed first (one command at a time); every check runs before the first write, so a refused
    command leaves the run dir as it found it. `on_start(run_dir)` is called (on rank zero) when the checks have
    passed and the run starts writing: the command line's own records (Hydra's config, the log file) go there."""
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    run_dir = Path(run_dir)
    check_writable(settings.store_dir, "store_dir", "set store_dir=... (or GISP_STORE) to a folder you can write")
    claim_dir = claim(run_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext(run_dir)
    with claim_dir:
        status, results = "failed", None
        try:
            results = _run(settings, run_dir, started, on_start)
            status = "stopped" if results is None else "complete"
        except GispError:
            status = "refused"  # a refused command leaves the run dir as it found it: no record either
            raise
        except BaseException as e:
            status = "failed" if isinstance(e, Exception) else "interrupted"
            raise
        finally:
            if rank_zero_only.rank == 0 and status != "refused" and (run_dir / "trajectory.json").exists():
                Results.load(run_dir).record_invocation(started_at, time.perf_counter() - started, status)
        # the time of every invocation is in results.json now
        return Results.load(run_dir).data if results is not None and rank_zero_only.rank == 0 else results


def _check_positions(calib, model: torch.nn.Module) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(int(x.numel()) for x in calib.input_ids)
    if limit is not None and longest > limit:
        raise GispError(f"calibration sequences of up to {longest} tokens exceed the model's {limit} positions: set "
                        f"data.seq_len (or the data's length cap) to at most {limit}")


def _run(s: RunSettings, run_dir: Path, started: float, on_start: Callable[[Path], None] | None
         ) -> dict[str, Any] | None:
    previous = Results.load(run_dir)
    if not s.resume and previous.exists:
        raise GispError(f"{run_dir} already holds results and resume=false: choose a new run dir (hydra.run.dir=...)")
    previous.check_reconstruction(s.reconstruct.definition(), list(s.overrides or []))
    if s.threads:
        torch.set_num_threads(s.threads)
    L.seed_everything(s.seed, verbose=False)

    plan = plan_for_run(s)  # from the config alone: refuse what cannot fit before loading anything
    if plan is not None:
        if rank_zero_only.rank == 0:
            log.info("%s", plan.table())
        check_fits(plan, visible_device_memory(s.trainer))
    if s.recover.enabled:  # the recovery's fits too, at the dense shapes (the levels are not known yet): an upper bound
        check_positions_early(s.model, s.recover)
        training = plan_recovery(s.model, s.recover, {target_key(t): None for t in s.targets}, s.prune.gqa_mode)
        if training is not None:
            log.info("%s", training.table())
            refusal = fits(training, visible_device_memory(s.trainer))
            if refusal:
                raise GispError(refusal)
    # evaluation suites (lm-eval tasks, GSM8K) are checked before any weight is read: an offline hub task is refused
    suites = build_suites(s.evaluation, s.data_dir, work_dir=run_dir / "eval_data")
    # trainer=fsdp: only rank 0 reads the weights; the other processes build the model on the meta device and
    # receive their shards from rank 0 (one copy of the model in host memory per node, not one per process).
    empty = rank_zero_only.rank != 0 and s.trainer.get("strategy") == STRATEGY_NAME and s.pruner.signal == "gradients"
    identity = model_identity(s.model)  # the weights' content (a folder, a hub commit): part of the definition
    model, tokenizer = load_model_and_tokenizer(s.model, s.cache_dir, empty=empty)
    if empty and next(model.parameters()).is_meta:
        log.info("rank %d: model built on the meta device (no weights read): its shards come from rank 0",
                 rank_zero_only.rank)
    structure = describe(model, explicit=list(s.prune.protect_layers) if s.prune.protect_layers is not None else None,
                         first_fraction=s.prune.protect_first_fraction, last=s.prune.protect_last,
                         gqa_mode=s.prune.gqa_mode)
    check_targets(s.targets, structure)
    if s.pruner.ranking == "owl":  # OWL's per-layer sparsities, bounded before any scoring pass
        check_owl(s.targets, structure, s.pruner.option("outlier_lambda"))
    evaluator = build_evaluator(s.evaluation, tokenizer, s.data_dir, work_dir=run_dir / "eval_data",
                                max_positions=getattr(model.config, "max_position_embeddings", None), suites=suites)
    calib = s.calibration.build(s.objective, tokenizer, s.data_dir)
    _check_positions(calib, model)
    definition = s.definition(calib.content_sha256(), identity)
    tid = trajectory_id(definition)
    pointer = run_dir / "trajectory.json"
    if pointer.is_file() and read_json(pointer).get("id") != tid:
        raise GispError(f"{run_dir} holds a run of another configuration: {_differences(pointer, definition)}. Use a "
                        "new run dir (hydra.run.dir=...), or resume that run with its own overrides and data")
    meta = {"model": s.model.name, "model_type": model.config.model_type,
            "structure": structure.__dict__ | {"protected": list(structure.protected)}}
    store = TrajectoryStore(s.store_dir)
    layers = layer_modules(model, family_spec(model.config.model_type))
    applier = MaskApplier(layers, structure)
    with Loggers(s.loggers, s.resolved) as loggers:
        trainer = L.Trainer(**s.trainer, logger=loggers(run_dir), plugins=_plugins(s), default_root_dir=str(run_dir),
                            enable_checkpointing=False, inference_mode=False, num_sanity_val_steps=0,
                            use_distributed_sampler=False, enable_model_summary=False, enable_progress_bar=s.progress,
                            callbacks=[ScoringProgressBar()] if s.progress else None)
        # One job computes a trajectory at a time (the others wait, then reuse); DDP ranks > 0 follow rank 0.
        lock = store.lock(tid) if rank_zero_only.rank == 0 else contextlib.nullcontext()
        with lock:
            traj = store.open(definition, meta)
            if trainer.is_global_zero:
                if on_start is not None:
                    on_start(run_dir)
                write_text_atomic(run_dir / "config.yaml", s.config_yaml())  # for export / evaluation
                write_json_atomic(pointer, {"id": traj.id, "path": str(traj.directory)})
            reused = traj.last_step
            computed = extend(traj, s, model, applier, trainer, calib, stop_at=s.targets[-1])
        for logger in trainer.loggers:  # reusing jobs link to the trajectory (its per-step curves are logged once)
            logger.log_hyperparams({"trajectory": {"id": traj.id, "path": str(traj.directory),
                                                   "computed_steps": computed or [], "reused_steps": reused}})
        if computed is None:
            return None
        model.to(trainer.strategy.root_device)
        shared = {}
        # Split only when the other processes exist: Lightning starts them at the first scoring pass, so a run that
        # only reuses a finished trajectory is one process, which evaluates everything itself.
        started_processes = torch.distributed.is_available() and torch.distributed.is_initialized()
        if started_processes and trainer.world_size > 1 and evaluator is not None and evaluator.perplexity_metrics:
            trainer.strategy.barrier()  # rank 0 has written every step: the others read the same trajectory
            shared = split_perplexities(trainer, run_dir, s, Trajectory.load(traj.directory), model, structure,
                                        layers, applier, evaluator)
        if not trainer.is_global_zero:  # lm-eval suites and the results are rank 0's alone
            return None
        live = LiveModel(model, tokenizer, structure, layers, applier)
        results = Results.load(run_dir)
        results.update(run_record(traj, s, calib.record, reused=list(range(1, min(reused, traj.last_step) + 1)),
                                  computed=computed))
        reconstructor = Reconstructor(s.reconstruct, s.reconstruct_recipe, tokenizer, s.data_dir, s.store_dir, traj.id,
                                      model, layers, structure)
        record_reconstruction(results, reconstructor, list(s.overrides or []))
        evaluate_run_levels(results, s, traj, live, evaluator, loggers=trainer.loggers, perplexities=shared,
                            reconstructor=reconstructor)
        if s.recover.enabled:  # the recovered levels join the table: results.json stays open until they are in
            levels = [reconstructor.level(read_level(traj, s.pruner, structure, layers, t)) for t in s.targets]
            context = {"trajectory": traj.id, "model": s.model.name, **reconstruction_context(reconstructor)}
            recover_into(results, s.recover, live, levels, recipe=s.recover_recipe, data_dir=s.data_dir,
                         trainer=s.trainer, loggers=loggers, progress=s.progress, evaluator=evaluator,
                         context=context, hint=_hint(s), specs=s.evaluation)
        results.finish(seconds=time.perf_counter() - started, figure=evaluator is not None,
                       loggers=trainer.loggers)
        log.info("results: %s", results.path)
        return results.data


def _differences(pointer: Path, definition: dict) -> str:
    """Which parts of the trajectory definition differ between the run dir's trajectory and this command's."""
    try:
        old = Trajectory.load(read_json(pointer)["path"]).manifest["definition"]
    except GispError:
        return f"its trajectory {read_json(pointer).get('id')} (no longer in the store) is not this command's"
    new = json.loads(json.dumps(definition, default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed == ["calibration_sha256"]:
        return "the calibration data changed since it was computed (the same settings tokenize to other sequences)"
    return "it differs in " + ", ".join(changed)


def _plugins(s: RunSettings) -> list:
    """Under SLURM the sweep launcher (submitit) requeues preempted jobs; Lightning's own auto-requeue (which saves
    a training checkpoint on SIGUSR1) is switched off so the two do not fight."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if "plugins" in s.trainer or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def extend(traj: Trajectory, s: RunSettings, model: torch.nn.Module, applier: MaskApplier, trainer: L.Trainer,
           calib, stop_at: float) -> list[int] | None:
    """Run scoring passes until the trajectory reaches `stop_at`; returns the steps computed here (None when
    prune.max_steps_per_run stopped it first)."""
    pruner, structure, layers = s.pruner, applier.structure, applier.layers
    if pruner.ranking == "levelwise":
        return extend_levelwise(traj, s, model, layers, structure, calib)
    if pruner.iterative:
        callback = IterativePruning(applier, traj, s.schedule.ratios(), stop_at)
    else:
        callback = OneShotPruning(applier, traj, stop_at, keep_means=pruner.bias_compensation)
    if callback.finished:
        log.info("trajectory %s already reaches %.4f (%d steps): reused, no scoring pass", traj.id, traj.reached,
                 traj.last_step)
        return []
    if traj.last_step:
        log.info("extending trajectory %s from step %d (sparsity %.4f) to reach %s", traj.id, traj.last_step,
                 traj.reached, stop_at)
    else:
        log.info("computing trajectory %s in %s", traj.id, traj.directory)
    make_pass = PASSES[pruner.signal]
    compact = s.prune.compact and pruner.iterative
    if compact and s.trainer.get("strategy") == STRATEGY_NAME:
        log.info("prune.compact: trainer=fsdp shards the dense model's layers, so every scoring pass runs on the "
                 "masked dense model (the same masks)")
        compact = False
    module = make_pass(model, layers, structure, len(calib), pruner, grad_offload=s.prune.grad_offload,
                       checkpointing=s.prune.checkpointing, compact=compact) if make_pass else None
    trainer.callbacks.append(callback)
    calibration = CalibrationData(calib, s.calibration.batch_size)
    passes = 0
    while not callback.finished:
        if s.prune.max_steps_per_run and passes >= s.prune.max_steps_per_run:
            log.warning("stopped after %d steps as asked (prune.max_steps_per_run); run the same command again to "
                        "continue", passes)
            return None
        if module is None:  # magnitude / random: scores from the weights, no calibration pass
            heads, channels, *extra = get_score(pruner.score).scores(layers, structure, None, pruner)
            callback.store_scores(trainer, heads, channels, extra=extra[0] if extra else None)
        elif isinstance(module, ActivationPass):
            with module.recorder:  # forward hooks on o_proj / down_proj inputs, removed whatever happens
                trainer.validate(module, datamodule=calibration, verbose=False)
        else:
            if module.score_on(applier.masks):  # the level's compact model (prune.compact)
                log.info("step %d scores on the compact model of sparsity %.4f", callback.step + 1, traj.reached)
            trainer.validate(module, datamodule=calibration, verbose=False)
        passes += 1
    trainer.callbacks.remove(callback)
    return callback.computed


def extend_levelwise(traj: Trajectory, s: RunSettings, model: torch.nn.Module, layers: list[LayerModules],
                     structure: ModelStructure, calib) -> list[int] | None:
    """A method whose levels are not nested (SlimGPT): each target the trajectory lacks is computed on its own from
    the dense weights and stored as a separate level (masks + new weights); returns the steps computed here (None when
    prune.max_steps_per_run stopped it first)."""
    missing = [t for t in s.targets if traj.level_step(t) is None]
    if not missing:
        log.info("trajectory %s already holds levels %s: reused", traj.id, [target_key(t) for t in s.targets])
        return []
    device = next(model.parameters()).device
    batches = token_batches(list(calib.input_ids), calib.pad_id, s.calibration.batch_size, device)
    decoder = get_submodule(model, family_spec(model.config.model_type).layers)
    computed = []
    for target in missing:
        if s.prune.max_steps_per_run and len(computed) >= s.prune.max_steps_per_run:
            log.warning("stopped after %d levels as asked (prune.max_steps_per_run); run the same command again to "
                        "continue", len(computed))
            return None
        started = time.perf_counter()
        log.info("%s: computing level %s (layer by layer, %d calibration sequences)", s.pruner.name,
                 target_key(target), len(calib.input_ids))
        masks, weights = slimgpt_level(model, decoder, layers, structure, batches, target,
                                       s.pruner.option("percdamp"), s.pruner.option("min_ratio_fraction"))
        step = traj.last_step + 1
        record = {"kind": "level", "target": float(target), **masks_record(masks, structure),
                  "seconds": round(time.perf_counter() - started, 2)}
        traj.add_step(step, record, masks=masks, weights=weights)
        computed.append(step)
        log.info("level %s: sparsity %.4f in %.1f s", target_key(target), record["sparsity"], record["seconds"])
    return computed


def split_perplexities(trainer: L.Trainer, run_dir: Path, s: RunSettings, traj: Trajectory, model: torch.nn.Module,
                       structure: ModelStructure, layers: list[LayerModules], applier: MaskApplier, evaluator
                       ) -> dict[str, dict[str, float]]:
    """Several processes (DDP, FSDP): every process scores its share of each level's perplexity windows and the
    summed log-likelihoods are reduced, so each level costs 1/world of a single process's time. Rank 0 decides
    which levels need it (and refuses mixed protocols) and tells the others, so all run the same collectives; under
    FSDP every forward is a collective, so the processes run in lockstep. Returns {level key: perplexities}."""
    strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
    todo = {"dense": None, **{target_key(t): t for t in s.targets}}
    plan: tuple[list[str], str | None] = ([], None)
    if trainer.is_global_zero:
        previous = Results.load(run_dir)
        described = evaluator.describe()
        ppl = {m: described[m] for m in evaluator.perplexity_metrics}
        levels = previous.entries()
        try:
            previous.check_protocols(described, list(todo), _hint(s))
            plan = ([k for k in todo if previous.needs_evaluation(levels.get(k) or {}, ppl)], None)
        except GispError as e:
            plan = ([], str(e))
    keys, error = strategy.broadcast(plan, src=0)
    if error:
        raise GispError(error)
    lockstep = s.trainer.get("strategy") == STRATEGY_NAME
    device = strategy.root_device

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(t.to(device), reduce_op="sum").cpu()

    out = {}
    for key in keys:
        if todo[key] is None:
            applier.set(Masks.dense(structure))
        else:
            level = read_level(traj, s.pruner, structure, layers, todo[key])
            applier.set(level.masks, level.bias)
        if trainer.is_global_zero:
            log.info("perplexity at %s over %d processes (each scores 1/%d of the windows)", key, world, world)
        out[key] = evaluator.perplexities(model, progress=s.progress and trainer.is_global_zero, rank=rank,
                                          world_size=world, reduce_fn=reduce_fn, lockstep=lockstep)
    applier.set(Masks.dense(structure))
    return out


def _hint(s: RunSettings) -> list[str] | None:
    """The run's evaluation overrides, repeated in a command a protocol refusal suggests."""
    return evaluation_settings(s.overrides) if s.overrides is not None else None


def evaluate_run_levels(results: Results, s: RunSettings, traj: Trajectory, live: LiveModel, evaluator,
                        loggers: list, perplexities: dict[str, dict[str, float]] | None = None,
                        reconstructor: Reconstructor | None = None) -> None:
    """Read out every target, write its masks under levels/, record it, and evaluate dense + levels through the level
    loop (results.json written after each level; marked complete only by `finish`: a killed job never leaves results
    that look complete). `perplexities`: a level's perplexity metrics already computed over several processes
    (split_perplexities); the level then runs only the suites here. `reconstructor`: each level's reconstruction
    (gisp.reconstruct), computed or reused when the level is evaluated."""
    levels = {target_key(t): read_level(traj, s.pruner, live.structure, live.layers, t) for t in s.targets}
    jobs = [LevelJob("dense", results.entry("dense"), lambda: live.at(None))]
    for key, level in levels.items():
        entry = results.entry(key)
        entry.update(level.record(), masks=save_level(results.run_dir, key, level))
        jobs.append(LevelJob(key, entry, pruned_level(live, level, entry, reconstructor, compact=s.compact_eval),
                             step=level.step))
    try:
        evaluate_levels(results, jobs, evaluator, specs=s.evaluation, progress=s.progress, loggers=loggers,
                        computed=perplexities, hint=_hint(s))
    finally:
        live.set_level(None)


def run_record(traj: Trajectory, s: RunSettings, calibration: dict, reused: list[int], computed: list[int]
               ) -> dict[str, Any]:
    """This invocation's record of the run (merged by Results.update into what results.json already holds: levels
    and metrics added by earlier commands, e.g. gisp.evaluate, are kept)."""
    pruner = s.pruner
    return {
        "model": traj.manifest["meta"]["model"],
        "method": {"pruner": pruner.name, "score": pruner.score, "ranking": pruner.ranking,
                   "iterative": pruner.iterative, "bias_compensation": pruner.bias_compensation,
                   "objective": s.objective.name, "normalization": pruner.normalization,
                   "schedule": s.resolved.get("schedule"),
                   "protected_layers": traj.manifest["meta"]["structure"]["protected"]},
        "calibration": calibration,
        "trajectory": {"id": traj.id, "path": str(traj.directory), "steps": traj.last_step,
                       "reaches": traj.reached, "reused_steps": reused, "computed_steps": computed},
        "overrides": list(s.overrides) if s.overrides is not None else None,
        "seed": s.seed,  # the calibration sampling seed: runs that differ only by it are averaged in summaries
        "memory_plan": plan.as_dict() if (plan := plan_for_run(s, quiet=True)) is not None else None,
        "complete": False,
    }
