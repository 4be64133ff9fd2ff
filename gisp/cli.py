"""What every command line shares: a GispError becomes one clear message and exit code 2 (no traceback)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from gisp.errors import GispError

log = logging.getLogger("gisp")

USER_ERROR_EXIT = 2


def user_errors(fn: Callable) -> Callable:
    """Decorate a command's body: a GispError (a user error whose message names the fix) exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GispError as e:
            log.error("%s", e)
            sys.exit(USER_ERROR_EXIT)

    return wrapper


def hydra_output_dir() -> Path:
    """This Hydra job's output dir (the run dir of gisp.run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise GispError("no run dir: outside a Hydra app, call gisp.pipeline.run(settings, run_dir=...)")
    return Path(HydraConfig.get().runtime.output_dir)


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of this job (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
