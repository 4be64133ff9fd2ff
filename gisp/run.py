"""Entry point: `python -m gisp.run model=tiny_mistral sparsity=0.4,0.5 -m`. Thin: Hydra in, `run(settings)` out."""

from __future__ import annotations

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from gisp.cli import (
    RunRecord,
    hydra_output_dir,
    hydra_overrides,
    hydra_sweep_name,
    plain_config,
    run_command,
    user_errors,
)
from gisp.config import load_settings
from gisp.errors import GispError
from gisp.eval.report import levels_text
from gisp.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@user_errors
def main(cfg: DictConfig) -> None:
    run_dir = hydra_output_dir()
    created = not any(run_dir.iterdir())  # Hydra makes the run dir before any check: removed again when refused
    record = RunRecord(cfg)  # .hydra/ and run.log: written once the checks passed
    try:
        settings = load_settings(plain_config(cfg), overrides=hydra_overrides(), sweep=hydra_sweep_name())
        results = run(settings, run_dir, on_start=record.start)
    except GispError:
        if created and rank_zero_only.rank == 0 and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    finally:
        record.close()
    if results is not None and rank_zero_only.rank == 0:
        print(f"gisp: results in {run_dir / 'results.json'}\n{levels_text(results)}")


if __name__ == "__main__":
    run_command(main)
