"""Entry point: `python -m gisp.run model=tiny_mistral sparsity=0.4,0.5 -m`. Thin: Hydra in, `run(cfg)` out."""

from __future__ import annotations

import logging
import sys

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from gisp.errors import GispError
from gisp.pipeline import hydra_run_dir, run

log = logging.getLogger("gisp")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        results = run(cfg)
    except GispError as e:  # a user error: the message says what to fix; no traceback, non-zero exit
        log.error("%s", e)
        sys.exit(2)
    if results is not None and rank_zero_only.rank == 0:
        print(f"gisp: results in {hydra_run_dir() / 'results.json'}")


if __name__ == "__main__":
    main()
