"""Entry point: `python -m gisp.run model=tiny_mistral sparsity=0.4,0.5 -m`. Thin: Hydra in, `run(settings)` out."""

from __future__ import annotations

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from gisp.cli import hydra_output_dir, hydra_overrides, user_errors
from gisp.config import load_settings
from gisp.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@user_errors
def main(cfg: DictConfig) -> None:
    run_dir = hydra_output_dir()
    results = run(load_settings(cfg, overrides=hydra_overrides()), run_dir)
    if results is not None and rank_zero_only.rank == 0:
        print(f"gisp: results in {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
