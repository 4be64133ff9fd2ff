"""Export a level of a run (or a masks file) as a physically smaller Hugging Face folder.

    python -m gisp.export run_dir=outputs/smollm2_135m/<run> target=0.4 out=exports/smollm2_40   # or step=N
    python -m gisp.export masks=RUN/trajectory/step_0008.safetensors model=smollm2_135m out=exports/smollm2_40

The slicing itself is gisp.compact.slicing; this module finds the level and the model.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from gisp.cli import user_errors
from gisp.compact.slicing import export_compact
from gisp.config import model_spec
from gisp.errors import GispError
from gisp.models.loading import ModelSpec, load_model_and_tokenizer
from gisp.prune.masks import Masks
from gisp.prune.trajectory import target_key
from gisp.runs import RunDir


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")


def export_from_run(run_dir: str | Path, out: str | Path, target: float | None = None, step: int | None = None,
                    cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> Path:
    """Export the model of a finished or partial run at one of its targets (or any step): no pruning again."""
    _refuse_existing(out)
    run = RunDir(run_dir)
    if (target is None) == (step is None):
        raise GispError("give exactly one of target=0.4 (a sparsity target of the run) or step=N")
    if target is not None:
        reached = run.trajectory.manifest["targets"]
        if target_key(target) not in reached:
            raise GispError(f"the run in {run.path} never reached target {target:g}; its targets: {sorted(reached)} "
                            f"(or export any step with step=N, 1..{run.trajectory.last_step})")
    level = run.level(target=target, step=step)
    if level.bias is not None:
        raise GispError(f"step {level.step} of {run.path} carries an output bias (FLAP's compensation); the compact "
                        "model has no o_proj/down_proj bias yet, so exporting it would silently change the model. "
                        "Evaluate it in place with gisp.evaluate, or export a level without bias compensation")
    live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
    provenance = {"run_dir": str(run.path.resolve()), "model": run.model_spec().name, "step": level.step,
                  "target": target, "metrics": level.record.get("metrics")}
    return export_compact(live.model, live.tokenizer, level.masks, out, provenance, live.structure)


def export_from_masks(masks_file: str | Path, spec: ModelSpec, out: str | Path, cache_dir: str | Path) -> Path:
    """Export a base model (a conf/model entry) under a masks file, e.g. one copied from another machine."""
    _refuse_existing(out)
    masks = Masks.load(masks_file)
    model, tokenizer = load_model_and_tokenizer(spec, Path(cache_dir).expanduser())
    return export_compact(model, tokenizer, masks, out, {"masks": str(Path(masks_file).resolve())})


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors
def main(cfg: DictConfig) -> None:
    trust = bool(cfg.get("trust_remote_code"))
    if cfg.run_dir is not None:
        path = export_from_run(cfg.run_dir, cfg.out, cfg.target, cfg.step, cfg.cache_dir, trust_remote_code=trust)
    elif cfg.masks is not None and cfg.get("model") is not None:
        path = export_from_masks(cfg.masks, model_spec(cfg.model), cfg.out, cfg.cache_dir)
    else:
        raise GispError("give run_dir=DIR target=T (or step=N), or masks=FILE model=NAME; and out=OUT")
    print(f"gisp: exported to {path} (load with AutoModelForCausalLM.from_pretrained(path) after `import gisp`, "
          "or with trust_remote_code=True without gisp)")


if __name__ == "__main__":
    main()
