"""What every command line shares (the command layer: gisp.run, evaluate, export, recover, plan): Hydra's config
turned into plain values, a GispError as one clear message and exit code 2 (no traceback), SIGTERM and SIGINT
(scancel, SLURM time limits, preemption, Ctrl-C) stopping the command at once with a non-zero exit code and the
command that resumes it, and the checks Hydra must not get ahead of.

Hydra and OmegaConf are used here and in the command modules only; the library below takes plain values and typed
settings.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from gisp.errors import GispError
from gisp.models.spec import model_name_from_path

log = logging.getLogger("gisp")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# conf/model/hf.yaml: the model's name (and so its run dir's) from model.path
OmegaConf.register_new_resolver("gisp_model_name", model_name_from_path, replace=True)
# conf/hydra/launcher/gpu_node.yaml: job n of a sweep sees GPU n modulo the node's GPUs.
OmegaConf.register_new_resolver("gisp_gpu_slot", lambda job, gpus: str(int(job) % max(int(gpus), 1)), replace=True)
# Default run / sweep dirs: the second + a short random suffix fixed for this process (two commands started in the
# same second get different dirs). DDP children get the parent's run dir from Lightning (hydra.run.dir=...).
_UNIQUE = secrets.token_hex(3)
OmegaConf.register_new_resolver("gisp_unique", lambda: _UNIQUE, replace=True)


def plain_config(cfg: DictConfig | dict) -> dict:
    """A command's config as plain Python values (interpolations resolved); a mandatory value left unset (`???`) is a
    GispError naming the key."""
    if not OmegaConf.is_config(cfg):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e)
        raise GispError(f"{key} must be set (the config leaves it `???`): pass {key}=... on the command line") from None


def compose_config(name: str, overrides: list[str]) -> dict:
    """The plain config `python -m gisp.<command> OVERRIDES` would see, composed with Hydra's compose API (`name`: the
    command's primary config, e.g. "config" for gisp.run)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:  # an unknown key, a missing group: the user's to fix
            raise GispError(f"{str(e).strip().splitlines()[0]}: check the overrides (python -m gisp.<command> "
                            "--help lists the groups)") from None
        return plain_config(cfg)

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


def same_command(add_run_dir: bool = False) -> str:
    """This command line again (`add_run_dir`: with its Hydra run dir, so that it continues in the same folder)."""
    module = (sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None)
              else sys.argv[0])
    args = list(sys.argv[1:])
    if add_run_dir:
        try:
            run_dir = hydra_output_dir()
            if not any(a.startswith("hydra.run.dir=") for a in args) and "-m" not in args and "--multirun" not in args:
                args.append(f"hydra.run.dir={run_dir}")
        except GispError:
            pass
    return shlex.join(["python", "-m", module, *args])


def resume_command() -> str:
    """The command line that continues this gisp.run (the same command: finished steps and levels are kept)."""
    return same_command(add_run_dir=True)


def run_stop_message(signal_name: str) -> str:
    """What a stopped gisp.run left: results.json may already be complete when the signal lands after it."""
    try:
        results = hydra_output_dir() / "results.json"
        complete = results.is_file() and bool(json.loads(results.read_text()).get("complete"))
    except (GispError, OSError, ValueError):
        complete = False
    if complete:
        return (f"stopped by {signal_name} after {results} was complete (only the figure or the loggers' last "
                "records may be missing); running the same command again redoes those")
    return (f"stopped by {signal_name}: the trajectory keeps its last complete step and results.json is not marked "
            f"complete. Resume with:\n  {resume_command()}")


def _distributed_failure(e: BaseException) -> bool:
    """A collective failed because another process of the run is gone (killed, crashed, out of memory)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(s in text for s in (
            "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Broken pipe")))


def user_errors(fn: Callable | None = None, *, stop_message: Callable[[str], str] = run_stop_message,
                resumable: bool = True) -> Callable:
    """Decorate a command's body: a GispError (a user error whose message names the fix) exits with code 2 and one
    message; a stop signal exits with 128 + its number after `stop_message(signal name)` says what was kept and
    how to go on. A collective that fails because another process of a multi-process run died is one message with
    the command that continues (exit code 2), not gloo's traceback."""
    if fn is None:
        return functools.partial(user_errors, stop_message=stop_message, resumable=resumable)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _STARTED
        _STARTED = True
        try:
            with stop_on_signals():
                return fn(*args, **kwargs)
        except GispError as e:
            log.error("%s", e)
            return _failed(e, USER_ERROR_EXIT)
        except Interrupted as e:
            log.error("%s", stop_message(str(e)))
            sys.exit(128 + e.signum)
        except Exception as e:
            if not _distributed_failure(e):
                if _sweep_job() is not None:  # one job of a sweep: the others go on, the summary names this one
                    log.exception("this job failed")
                    return _failed(e, 1)
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.error("another process of this multi-process run stopped (%s): the trajectory keeps its last "
                      "complete step. Check the other processes' logs, then %s:\n  %s", first[:300],
                      "resume with" if resumable else "run the same command again",
                      resume_command() if resumable else same_command())
            return _failed(e, USER_ERROR_EXIT)

    return wrapper


# Set once a command's body (or a multirun) starts: a Hydra exit before it is Hydra refusing the command line.
_STARTED = False


def mark_started() -> None:
    """The command line composed and the command started (a multirun whose jobs run in other processes)."""
    global _STARTED
    _STARTED = True
FAILED_JOBS = ".failed_jobs"  # in a sweep dir: one record per failed job (gisp.sweeps names them in summary.md)


def _sweep_job() -> tuple[Path, int] | None:
    """(sweep dir, job number) when this command runs as one job of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)


def _failed(error: BaseException, code: int) -> None:
    """A single command exits with `code`. A job of a sweep does not: a failed job must not stop the others (Hydra's
    launchers end the whole multirun on an exit, and the joblib launcher takes the job beside it down with it), so
    it records its failure in the sweep dir and returns; the sweep summary names it and the multirun exits 1."""
    job = _sweep_job()
    if job is None:
        sys.exit(code)
    from hydra.core.hydra_config import HydraConfig

    from gisp.io import write_json_atomic

    sweep_dir, number = job
    output = Path(HydraConfig.get().runtime.output_dir)
    write_json_atomic(sweep_dir / FAILED_JOBS / f"{number}.json", {
        "job": number, "dir": str(output), "overrides": list(HydraConfig.get().overrides.task),
        "error": str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__,
        "kind": "refused" if isinstance(error, GispError) else type(error).__name__, "exit_code": code,
        "log": str(output / "run.log") if (output / "run.log").is_file() else None})


def run_command(main: Callable[[], None]) -> None:
    """How every command module starts (`if __name__ == "__main__": run_command(main)`):

    - a path typed with `~` (`model.path=~/models/x.gguf`) is what users type, but Hydra's override grammar has no
      `~` inside a value: such a value is passed to Hydra quoted, as `model.path="~/models/x.gguf"`;
    - Hydra refuses a command line it cannot compose (an unknown key, a missing config group) with its message and
      exit code 1 before the command starts: that is a user error, exit code 2 as for every other refusal."""
    sys.argv = [sys.argv[0], *(_quoted_home(a) for a in sys.argv[1:])]
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _STARTED:
            sys.exit(USER_ERROR_EXIT)
        raise


def _quoted_home(arg: str) -> str:
    key, eq, value = arg.partition("=")
    if not eq or not value.startswith("~") or key.startswith("-") or any(c in value for c in "'\"[]{},"):
        return arg
    return f'{key}="{value}"'



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


def evaluation_overrides() -> list[str] | None:
    """This command's evaluation settings (eval=..., eval.tasks...., split_seed, data_dir), to repeat them in a
    command a refusal suggests; None outside a Hydra app."""
    from gisp.results import evaluation_settings

    overrides = hydra_overrides()
    return None if overrides is None else evaluation_settings(overrides)


def reconstruct_overrides() -> list[str]:
    """This command's reconstruction settings (reconstruct=..., reconstruct.damp=...), to repeat them in a suggested
    gisp.run command."""
    return [o for o in hydra_overrides() or [] if o.lstrip("+~").startswith(("reconstruct", "data@reconstruct"))]


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


class Preflight(Callback):
    """Checks that must run before Hydra does anything, as a Hydra callback that ends the command with one line naming
    the problem and the fix (exit code 2) before anything is written:

    - Hydra makes the command's output folder (hydra.run.dir; hydra.sweep.dir of a multirun) first, and fails there
      with a traceback when it cannot: a file in the way, a folder under a file, a read-only file system.
    - `run_dir_key`: the config key of the run dir a command works on (gisp.evaluate writes its log folder inside
      it): it must be a gisp run dir whose folders stay inside it.
    - A multirun with one job per GPU (hydra/launcher=gpu_node sets each job's CUDA_VISIBLE_DEVICES) on a machine
      without GPUs would start every job on the CPU at once."""

    def __init__(self, run_dir_key: str | None = None) -> None:
        self.run_dir_key = run_dir_key

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")
        if "CUDA_VISIBLE_DEVICES" in (config.hydra.job.get("env_set") or {}):
            import torch

            if torch.cuda.device_count() == 0:
                log.error("hydra/launcher=gpu_node runs one job per GPU, but no GPU is visible here: run the sweep on "
                          "a GPU node, or use hydra/launcher=parallel (GISP_JOBS jobs at a time on the CPU) or the "
                          "basic launcher (leave hydra/launcher out)")
                sys.exit(USER_ERROR_EXIT)

    def _check(self, config, key: str) -> None:
        from omegaconf import OmegaConf

        from gisp.io import check_writable
        from gisp.runs import check_run_dir

        try:
            if self.run_dir_key is not None:
                run_dir = OmegaConf.select(config, self.run_dir_key, throw_on_missing=False)
                if run_dir in (None, "???"):
                    raise GispError(f"{self.run_dir_key} must be set: {self.run_dir_key}=DIR, a run dir of gisp.run")
                if not (Path(run_dir) / "trajectory.json").is_file():
                    raise GispError(f"{run_dir} is not a gisp run dir (no trajectory.json): check {self.run_dir_key}="
                                    "... (a folder that gisp.run wrote, holding config.yaml, trajectory.json and "
                                    "results.json)")
                check_run_dir(Path(run_dir))
            folder = Path(str(OmegaConf.select(config, key)))
            check_run_dir(folder)
            check_writable(folder, "output folder", f"choose another one ({key}=...)")
        except GispError as e:
            log.error("%s", e)
            sys.exit(USER_ERROR_EXIT)
