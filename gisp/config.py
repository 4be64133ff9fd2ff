"""Hydra stops here: the composed config becomes typed settings, checked once, before anything is loaded.

`load_settings(cfg)` is the one place that reads a `gisp.run` config; everything below it (pipeline, Lightning
pieces, pruning, data, evaluation) takes these dataclasses. Every check that needs no model runs here, so a typo
or an impossible combination fails in a second with a message naming the setting and the fix, not after the model
and the data were loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from gisp.data.recipes import recipe_from_fields
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.suite import EvalTaskSpec, eval_task_spec
from gisp.models.loading import ModelSpec, model_name_from_path
from gisp.models.structure import GQA_MODES
from gisp.prune.methods import PrunerSpec, pruner_spec
from gisp.prune.objectives import Objective, get_objective
from gisp.prune.schedule import structural_ratios
from gisp.recover.settings import RecoverSettings, recover_settings

log = logging.getLogger(__name__)

# conf/model/hf.yaml: the model's name (and so its run dir's) from model.path
OmegaConf.register_new_resolver("gisp_model_name", model_name_from_path, replace=True)

# Config sections (besides the pruner and pruning settings, taken typed) that define a trajectory: jobs that agree on
# them share one trajectory in the store, whatever their targets, evaluation, logger or devices.
DEFINITION_KEYS = ("model", "data", "objective", "schedule", "seed")
# Gradient-score settings that moved from `prune` to the pruner configs that use them.
MOVED_TO_PRUNER = ("normalization", "grad_dtype")


@dataclass(frozen=True)
class ScheduleSettings:
    name: str = "linear"
    steps: int = 10
    max_ratio: float = 0.7
    rate: float = 3.0

    def ratios(self) -> list[float]:
        return structural_ratios(self.name, self.steps, self.max_ratio, self.rate)


@dataclass(frozen=True)
class PruneSettings:
    protect_first_fraction: float = 0.1
    protect_last: int = 1
    protect_layers: tuple[int, ...] | None = None
    max_steps_per_run: int | None = None
    gqa_mode: str = "query"  # query: a head is one query head (the reference); group: one KV head + its query heads
    grad_offload: str | None = None  # cpu: accumulate the mean gradient in float32 host memory (exact)
    checkpointing: bool = False  # recompute the decoder layers' activations in backward (exact)


# Pruning settings that change where and how a pass runs, never its result: not part of a trajectory's definition.
EXECUTION_ONLY = ("max_steps_per_run", "grad_offload", "checkpointing")


@dataclass(frozen=True)
class RunSettings:
    """Everything `gisp.run` needs, typed and checked."""

    model: ModelSpec
    calibration: Any  # a recipe of gisp.data.recipes (TextRecipe, GSM8KRecipe, MultipleChoiceRecipe, ...)
    objective: Objective
    pruner: PrunerSpec
    schedule: ScheduleSettings
    prune: PruneSettings
    evaluation: tuple[EvalTaskSpec, ...]
    targets: tuple[float, ...]
    seed: int = 0
    split_seed: int = 1234
    threads: int | None = None
    data_dir: Path | None = None
    cache_dir: Path = Path.home() / ".cache" / "gisp"
    store_dir: Path = Path("outputs/trajectories")  # the trajectory store (content-addressed)
    resume: bool = True
    progress: bool = True
    trainer: dict = field(default_factory=dict)  # Lightning Trainer arguments
    loggers: dict = field(default_factory=dict)  # name -> instantiable logger node (plain values)
    resolved: dict = field(default_factory=dict)  # the resolved config: config.yaml, hyperparameters, fingerprint
    overrides: tuple[str, ...] | None = None  # the command-line overrides of this job
    recover: RecoverSettings = field(default_factory=RecoverSettings)  # after pruning, per target (gisp.recover)

    def definition(self, calibration_sha256: str) -> dict[str, Any]:
        """What defines this run's trajectory: the config sections of DEFINITION_KEYS, the effective pruner and
        pruning settings, and the calibration set's content hash (how far one invocation goes is not part of it)."""
        prune = {k: v for k, v in asdict(self.prune).items() if k not in EXECUTION_ONLY}
        pruner = {k: v for k, v in asdict(self.pruner).items() if k != "options" or v}  # no options: ids unchanged
        sections = {k: self.resolved.get(k) for k in DEFINITION_KEYS}
        return {**sections, "pruner": pruner, "prune": prune, "calibration_sha256": calibration_sha256}

    @property
    def recover_recipe(self):
        """The recovery's training data: its own `recover.data` node, or the calibration recipe."""
        return recipe_from_fields(self.recover.data) if self.recover.data is not None else self.calibration

    def config_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.resolved))


def plain(node: Any) -> Any:
    """A config node as plain Python values (resolved interpolations); a mandatory value left unset (`???`) is a
    GispError naming the key."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e)
        raise GispError(f"{key} must be set (the config leaves it `???`): pass {key}=... on the command line") from None


def parse_targets(sparsity: Any) -> tuple[float, ...]:
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
    return tuple(targets)


def model_spec(node: Any) -> ModelSpec:
    try:
        return ModelSpec(**plain(node))
    except TypeError as e:
        raise GispError(f"bad model config: {e}; see conf/model/*.yaml for the fields") from None


def eval_tasks(node: Any) -> tuple[EvalTaskSpec, ...]:
    """The `eval` group (`tasks: {name: {kind: ..., ...}}`) as checked task specs."""
    tasks = (plain(node) or {}).get("tasks") or {}
    return tuple(eval_task_spec(name, fields) for name, fields in tasks.items())


def _pruner(cfg: DictConfig) -> PrunerSpec:
    """The pruner node, with the gradient settings that used to live under `prune` carried over (deprecated)."""
    fields = dict(plain(cfg.pruner))
    for key in MOVED_TO_PRUNER:
        old = cfg.get("prune", {}).get(key)
        if old is not None:
            log.warning("prune.%s is deprecated: it moved to the pruner config; use pruner.%s=%s", key, key, old)
            fields[key] = old
    return pruner_spec(fields)


def _check_split_seeds(calibration: Any, evaluation: tuple[EvalTaskSpec, ...]) -> None:
    """Offline multiple-choice data with one labelled split are halved by a seeded permutation: calibration and
    evaluation must use the same seed, or the halves could overlap (calibrating on what is evaluated)."""
    if calibration.kind != "multiple_choice":
        return
    for spec in evaluation:
        seed = spec.fields.get("split_seed")
        if spec.kind == "multiple_choice" and seed != calibration.split_seed:
            raise GispError(
                f"data.split_seed={calibration.split_seed} differs from eval.tasks.{spec.name}.split_seed={seed}: "
                "the calibration and evaluation halves of the local data would overlap; set split_seed=... once "
                "(both default to it)"
            )


def _check_devices(trainer: dict) -> None:
    """Several devices with `accelerator: auto` mean GPUs: on a machine without one, Lightning would start that many
    CPU processes instead (each holding the whole model): refused, naming the setting that does it on purpose."""
    devices = trainer.get("devices")
    if trainer.get("accelerator", "auto") != "auto" or not isinstance(devices, int) or devices <= 1:
        return
    import torch

    if not torch.cuda.is_available():
        raise GispError(f"trainer.devices={devices} asks for {devices} GPUs, but no GPU is visible here: run it on a "
                        f"GPU node, or set trainer.accelerator=cpu to run {devices} CPU processes on purpose")


def _processes(trainer: dict) -> int:
    """Processes a Trainer of these arguments starts (several devices under a multi-process strategy)."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if str(trainer.get("strategy", "auto")) in ("auto", "single_device") and devices in (1, "1"):
        return nodes
    if isinstance(devices, int):
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    import torch

    return (torch.cuda.device_count() or 1) * nodes if devices == "auto" else nodes


def _int_or_none(value: Any, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GispError(f"{name} must be an int >= {minimum} or null, got {value!r}")
    return value


def load_settings(cfg: DictConfig, overrides: list[str] | None = None, sweep: str | None = None,
                  here: bool = True) -> RunSettings:
    """Check a composed `gisp.run` config and turn it into RunSettings (raises GispError naming the fix). `sweep`:
    the multirun this job belongs to (its wandb group). `here`: the run is for this machine (its devices are
    checked); gisp.plan plans for another one."""
    targets = parse_targets(cfg.sparsity)
    pruner = _pruner(cfg)
    objective = get_objective(cfg.objective.name)
    calibration = recipe_from_fields(plain(cfg.data))
    calibration.check(objective)
    evaluation = eval_tasks(cfg.eval)
    _check_split_seeds(calibration, evaluation)
    schedule = ScheduleSettings(**plain(cfg.schedule))
    schedule.ratios()  # checks steps and max_ratio
    prune_node = {k: v for k, v in plain(cfg.prune).items() if k not in MOVED_TO_PRUNER}
    explicit = prune_node.get("protect_layers")
    try:
        prune = PruneSettings(**{**prune_node, "protect_layers": None if explicit is None else tuple(explicit)})
    except TypeError as e:
        raise GispError(f"prune: {e}; its fields are {list(PruneSettings.__dataclass_fields__)}") from None
    _int_or_none(prune.max_steps_per_run, "prune.max_steps_per_run", 1)
    if prune.grad_offload not in (None, "cpu"):
        raise GispError(f"prune.grad_offload must be null or cpu, got {prune.grad_offload!r}")
    if prune.gqa_mode not in GQA_MODES:
        raise GispError(f"prune.gqa_mode={prune.gqa_mode!r} is not one of {GQA_MODES}: query prunes query heads (the "
                        "reference), group prunes whole KV groups")
    if not isinstance(prune.checkpointing, bool):
        raise GispError(f"prune.checkpointing must be true or false, got {prune.checkpointing!r}")
    trainer = plain(cfg.trainer) or {}
    if here:
        _check_devices(trainer)
    whole_model = [t.name for t in evaluation if t.kind != "perplexity"]
    if trainer.get("strategy") == "gisp_fsdp" and whole_model:
        raise GispError(f"trainer=fsdp shards the model over the processes: perplexity is evaluated over all of them, "
                        f"but the lm-eval / GSM8K tasks {whole_model} need the whole model in one process. Use a "
                        "perplexity eval (eval=wikitext2) or eval=none here, then `python -m gisp.evaluate "
                        "run_dir=...` on a node that holds the model (or on the exported model)")
    recover = recover_settings(plain(cfg.get("recover")))
    if recover.enabled and _processes(trainer) > 1:
        raise GispError(f"recover={recover.method} with {_processes(trainer)} processes: gisp.run recovers in one "
                        "process; prune here with recover=none, then recover over the processes with its own "
                        f"command: python -m gisp.recover run_dir=RUN recover={recover.method} trainer=...")
    model = model_spec(cfg.model)
    resolved = plain(cfg)
    # model=hf: config.yaml records what `source: path` and `dtype: auto` resolved to here, so that gisp.evaluate,
    # export, recover and a resume load the run's model the same way on another machine (a GPU run's bf16 on a CPU)
    resolved["model"] = {**resolved["model"], "source": model.source, "dtype": model.dtype}
    loggers = _with_wandb_group(plain(cfg.get("logger")) or {}, sweep, resolved, targets)
    return RunSettings(
        model=model, calibration=calibration, objective=objective, pruner=pruner,
        schedule=schedule, prune=prune, evaluation=evaluation, targets=targets, seed=int(cfg.seed),
        split_seed=int(cfg.get("split_seed", 1234)), threads=_int_or_none(cfg.get("threads"), "threads", 1),
        data_dir=resolve_data_dir(cfg.get("data_dir")), cache_dir=Path(cfg.cache_dir).expanduser(),
        store_dir=Path(cfg.get("store_dir") or "outputs/trajectories").expanduser().absolute(),
        resume=bool(cfg.resume), progress=bool(cfg.progress), trainer=trainer,
        loggers=loggers, resolved=resolved,
        overrides=tuple(overrides) if overrides is not None else None, recover=recover,
    )


def _with_wandb_group(loggers: dict, sweep: str | None, resolved: dict, targets: tuple[float, ...]) -> dict:
    """Every job of a sweep logs into one wandb group named after the sweep, tagged with what a dashboard pivots on
    (model, pruner, objective, calibration data, targets); the full config goes in as hyperparameters."""
    out = {}
    for name, node in loggers.items():
        node = dict(node)
        if str(node.get("_target_", "")).endswith("WandbLogger"):
            data = resolved.get("data") or {}
            tags = [f"model:{resolved['model']['name']}", f"pruner:{resolved['pruner']['name']}",
                    f"objective:{resolved['objective']['name']}",
                    f"data:{(data.get('text') or {}).get('name') or data.get('kind', '?')}",
                    *(f"target:{t:g}" for t in targets)]
            node.setdefault("tags", tags)
            if sweep:
                node.setdefault("group", sweep)
                node.setdefault("job_type", "sweep-job")
        out[name] = node
    return out


def build_loggers(loggers: dict, save_dir: Path, hyperparameters: dict) -> list:
    """Lightning loggers of the `logger` group (one instantiate site), each given the run's hyperparameters."""
    from hydra.utils import instantiate

    out = []
    for name, node in (loggers or {}).items():
        logger = instantiate(node, save_dir=str(save_dir))
        logger.log_hyperparams(hyperparameters)
        out.append(logger)
        log.info("logging to %s (%s)", name, type(logger).__name__)
    return out


def finalize_loggers(loggers: list, status: str) -> None:
    """End every logger's run: Lightning's `finalize`, and wandb's `finish` (otherwise wandb ends its run at exit and
    its lines would follow the results table a command prints last)."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
