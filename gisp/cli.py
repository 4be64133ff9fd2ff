"""What every command line shares: a GispError becomes one clear message and exit code 2 (no traceback); SIGTERM
and SIGINT (scancel, SLURM time limits, preemption, Ctrl-C) stop the command at once with a non-zero exit code and
the command that resumes it."""

from __future__ import annotations

import functools
import logging
import logging.handlers
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from gisp.errors import GispError

log = logging.getLogger("gisp")

USER_ERROR_EXIT = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised in the main thread when a stop signal arrives. A BaseException, so no `except Exception` swallows it;
    Lightning tears down and re-raises it. Files are written atomically, so whatever it interrupts leaves the last
    complete step / level on disk; the trajectory lock is released when the process ends."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def stop_on_signals():
    """SIGTERM / SIGINT raise Interrupted while the block runs (main thread only; previous handlers restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_command() -> str:
    """The command line that continues this one (the same command: finished steps and levels are kept)."""
    module = (sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None)
              else sys.argv[0])
    args = list(sys.argv[1:])
    try:
        run_dir = hydra_output_dir()
        if not any(a.startswith("hydra.run.dir=") for a in args) and "-m" not in args and "--multirun" not in args:
            args.append(f"hydra.run.dir={run_dir}")
    except GispError:
        pass
    return shlex.join(["python", "-m", module, *args])


def user_errors(fn: Callable) -> Callable:
    """Decorate a command's body: a GispError (a user error whose message names the fix) exits with code 2; a stop
    signal exits with 128 + its number after saying how to resume."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with stop_on_signals():
                return fn(*args, **kwargs)
        except GispError as e:
            log.error("%s", e)
            sys.exit(USER_ERROR_EXIT)
        except Interrupted as e:
            log.error("stopped by %s: the trajectory keeps its last complete step and no results were marked "
                      "complete. Resume with:\n  %s", e, resume_command())
            sys.exit(128 + e.signum)

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


def hydra_sweep_name() -> str | None:
    """The sweep's name (its sweep dir's folder name) for a multirun job, None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


class RunRecord:
    """Hydra's own record of a job (.hydra/config.yaml, hydra.yaml, overrides.yaml and the log file) is written into
    the run dir before the command starts, so a refused command would change it. gisp.run switches both off
    (hydra.output_subdir=null, hydra/job_logging=gisp) and writes them here once the run dir is claimed and every
    check passed: `start(run_dir)`. Log lines from before are kept in memory and written first."""

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.file: logging.Handler | None = None
        self.buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self.buffer.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.buffer)

    def start(self, run_dir: Path) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from gisp.io import write_text_atomic

        folder = Path(run_dir) / ".hydra"
        write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(self.cfg))
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
            write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(
                list(hydra_cfg.overrides.task))))
        self.file = logging.FileHandler(Path(run_dir) / "run.log", encoding="utf-8")  # appends: a resume adds on
        self.file.setFormatter(logging.Formatter(self.FORMAT))
        self.file.setLevel(logging.INFO)
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(self.file)

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        self.buffer.buffer.clear()
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()
