"""The GISP pipeline: load, calibrate, prune iteratively to every sparsity target, evaluate, write results.

`run(settings, run_dir)` takes the typed settings of gisp.config (never the Hydra config); the command line
(`gisp.run`) and the tests build those settings with `gisp.config.load_settings`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gisp.config import RunSettings, build_loggers
from gisp.errors import GispError
from gisp.eval.report import log_results_table, plot_results
from gisp.eval.suite import build_evaluator
from gisp.io import write_json_atomic, write_text_atomic
from gisp.lightning.callbacks import IterativePruning, OneShotPruning
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import PASSES, ActivationModule
from gisp.models.families import family_spec
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.structure import ModelStructure, describe, layer_modules
from gisp.prune.importance import get_score
from gisp.prune.masks import MaskApplier
from gisp.prune.methods import flap_bias
from gisp.prune.ranking import RANKINGS
from gisp.prune.trajectory import Trajectory, target_key

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


def run(settings: RunSettings, run_dir: str | Path) -> dict[str, Any] | None:
    """Prune `settings.model` along the trajectory to every target; returns the results (None if stopped early)."""
    s = settings
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if s.threads:
        torch.set_num_threads(s.threads)
    ratios = s.schedule.ratios()
    L.seed_everything(s.seed, verbose=False)

    model, tokenizer = load_model_and_tokenizer(s.model, s.cache_dir)
    structure = describe(model, explicit=list(s.prune.protect_layers) if s.prune.protect_layers is not None else None,
                         first_fraction=s.prune.protect_first_fraction, last=s.prune.protect_last)
    check_targets(s.targets, structure)
    evaluator = build_evaluator(s.evaluation, tokenizer, s.data_dir, work_dir=run_dir / "eval_data",
                                max_positions=getattr(model.config, "max_position_embeddings", None))
    calib = s.calibration.build(s.objective, tokenizer, s.data_dir)

    write_text_atomic(run_dir / "config.yaml", s.config_yaml())  # for export / evaluation
    meta = {"model": s.model.name, "model_type": model.config.model_type, "structure": structure.__dict__ | {
        "protected": list(structure.protected)}, "targets": list(s.targets)}
    trajectory = Trajectory.open(run_dir / "trajectory", s.fingerprint, meta, resume=s.resume)
    if trajectory.last_step:
        log.info("resuming %s from step %d", trajectory.path, trajectory.last_step)
    layers = layer_modules(model, family_spec(model.config.model_type))
    applier = MaskApplier(layers, structure)
    evaluate = (lambda m: evaluator(m, progress=s.progress)) if evaluator else None
    callback, module = build_pruning(s, model, applier, trajectory, ratios, evaluate, n_samples=len(calib))
    # Lightning runs the scoring passes (trainer.validate): no checkpoints, no optimizer, gradients enabled.
    trainer = L.Trainer(**s.trainer, callbacks=[callback], logger=build_loggers(s.loggers, run_dir, s.resolved),
                        default_root_dir=str(run_dir), enable_checkpointing=False, inference_mode=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False, enable_model_summary=False,
                        enable_progress_bar=s.progress)
    calibration = CalibrationData(calib, s.calibration.batch_size)
    status = "failed"
    try:
        passes = 0
        while not callback.finished:
            if s.prune.max_steps_per_run and passes >= s.prune.max_steps_per_run:
                log.warning("stopped after %d steps as asked (prune.max_steps_per_run); run again with "
                            "hydra.run.dir=%s to continue", passes, run_dir)
                status = "success"
                return None
            if module is None:  # magnitude / random: scores from the weights, no calibration pass
                score = get_score(s.pruner.score)
                callback.prune_all(trainer, *score.scores(layers, structure, None, s.pruner))
            elif isinstance(module, ActivationModule):
                with module.recorder:  # forward hooks on o_proj / down_proj inputs, removed whatever happens
                    trainer.validate(module, datamodule=calibration, verbose=False)
            else:
                trainer.validate(module, datamodule=calibration, verbose=False)
            passes += 1
        if trainer.is_global_zero:
            model.to(trainer.strategy.root_device)  # a resumed, finished run never entered validate
            callback.evaluate_missing(trainer, model)
            trajectory.manifest["complete"] = True
            trajectory.write()
        results = build_results(trajectory, s, calib.record, evaluator.describe() if evaluator else {},
                                time.perf_counter() - started)
        if trainer.is_global_zero:
            write_json_atomic(run_dir / "results.json", results)
            log.info("results: %s", run_dir / "results.json")
            if evaluator is not None:
                plot_results(results, run_dir / "metrics.png")
                log_results_table(trainer.loggers, results)
        status = "success"
        return results
    finally:
        for logger in trainer.loggers:
            logger.finalize(status)


def build_pruning(s: RunSettings, model: torch.nn.Module, applier: MaskApplier, trajectory: Trajectory,
                  ratios: list[float], evaluate, n_samples: int) -> tuple[IterativePruning, L.LightningModule | None]:
    """The callback that turns scores into levels, and the module whose validation pass computes the scores
    (None for the methods that need no calibration pass), both chosen from the registries."""
    layers, structure, pruner = applier.layers, applier.structure, s.pruner
    make_pass = PASSES[pruner.signal]
    module = make_pass(model, layers, structure, n_samples, pruner) if make_pass else None
    if pruner.iterative:
        return IterativePruning(applier, trajectory, ratios, list(s.targets), evaluate=evaluate), module
    planner = RANKINGS[pruner.ranking]
    bias = (lambda masks, module: flap_bias(layers, structure, masks, module.moments)) \
        if pruner.bias_compensation else None
    callback = OneShotPruning(applier, trajectory, list(s.targets), evaluate=evaluate, bias=bias,
                              plan=lambda heads, channels, current, target: planner(heads, channels, current,
                                                                                    structure, target))
    return callback, module


def build_results(trajectory: Trajectory, s: RunSettings, calibration: dict, evaluation: dict,
                  seconds: float) -> dict[str, Any]:
    manifest = trajectory.manifest
    out_targets = {}
    for t in s.targets:
        step = manifest["targets"][target_key(t)]
        record = trajectory.step_record(step)
        out_targets[target_key(t)] = {"sparsity": record["sparsity"], "step": step,
                                      "structural_ratio": record["structural_ratio"],
                                      "metrics": record.get("metrics") or {},
                                      "masks": f"trajectory/{record['masks']}" if "masks" in record else None}
    pruner = s.pruner
    return {
        "model": manifest["meta"]["model"],
        "method": {"pruner": pruner.name, "score": pruner.score, "ranking": pruner.ranking,
                   "iterative": pruner.iterative, "bias_compensation": pruner.bias_compensation,
                   "objective": s.objective.name, "normalization": pruner.normalization,
                   "schedule": s.resolved.get("schedule"),
                   "protected_layers": manifest["meta"]["structure"]["protected"],
                   "steps_run": trajectory.last_step},
        "calibration": calibration,
        "evaluation": evaluation,
        "dense": {"sparsity": 0.0, "metrics": manifest["dense"]["metrics"] or {}},
        "targets": out_targets,
        "trajectory": "trajectory/manifest.json",
        "overrides": list(s.overrides) if s.overrides is not None else None,
        "seconds": round(seconds, 1),
    }
