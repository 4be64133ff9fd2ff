"""Deploy many: evaluate any sparsity level of a saved trajectory on the live masked model, without pruning again.

    python -m gisp.evaluate run_dir=DIR targets=[0.2,0.3,0.4,0.5] eval=[wikitext2,cmqa]

Each level's masks are read from the trajectory and applied to the model in memory; the metrics are merged into
the run's results.json (rewritten atomically after every level, so an interrupted evaluation keeps what it
finished), logged as a wandb table, and drawn in RUN_DIR/metrics.png.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gisp.builders import build_evaluator, build_loggers, load_run_model
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.io import read_json, write_json_atomic
from gisp.prune.masks import MaskApplier, Masks
from gisp.pipeline import parse_targets
from gisp.models.families import family_spec
from gisp.eval.report import log_results_table, plot_results
from gisp.models.structure import describe, layer_modules
from gisp.prune.trajectory import Trajectory, target_key

log = logging.getLogger("gisp")


def resolve_levels(trajectory: Trajectory, targets: list[float], tolerance: float) -> dict[str, int]:
    """Target -> trajectory step: the step the run landed on that target, else the step whose sparsity is within
    ``tolerance`` of it (closest). Fails before any model work, naming the levels the trajectory has."""
    landed = trajectory.manifest.get("targets", {})
    levels = {}
    for t in targets:
        key = target_key(t)
        if key in landed:
            levels[key] = landed[key]
            continue
        best = min(trajectory.steps, key=lambda s: abs(s["sparsity"] - t), default=None)
        if best is None or abs(best["sparsity"] - t) > tolerance:
            have = ", ".join(f"step {s['step']}: {s['sparsity']:.4f}" for s in trajectory.steps)
            raise GispError(
                f"sparsity {t} is not a level of this trajectory (within tolerance={tolerance}); it has {have}. "
                f"Pick one of those, raise tolerance=..., or prune to it with gisp.run (sparsity=[...,{t}])"
            )
        levels[key] = best["step"]
    return levels


def evaluate_run(run_dir: str | Path, eval_cfg: DictConfig, targets: list[float] | None = None, dense: bool = True,
                 tolerance: float = 0.005, data_dir: Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, split_seed: int | None = None, loggers: list | None = None) -> dict[str, Any]:
    """Evaluate the dense model and ``targets`` (default: the run's targets) of a run dir; returns results.json."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise GispError(f"no {results_path}: the run did not finish; finish it first with gisp.run "
                        f"(the same command with hydra.run.dir={run_dir} resumes it)")
    if not eval_cfg.get("tasks"):
        raise GispError("nothing to evaluate: the eval config has no tasks (choose eval=wikitext2, eval=cmqa, ...)")
    results = read_json(results_path)
    trajectory = Trajectory.load(run_dir / "trajectory")
    targets = sorted(float(k) for k in results.get("targets", {})) if targets is None else targets
    levels = resolve_levels(trajectory, targets, tolerance)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_split_seed = run_cfg.get("split_seed")
    if split_seed is not None and run_split_seed is not None and split_seed != run_split_seed:
        raise GispError(f"split_seed={split_seed} differs from the run's split_seed={run_split_seed}: the local "
                        f"evaluation half could overlap the calibration half; use split_seed={run_split_seed}")

    data_dir = resolve_data_dir(data_dir if data_dir is not None else run_cfg.get("data_dir"))
    _, model, tokenizer = load_run_model(run_dir, cache_dir)
    structure = describe(model, protected=tuple(trajectory.manifest["meta"]["structure"]["protected"]))
    applier = MaskApplier(layer_modules(model, family_spec(model.config.model_type)), structure)
    evaluator = build_evaluator(eval_cfg, tokenizer, data_dir, work_dir=run_dir / "eval_data",
                                max_positions=getattr(model.config, "max_position_embeddings", None))

    plan: list[tuple[str, int]] = ([("dense", 0)] if dense else []) + list(levels.items())
    for label, step in plan:
        if step:
            applier.set(trajectory.masks_at(step), trajectory.bias_at(step))
        else:
            applier.set(Masks.dense(structure))
        log.info("evaluating %s (step %d)", label, step)
        metrics = evaluator(model, progress=progress)
        log.info("%s: %s", label, metrics)
        if label == "dense":
            results["dense"].setdefault("metrics", {}).update(metrics)
        else:
            record = trajectory.step_record(step)
            entry = results["targets"].setdefault(label, {
                "sparsity": record["sparsity"], "step": step, "structural_ratio": record["structural_ratio"],
                "metrics": {}, "masks": f"trajectory/{record['masks']}", "added_by": "gisp.evaluate"})
            entry["metrics"].update(metrics)
        results.setdefault("evaluation", {}).update(evaluator.describe())  # items evaluated are known now
        write_json_atomic(results_path, results)
        for logger in loggers or []:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    applier.remove()
    plot_results(results, run_dir / "metrics.png")
    log_results_table(loggers or [], results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        targets = parse_targets(cfg.targets) if cfg.targets is not None else None
        from hydra.core.hydra_config import HydraConfig

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        loggers = build_loggers(cfg.logger, out_dir, cfg)
        status = "failed"
        try:
            evaluate_run(cfg.run_dir, cfg.eval, targets, dense=cfg.dense, tolerance=cfg.tolerance,
                         data_dir=cfg.get("data_dir"), cache_dir=cfg.get("cache_dir"),
                         progress=cfg.progress, split_seed=cfg.split_seed, loggers=loggers)
            status = "success"
        finally:
            for logger in loggers:
                logger.finalize(status)
    except GispError as e:
        log.error("%s", e)
        sys.exit(2)
    print(f"gisp: results in {Path(cfg.run_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
