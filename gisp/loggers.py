"""The experiment loggers of a command (the `logger` group: wandb, offline by default, or csv), built from their
config nodes, given the run's hyperparameters, and ended cleanly.

A node is `{_target_: a Lightning logger class, ...its arguments}`; `save_dir` is where the command writes (the run
dir, or one recovery's folder). The one place loggers are made, for gisp.run, gisp.evaluate and gisp.recover.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

from typing_extensions import Self

from gisp.errors import GispError

log = logging.getLogger(__name__)

LoggerFactory = Callable[[Path, dict], list]
"""(folder, extra hyperparameters) -> the loggers of one run (gisp.run) or one fit (a recovery): a `Loggers`."""


def _logger_class(target: str) -> type:
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise GispError(f"logger _target_ {target!r} is not an importable class: see conf/logger/*.yaml") from None


def build_loggers(nodes: dict | None, save_dir: str | Path, hyperparameters: dict) -> list:
    """The loggers of `nodes` (name -> config node), each writing under `save_dir` and given `hyperparameters`."""
    out = []
    for name, node in (nodes or {}).items():
        node = dict(node)
        cls = _logger_class(node.pop("_target_"))
        logger = cls(**node, save_dir=str(save_dir))
        logger.log_hyperparams(hyperparameters)
        out.append(logger)
        log.info("logging to %s (%s)", name, cls.__name__)
    return out


class Loggers:
    """The loggers of one command, made on demand, one set per folder (the run dir; each fit of a recovery), given
    the command's hyperparameters (plus each call's `extra`), and all ended when the `with` block ends: `success`, or
    `failed` when it raised.

        with Loggers(nodes, hyperparameters) as loggers:
            trainer = L.Trainer(logger=loggers(run_dir), ...)
    """

    def __init__(self, nodes: dict | None, hyperparameters: dict):
        self.nodes = dict(nodes or {})
        self.hyperparameters = hyperparameters
        self.made: list = []

    def __call__(self, folder: str | Path, extra: dict | None = None) -> list:
        out = build_loggers(self.nodes, folder, {**self.hyperparameters, **(extra or {})})
        self.made += out
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        finalize_loggers(self.made, "success" if exc_type is None else "failed")


def finalize_loggers(loggers: list, status: str) -> None:
    """End every logger's run: Lightning's `finalize`, and wandb's `finish` (otherwise wandb ends its run at exit and
    its lines would follow the results table a command prints last)."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
