"""The GISP pipeline: load, calibrate, prune iteratively to every sparsity target, evaluate, write results.

`run(cfg)` is the one place where the Hydra config is read; everything below it takes typed arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from gisp.builders import (
    build_calibration,
    build_evaluator,
    build_loggers,
    check_objective_data,
    check_split_seeds,
    model_spec,
)
from gisp.lightning.callbacks import IterativePruning, OneShotPruning
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.io import write_json_atomic, write_text_atomic
from gisp.lightning.scoring import ActivationModule, CalibrationData, GISPModule
from gisp.prune.masks import MaskApplier
from gisp.models.loading import load_model_and_tokenizer
from gisp.prune.objectives import get_objective
from gisp.prune.methods import PLANNERS, PrunerSpec, activation_scores, flap_bias, pruner_spec, weight_scores
from gisp.models.families import family_spec
from gisp.eval.report import log_results_table, plot_results
from gisp.prune.schedule import structural_ratios
from gisp.prune.importance import NORMALIZATIONS
from gisp.models.structure import ModelStructure, describe, layer_modules
from gisp.prune.trajectory import Trajectory, target_key

log = logging.getLogger(__name__)

# Config sections that define the trajectory: a run dir can only be resumed with the same values.
FINGERPRINT_KEYS = ("model", "data", "objective", "pruner", "schedule", "prune", "sparsity", "eval")


def parse_targets(sparsity: Any) -> list[float]:
    """`sparsity=0.4` or `sparsity=[0.2,0.4]` -> sorted unique floats in [0, 1)."""
    values = list(sparsity) if isinstance(sparsity, (list, tuple)) or OmegaConf.is_list(sparsity) else [sparsity]
    if not values:
        raise GispError("sparsity is empty: give one target (sparsity=0.4) or a list (sparsity=[0.2,0.4])")
    try:
        targets = sorted({float(v) for v in values})
    except (TypeError, ValueError):
        raise GispError(f"sparsity must be numbers in [0, 1), got {values}") from None
    bad = [t for t in targets if not 0.0 <= t < 1.0]
    if bad:
        raise GispError(f"sparsity targets {bad} are outside [0, 1): parameter sparsity is a fraction, e.g. 0.4")
    return targets


def check_targets(targets: list[float], structure: ModelStructure) -> None:
    """Refuse targets the protected layers cannot allow, before any expensive work."""
    top = targets[-1]
    if top >= structure.max_sparsity:
        raise GispError(
            f"sparsity target {top} is not reachable: with layers {list(structure.protected)} protected, at most "
            f"{structure.max_sparsity:.4f} of the decoder parameters can be pruned (every head and channel of every "
            "other layer). Lower the target or protect fewer layers (prune.protect_first_fraction / protect_last)."
        )


def fingerprint(cfg: DictConfig) -> str:
    sections = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in FINGERPRINT_KEYS if k in cfg}
    if isinstance(sections.get("prune"), dict):
        sections["prune"].pop("max_steps_per_run", None)  # how far one invocation goes does not change the result
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise GispError("no run dir: call run(cfg, run_dir=...) outside a Hydra app")
    return Path(HydraConfig.get().runtime.output_dir)


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of this job (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Prune `cfg.model` along the GISP trajectory to every target; returns the results (None if stopped early)."""
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    targets = parse_targets(cfg.sparsity)
    pruner = pruner_spec(cfg.pruner)
    objective = get_objective(cfg.objective.name)
    check_objective_data(objective, cfg.data)
    check_split_seeds(cfg)
    grad_dtype = {None: None, "float32": torch.float32, "float64": torch.float64}.get(cfg.prune.get("grad_dtype"), "?")
    if grad_dtype == "?":
        raise GispError(f"prune.grad_dtype must be null, float32 or float64, got {cfg.prune.grad_dtype}")
    if cfg.prune.normalization not in NORMALIZATIONS:
        raise GispError(f"unknown prune.normalization '{cfg.prune.normalization}'; choose one of {NORMALIZATIONS}")
    ratios = structural_ratios(cfg.schedule.name, cfg.schedule.steps, cfg.schedule.max_ratio,
                               cfg.schedule.get("rate", 3.0))
    data_dir = resolve_data_dir(cfg.get("data_dir"))
    L.seed_everything(cfg.seed, verbose=False)

    spec = model_spec(cfg.model)
    model, tokenizer = load_model_and_tokenizer(spec, Path(cfg.cache_dir).expanduser())
    structure = describe(model, explicit=cfg.prune.protect_layers, first_fraction=cfg.prune.protect_first_fraction,
                         last=cfg.prune.protect_last)
    check_targets(targets, structure)
    evaluator = build_evaluator(cfg.eval, tokenizer, data_dir, work_dir=run_dir / "eval_data",
                                max_positions=getattr(model.config, "max_position_embeddings", None))
    calib = build_calibration(cfg.data, objective, tokenizer, data_dir)

    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # for export / evaluation
    meta = {"model": spec.name, "model_type": model.config.model_type, "structure": structure.__dict__ | {
        "protected": list(structure.protected)}, "targets": targets}
    trajectory = Trajectory.open(run_dir / "trajectory", fingerprint(cfg), meta, resume=cfg.resume)
    if trajectory.last_step:
        log.info("resuming %s from step %d", trajectory.path, trajectory.last_step)
    layers = layer_modules(model, family_spec(model.config.model_type))
    applier = MaskApplier(layers, structure)
    evaluate = (lambda m: evaluator(m, progress=cfg.progress)) if evaluator else None
    callback, module = build_pruning(pruner, cfg, model, applier, trajectory, ratios, targets, evaluate,
                                     n_samples=len(calib), grad_dtype=grad_dtype)
    # Lightning runs the scoring passes (trainer.validate): no checkpoints, no optimizer, gradients enabled.
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=[callback],
                        logger=build_loggers(cfg.logger, run_dir, cfg), default_root_dir=str(run_dir),
                        enable_checkpointing=False, inference_mode=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, enable_model_summary=False, enable_progress_bar=cfg.progress)
    calibration = CalibrationData(calib, cfg.data.batch_size)
    status = "failed"
    try:
        passes = 0
        while not callback.finished:
            if cfg.prune.max_steps_per_run and passes >= cfg.prune.max_steps_per_run:
                log.warning("stopped after %d steps as asked (prune.max_steps_per_run); run again with "
                            "hydra.run.dir=%s to continue", passes, run_dir)
                status = "success"
                return None
            if module is None:  # magnitude / random: scores from the weights, no calibration pass
                callback.prune_all(trainer, *weight_scores(pruner, layers, structure))
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
        results = build_results(trajectory, targets, pruner, calib.record, evaluator.describe() if evaluator else {},
                                cfg, time.perf_counter() - started)
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


def build_pruning(pruner: PrunerSpec, cfg: DictConfig, model: torch.nn.Module, applier: MaskApplier,
                  trajectory: Trajectory, ratios: list[float], targets: list[float], evaluate, n_samples: int,
                  grad_dtype: torch.dtype | None) -> tuple[IterativePruning, L.LightningModule | None]:
    """The callback that turns scores into levels, and the module whose validation pass computes the scores
    (None for the methods that need no calibration pass)."""
    layers, structure = applier.layers, applier.structure
    if pruner.iterative:
        return (IterativePruning(applier, trajectory, ratios, targets, evaluate=evaluate),
                GISPModule(model, layers, structure, n_samples, cfg.prune.normalization, grad_dtype))
    planner = PLANNERS[pruner.ranking]
    bias = (lambda masks, module: flap_bias(layers, structure, masks, module.moments)) \
        if pruner.bias_compensation else None
    callback = OneShotPruning(applier, trajectory, targets, evaluate=evaluate, bias=bias,
                              plan=lambda heads, channels, current, target: planner(heads, channels, current,
                                                                                    structure, target))
    if pruner.signal == "gradients":
        return callback, GISPModule(model, layers, structure, n_samples, cfg.prune.normalization, grad_dtype)
    if pruner.signal == "activations":
        return callback, ActivationModule(model, layers, structure, n_samples,
                                          score_fn=lambda moments: activation_scores(pruner, layers, structure,
                                                                                     moments))
    return callback, None


def build_results(trajectory: Trajectory, targets: list[float], pruner: PrunerSpec, calibration: dict,
                  evaluation: dict, cfg: DictConfig, seconds: float) -> dict[str, Any]:
    manifest = trajectory.manifest
    out_targets = {}
    for t in targets:
        step = manifest["targets"][target_key(t)]
        record = trajectory.step_record(step)
        out_targets[target_key(t)] = {"sparsity": record["sparsity"], "step": step,
                                      "structural_ratio": record["structural_ratio"],
                                      "metrics": record.get("metrics") or {},
                                      "masks": f"trajectory/{record['masks']}" if "masks" in record else None}
    return {
        "model": manifest["meta"]["model"],
        "method": {"pruner": pruner.name, "score": pruner.score, "ranking": pruner.ranking,
                   "iterative": pruner.iterative, "bias_compensation": pruner.bias_compensation,
                   "objective": cfg.objective.name, "normalization": cfg.prune.normalization,
                   "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
                   "protected_layers": manifest["meta"]["structure"]["protected"],
                   "steps_run": trajectory.last_step},
        "calibration": calibration,
        "evaluation": evaluation,
        "dense": {"sparsity": 0.0, "metrics": manifest["dense"]["metrics"] or {}},
        "targets": out_targets,
        "trajectory": "trajectory/manifest.json",
        "overrides": hydra_overrides(),
        "seconds": round(seconds, 1),
    }
