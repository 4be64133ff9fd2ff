"""Typed settings of a run, checked once, before anything is loaded.

`load_settings(cfg)` is the one place that reads a `gisp.run` config (plain values: the command line turns Hydra's
config into them, gisp.cli.plain_config); everything below it (pipeline, Lightning pieces, pruning, data, evaluation)
takes these dataclasses. Every check that needs no model runs here, so a typo or an impossible combination fails in a
second with a message naming the setting and the fix, not after the model and the data were loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gisp.data.recipes import recipe_from_fields
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.suite import EvalTaskSpec, eval_task_specs
from gisp.models.spec import ModelSpec
from gisp.models.structure import GQA_MODES
from gisp.prune.methods import PrunerSpec, pruner_spec
from gisp.prune.objectives import Objective, get_objective
from gisp.prune.schedule import structural_ratios
from gisp.reconstruct.settings import ReconstructSettings, check_reconstruct, reconstruct_recipe, reconstruct_settings
from gisp.recovery.settings import RecoverSettings, recover_settings

log = logging.getLogger(__name__)

# Config sections (besides the pruner and pruning settings, taken typed) that define a trajectory: jobs that agree on
# them share one trajectory in the store, whatever their targets, evaluation, logger or devices.
DEFINITION_KEYS = ("model", "data", "objective", "schedule", "seed")
# Model fields that describe the model without defining its weights (the plan's offline shape).
NOT_IN_DEFINITION = ("shape",)
# Gradient-score settings that moved from `prune` to the pruner configs that use them.
MOVED_TO_PRUNER = ("normalization", "grad_dtype")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gisp"


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
    compact: bool = True  # score each step after the first on the level's compact model (the same masks)


HALF_DTYPES = ("bfloat16", "float16")  # model.dtype values where prune.compact is part of a trajectory's definition

# Pruning settings that change where and how a pass runs, never its result: not part of a trajectory's definition.
EXECUTION_ONLY = ("max_steps_per_run", "grad_offload", "checkpointing", "compact")


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
    cache_dir: Path = DEFAULT_CACHE_DIR
    store_dir: Path = Path("outputs/trajectories")  # the trajectory store (content-addressed)
    resume: bool = True
    progress: bool = True
    compact_eval: bool = True  # each level evaluated as its compact model (the masked dense model: False)
    trainer: dict = field(default_factory=dict)  # Lightning Trainer arguments
    loggers: dict = field(default_factory=dict)  # name -> instantiable logger node (plain values)
    resolved: dict = field(default_factory=dict)  # the resolved config: config.yaml, hyperparameters, fingerprint
    overrides: tuple[str, ...] | None = None  # the command-line overrides of this job
    recover: RecoverSettings = field(default_factory=RecoverSettings)  # after pruning, per target (gisp.recover)
    # how each level's remaining weights are updated where it becomes a model (gisp.reconstruct)
    reconstruct: ReconstructSettings = field(default_factory=ReconstructSettings)

    def definition(self, calibration_sha256: str, model_identity: dict | None = None) -> dict[str, Any]:
        """What defines this run's trajectory: the config sections of DEFINITION_KEYS, the effective pruner and
        pruning settings, the calibration set's content hash, and what identifies the model's weights where its
        settings do not (gisp.models.identity: a folder's content, a hub commit). How far one invocation goes is not
        part of it."""
        prune = {k: v for k, v in asdict(self.prune).items() if k not in EXECUTION_ONLY}
        if self.prune.compact and self.pruner.iterative and self.model.dtype in HALF_DTYPES:
            # in half precision a compact pass rounds its sums otherwise than the masked model's and the masks can
            # part at a near-tie: the two are different trajectories (in float32 they are one: equal masks)
            prune["compact"] = True
        pruner = {k: v for k, v in asdict(self.pruner).items() if k != "options" or v}  # no options: ids unchanged
        sections = {k: self.resolved.get(k) for k in DEFINITION_KEYS}
        sections["model"] = {k: v for k, v in (sections["model"] or {}).items() if k not in NOT_IN_DEFINITION}
        out = {**sections, "pruner": pruner, "prune": prune, "calibration_sha256": calibration_sha256}
        if model_identity is not None:  # absent for packaged and random models: their ids stay what they were
            out["model_identity"] = model_identity
        return out

    @property
    def recover_recipe(self):
        """The recovery's training data: its own `recover.data` node, or the calibration recipe."""
        return recipe_from_fields(self.recover.data) if self.recover.data is not None else self.calibration

    @property
    def reconstruct_recipe(self):
        """The reconstruction's data: its own `reconstruct.data` node, or the calibration recipe."""
        return reconstruct_recipe(self.reconstruct, self.calibration)

    def config_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False, allow_unicode=True)


def parse_sparsity(value: Any, key: str = "sparsity") -> tuple[float, ...]:
    """The levels: `sparsity=0.4` or `sparsity=[0.2,0.4]` -> sorted unique floats in [0, 1) (`key`: how the command
    names the setting, for the message)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise GispError(f"{key} is empty: give one level ({key}=0.4) or a list ({key}=[0.2,0.4])")
    try:
        levels = sorted({float(v) for v in values})
    except (TypeError, ValueError):
        raise GispError(f"{key} must be numbers in [0, 1), got {values}") from None
    bad = [t for t in levels if not 0.0 <= t < 1.0]
    if bad:
        raise GispError(f"{key} levels {bad} are outside [0, 1): parameter sparsity is a fraction, e.g. 0.4")
    return tuple(levels)


def levels_setting(cfg: dict[str, Any], old: str, key: str = "sparsity") -> tuple[float, ...] | None:
    """A command's levels: `sparsity` (the one name of every command), or the command's old name for it (`targets`,
    `target`), still accepted with a deprecation warning for one release. None when neither is set."""
    new, legacy = cfg.get(key), cfg.get(old)
    if legacy is not None:
        if new is not None:
            raise GispError(f"{old}= and {key}= both set: {old} is the old name of {key}; give {key}=... only")
        log.warning("%s= is deprecated: the levels are `%s` in every command now; use %s=%s", old, key, key,
                    legacy if not isinstance(legacy, list) else "[" + ",".join(str(v) for v in legacy) + "]")
        new = legacy
    return None if new is None else parse_sparsity(new, key)


def model_spec(node: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec(**dict(node))
    except TypeError as e:
        raise GispError(f"bad model config: {e}; see conf/model/*.yaml for the fields") from None


def cache_dir_setting(value: Any, run_config: dict | None = None) -> Path:
    """`cache_dir` (null: the run's, for commands on a run dir; else ~/.cache/gisp)."""
    if value is None and run_config is not None:
        value = run_config.get("cache_dir")
    return Path(value).expanduser() if value is not None else DEFAULT_CACHE_DIR


def _pruner(cfg: dict[str, Any]) -> PrunerSpec:
    """The pruner node, with the gradient settings that used to live under `prune` carried over (deprecated)."""
    fields = dict(cfg["pruner"])
    for key in MOVED_TO_PRUNER:
        old = (cfg.get("prune") or {}).get(key)
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


def check_bool(value: Any, name: str) -> bool:
    """A true / false setting, refused with its name when it is anything else (Hydra passes `maybe` as a string)."""
    if not isinstance(value, bool):
        raise GispError(f"{name} must be true or false, got {value!r}")
    return value


def _int_or_none(value: Any, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GispError(f"{name} must be an int >= {minimum} or null, got {value!r}")
    return value


def load_settings(cfg: dict[str, Any], overrides: list[str] | None = None, sweep: str | None = None,
                  here: bool = True) -> RunSettings:
    """Check a composed `gisp.run` config (plain values) and turn it into RunSettings (raises GispError naming the
    fix). `sweep`: the multirun this job belongs to (its wandb group). `here`: the run is for this machine (its
    devices are checked); gisp.plan plans for another one."""
    cfg = dict(cfg)
    for notice in cfg.pop("deprecated_names", None) or []:  # old config names that still work (conf/sweep)
        log.warning("deprecated: %s", notice)
    targets = parse_sparsity(cfg.get("sparsity"))
    pruner = _pruner(cfg)
    objective = get_objective(cfg["objective"]["name"])
    calibration = recipe_from_fields(cfg["data"])
    calibration.check(objective)
    evaluation = eval_task_specs(cfg.get("eval"))
    _check_split_seeds(calibration, evaluation)
    schedule = ScheduleSettings(**cfg["schedule"])
    schedule.ratios()  # checks steps and max_ratio
    prune_node = {k: v for k, v in (cfg.get("prune") or {}).items() if k not in MOVED_TO_PRUNER}
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
    check_bool(prune.checkpointing, "prune.checkpointing")
    check_bool(prune.compact, "prune.compact")
    trainer = dict(cfg.get("trainer") or {})
    if here:
        _check_devices(trainer)
    whole_model = [t.name for t in evaluation if t.kind != "perplexity"]
    if trainer.get("strategy") == "gisp_fsdp" and whole_model:
        raise GispError(f"trainer=fsdp shards the model over the processes: perplexity is evaluated over all of them, "
                        f"but the lm-eval / GSM8K tasks {whole_model} need the whole model in one process. Use a "
                        "perplexity eval (eval=wikitext2) or eval=none here, then `python -m gisp.evaluate "
                        "run_dir=...` on a node that holds the model (or on the exported model)")
    recover = recover_settings(cfg.get("recover"))
    if recover.enabled and _processes(trainer) > 1:
        raise GispError(f"recover={recover.method} with {_processes(trainer)} processes: gisp.run recovers in one "
                        "process; prune here with recover=none, then recover over the processes with its own "
                        f"command: python -m gisp.recover run_dir=RUN recover={recover.method} trainer=...")
    reconstruct = reconstruct_settings(cfg.get("reconstruct"))
    check_reconstruct(reconstruct, pruner.name, _processes(trainer))
    if pruner.ranking == "levelwise" and _processes(trainer) > 1:
        raise GispError(f"pruner={pruner.name} computes each level layer by layer in one process, not over "
                        f"{_processes(trainer)}: use one device (drop trainer=ddp / fsdp and trainer.devices)")
    if reconstruct.data is not None:
        recipe_from_fields(reconstruct.data)  # a bad data node is named now, not after loading
    model_node = dict(cfg["model"])
    if cfg.get("trust_remote_code"):  # the shared top-level switch (conf/common.yaml) turns the model's on too
        model_node["trust_remote_code"] = True
    model = model_spec(model_node)
    resolved = json_copy(cfg)
    # model=hf: config.yaml records what `source: path` and `dtype: auto` resolved to here, so that gisp.evaluate,
    # export, recover and a resume load the run's model the same way on another machine (a GPU run's bf16 on a CPU)
    resolved["model"] = {**resolved["model"], "source": model.source, "dtype": model.dtype}
    cache_dir = cache_dir_setting(cfg.get("cache_dir"))
    resolved["cache_dir"] = str(cache_dir)
    loggers = _with_wandb_group(dict(cfg.get("logger") or {}), sweep, resolved, targets)
    return RunSettings(
        model=model, calibration=calibration, objective=objective, pruner=pruner,
        schedule=schedule, prune=prune, evaluation=evaluation, targets=targets, seed=int(cfg.get("seed", 0)),
        split_seed=int(cfg.get("split_seed", 1234)), threads=_int_or_none(cfg.get("threads"), "threads", 1),
        data_dir=resolve_data_dir(cfg.get("data_dir")), cache_dir=cache_dir,
        store_dir=Path(cfg.get("store_dir") or "outputs/trajectories").expanduser().absolute(),
        resume=bool(cfg.get("resume", True)), progress=bool(cfg.get("progress", True)),
        compact_eval=check_bool(cfg.get("compact_eval", True), "compact_eval"), trainer=trainer,
        loggers=loggers, resolved=resolved,
        overrides=tuple(overrides) if overrides is not None else None, recover=recover, reconstruct=reconstruct,
    )


def json_copy(value: Any) -> Any:
    """A deep copy of plain config values (dicts, lists, scalars)."""
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_copy(v) for v in value]
    return value


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
