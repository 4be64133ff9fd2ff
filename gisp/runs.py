"""A run dir as an object: the one way to reopen a run (config, trajectory, results, model, levels).

    run = RunDir("outputs/smollm2_135m/2026-11-22_18-00-00")
    live = run.load_model()                 # model, tokenizer, structure, mask applier (dense)
    level = run.level(target=0.37)          # any sparsity the trajectory reaches (exact read-out), or step=7
    live.set_level(level)

`gisp.evaluate`, `gisp.export`, the experiments scripts and the notebook reopen runs through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from gisp.compact.slicing import compact_model
from gisp.data.recipes import recipe_from_fields
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.io import FolderLock, read_json
from gisp.models.families import family_spec
from gisp.models.identity import model_identity
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.spec import ModelSpec
from gisp.models.structure import LayerModules, ModelStructure, describe, layer_modules
from gisp.prune.levels import Level, read_level
from gisp.prune.masks import MaskApplier, Masks, OutputBias, n_pruned
from gisp.prune.methods import PrunerSpec, pruner_spec
from gisp.prune.trajectory import Trajectory, target_key
from gisp.reconstruct.levels import Reconstructor
from gisp.reconstruct.settings import ReconstructSettings, check_reconstruct, reconstruct_recipe, reconstruct_settings
from gisp.results import Results


@dataclass
class LiveModel:
    """A run's dense model in memory with its structure and a mask applier (dense until a level is set)."""

    model: Any
    tokenizer: Any
    structure: ModelStructure
    layers: list[LayerModules]
    applier: MaskApplier
    recovered: str | None = None  # the nested recovery merged into `model` (gisp.recovery.artefacts), if any
    dense_weights: Callable[[], dict] | None = None  # the dense weights again, from their source (RunDir.load_model)

    def set_level(self, level: Level | None) -> None:
        """Apply a level's masks (None: the dense model)."""
        if level is None:
            self.applier.set(Masks.dense(self.structure))
        else:
            self.applier.set(level.masks, level.bias)

    def reload_dense(self) -> None:
        """The dense weights back into `model` (a nested recovery merged into it changed them)."""
        if self.dense_weights is None:
            raise GispError("this live model cannot reload its dense weights: load the run's model again")
        self.model.load_state_dict(self.dense_weights(), strict=False)
        self.recovered = None

    @contextmanager
    def at(self, level: Level | None, compact: bool = False) -> Iterator[Any]:
        """The level as a model while the block runs: the dense model under its masks (None: dense), or with `compact`
        (and always for a reconstructed level) its physically smaller model built from the dense weights
        (gisp.compact.slicing: what the export writes), dropped afterwards. A model sharded over processes
        (trainer=fsdp: DTensor weights) is evaluated under its masks instead: slicing needs whole tensors."""
        if compact and _sharded(self.model):
            compact = False
        if level is not None and (compact or level.weights is not None):
            self.set_level(None)
            model = compact_model(self.model, level.masks, self.structure, level.bias, level.weights)
            try:
                yield model
            finally:
                del model
            return
        self.set_level(level)
        try:
            yield self.model
        finally:
            self.set_level(None)


def _sharded(model: Any) -> bool:
    """Whether `model`'s weights are sharded over processes (FSDP2 DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GispError(f"{self.path} is not a directory: give the run dir of a gisp.run (it holds config.yaml "
                            "and trajectory/)")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the run wrote (plain values)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise GispError(f"no {path}: is {self.path} a gisp run dir?")
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}

    def model_spec(self, trust_remote_code: bool = False) -> ModelSpec:
        """The run's model; `trust_remote_code` is never taken from the run dir (a received run dir could switch it
        on): only the caller's own setting counts."""
        fields = dict(self.config.get("model") or {})
        fields["trust_remote_code"] = bool(trust_remote_code)
        try:
            return ModelSpec(**fields)
        except TypeError as e:
            raise GispError(f"{self.path / 'config.yaml'}: bad model section ({e})") from None

    @cached_property
    def trajectory(self) -> Trajectory:
        """The run's trajectory in the store (named by trajectory.json, written when the run started), verified:
        intact files, nested steps, records that match their masks."""
        pointer = self.path / "trajectory.json"
        if not pointer.is_file():
            if (self.path / "trajectory" / "manifest.json").is_file():
                raise GispError(f"{self.path} was made by gisp 0.1 (trajectory inside the run dir, steps capped at "
                                "the targets): run the same command with this gisp to compute it in the store")
            raise GispError(f"no {pointer}: is {self.path} a gisp run dir (did gisp.run get past its checks)?")
        named = read_json(pointer)
        if not isinstance(named, dict) or not isinstance(named.get("path"), str):
            raise GispError(f"{pointer} does not name a trajectory (id and path): the file is damaged; run the run's "
                            "gisp.run command again to rewrite it")
        traj = Trajectory.load(named["path"])
        if traj.id != named.get("id"):
            raise GispError(f"{pointer} names trajectory {named.get('id')}, but {traj.path} holds {traj.id}: run the "
                            "run's gisp.run command again to rewrite it")
        traj.verify()
        return traj

    @property
    def structure(self) -> ModelStructure:
        """The model's structure as the trajectory recorded it (no model needed)."""
        return self.trajectory.structure

    @cached_property
    def pruner(self) -> PrunerSpec:
        return pruner_spec(self.trajectory.manifest["definition"]["pruner"])

    @property
    def protected(self) -> tuple[int, ...]:
        return self.structure.protected

    def results(self) -> dict[str, Any] | None:
        """results.json as read (None when the run has not written it); commands that change it go through
        `finished_results()` (gisp.results.Results, its one writer)."""
        return read_json(self.results_path) if self.results_path.is_file() else None

    def finished_results(self) -> Results:
        """results.json of a finished run, to add to (a command on a run dir needs its levels): refused, naming how
        to finish the run, when it did not finish."""
        return Results.load(self.path).require_finished()

    def load_model(self, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> LiveModel:
        """The dense model of the run, its structure (with the run's protected layers) and a mask applier."""
        cache = Path(cache_dir or self.config.get("cache_dir") or "~/.cache/gisp").expanduser()
        self.check_weights(trust_remote_code)
        model, tokenizer = load_model_and_tokenizer(self.model_spec(trust_remote_code), cache)
        gqa_mode = (self.config.get("prune") or {}).get("gqa_mode") or "query"
        structure = describe(model, protected=self.protected, gqa_mode=gqa_mode)
        if structure != self.structure:
            raise GispError(f"the model {self.model_spec().name} loaded for {self.path} has another structure than its "
                            f"trajectory recorded ({structure} vs {self.structure}): its weights or config changed "
                            "since the run; use the model the run pruned")
        layers = layer_modules(model, family_spec(model.config.model_type))
        spec = self.model_spec(trust_remote_code)
        return LiveModel(model, tokenizer, structure, layers, MaskApplier(layers, structure),
                         dense_weights=lambda: load_model_and_tokenizer(spec, cache)[0].state_dict())

    def reconstruct_settings(self, node: dict | None = None) -> ReconstructSettings:
        """A command's reconstruction (`node`, a conf/reconstruct node), or the run's own (None; none for runs of gisp
        < 0.3), checked against the run's pruner (no model needed)."""
        settings = reconstruct_settings(node if node is not None else self.config.get("reconstruct"))
        check_reconstruct(settings, self.pruner.name)
        return settings

    def reconstructor(self, live: LiveModel, settings: ReconstructSettings, data_dir: Path | None = None
                      ) -> Reconstructor:
        """The run's levels reconstructed as `settings` say, from its data (or `settings.data`; `data_dir`: None for
        the run's), stored beside its trajectory in the store."""
        data_dir = data_dir if data_dir is not None else resolve_data_dir(self.config.get("data_dir"))
        recipe = reconstruct_recipe(settings, recipe_from_fields(self.config.get("data") or {}))
        traj = self.trajectory
        return Reconstructor(settings, recipe, live.tokenizer, data_dir, traj.directory.parent, traj.id, live.model,
                             live.layers, live.structure)

    def check_weights(self, trust_remote_code: bool = False) -> None:
        """Refuse, before loading, weights that are not the ones the trajectory was computed on: the identity it
        recorded (a folder's content fingerprint, a hub commit; gisp.models.identity) against the model's now."""
        recorded = self.trajectory.manifest["definition"].get("model_identity")
        if recorded is None:  # a packaged or random model (pinned by its settings), or a run of gisp < 0.2
            return
        spec = self.model_spec(trust_remote_code)
        now = model_identity(spec)
        if now is not None and now != recorded:
            what = spec.path or spec.name
            old, new = (recorded.get("digest") or recorded.get("commit"), now.get("digest") or now.get("commit"))
            raise GispError(f"the weights of {what} changed since {self.path} was pruned ({recorded['kind']} "
                            f"{str(old)[:12]} then, {str(new)[:12]} now): its levels belong to the old weights. "
                            "Restore them, or prune the new weights in a new run dir (gisp.run with hydra.run.dir=NEW)")

    def check_reaches(self, levels: list[float] | tuple[float, ...]) -> None:
        """Refuse levels beyond what the trajectory reaches (before anything is loaded), naming how to extend it."""
        reach = self.trajectory.reached
        if self.pruner.ranking == "levelwise":  # levels computed one by one (SlimGPT): only those exist
            missing = [t for t in levels if t > 0 and self.trajectory.level_step(t) is None]
            if missing:
                done = self.trajectory.separate_levels()
                raise GispError(f"sparsity {missing} was not computed for this run ({self.pruner.name}'s levels are "
                                f"not nested: each target is its own computation; it has {done}): compute them with "
                                f"the run's gisp.run command and sparsity=[...,{max(missing):g}] "
                                f"(hydra.run.dir={self.path})")
            return
        beyond = [t for t in levels if t > reach]
        if beyond:
            raise GispError(f"sparsity {beyond} is not a level of this trajectory: it reaches {reach:.4f} "
                            f"({self.trajectory.directory}); extend it with gisp.run (sparsity=[...,{max(beyond):g}])")

    def saved_level(self, target: float) -> Path | None:
        """levels/level_<t>.safetensors when this level was evaluated or exported before."""
        saved = self.path / "levels" / f"level_{target_key(target)}.safetensors"
        return saved if saved.is_file() else None

    def level(self, target: float | None = None, step: int | None = None, live: LiveModel | None = None,
              masks_only: bool = False) -> Level:
        """A level of the run: `target=t` (an exact read-out of the trajectory; a saved levels/ file must hold the
        same masks) or `step=N` (the masks after step N of an iterative trajectory). A FLAP level's output bias
        comes from the model (`live`) or, without it, from its saved file (`masks_only`: no bias)."""
        if (target is None) == (step is None):
            raise GispError("give exactly one of target=0.4 (a sparsity level) or step=N")
        traj = self.trajectory
        if step is not None:
            masks = traj.masks_at(step)
            level = float(traj.step_record(step)["sparsity"])
            return Level(level, masks, level, int(step), None,
                         structural_ratio=n_pruned(masks, self.structure) / self.structure.n_structures)
        with_bias = live is not None
        level = read_level(traj, self.pruner, self.structure, live.layers if live else None, target, with_bias)
        saved = self.saved_level(target)
        if saved is not None and not Masks.load(saved).equal(level.masks):
            raise GispError(f"{saved} does not hold the masks the trajectory gives at {target_key(target)}: it was "
                            f"edited or damaged; delete it (gisp writes it again from the trajectory)")
        if self.pruner.bias_compensation and not with_bias and not masks_only:
            bias_file = self.path / "levels" / f"level_{target_key(target)}.bias.safetensors"
            if saved is None or not bias_file.is_file():
                raise GispError(f"level {target_key(target)} of {self.path} has no saved output bias yet: load the "
                                "model (run.level(target, live=run.load_model())) to compute it")
            level.bias = OutputBias.load(bias_file)
        return level


@contextmanager
def claim(run_dir: str | Path, command: str = "gisp") -> Iterator[Path]:
    """Hold a run dir for one command: an exclusive lock on the folder itself, taken before anything is written (a
    second command on the same run dir is refused at once, naming who holds it; deleting files cannot let it in),
    released on exit, on signals and when the process dies. When the block fails before writing anything, the run
    dir is left as it was found: a run dir this claim created is removed again."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    created_dir = not run_dir.exists()
    lock = FolderLock(run_dir, what=f"run dir {run_dir}")
    try:
        taken = lock.acquire(blocking=False)
    except OSError as e:
        raise GispError(f"cannot use {run_dir} as a run dir ({e.strerror}): choose a run dir in a folder you can "
                        "write (hydra.run.dir=...)") from None
    if not taken:
        h = lock.holder()
        raise GispError(f"{run_dir} is in use by another gisp command (pid {h.get('pid', '?')} on {h.get('host', '?')} "
                        f"since {h.get('since', '?')}): wait for it to finish, or choose another run dir "
                        "(hydra.run.dir=...)")
    try:
        yield run_dir
    except BaseException:
        lock.release()
        if created_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    finally:
        lock.release()


# The folders gisp writes inside a run dir: a symbolic link among them must not lead writes out of the run dir.
WRITTEN_FOLDERS = ("levels", "eval_data", ".hydra", "csv", "evaluate", "recovered")


def check_run_dir(run_dir: Path) -> None:
    """A run dir is a folder (or does not exist yet) and the folders gisp writes inside it stay inside it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GispError(f"{run_dir} is a file, not a run dir: choose a folder (hydra.run.dir=... or run_dir=...)")
    ancestor = run_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GispError(f"{run_dir} cannot be made: {ancestor} is a file, not a folder; choose another run dir")
    for name in WRITTEN_FOLDERS:
        inner = run_dir / name
        if inner.is_symlink() and run_dir.resolve() not in inner.resolve().parents:
            raise GispError(f"{inner} is a link to {inner.resolve()}, outside the run dir: gisp never writes through "
                            f"a link out of a run dir; remove the link (rm {inner}) or use another run dir")


def save_level(run_dir: Path, key: str, level: Level) -> str:
    """Write a level's keep-masks (and output bias) under run_dir/levels/; returns the path relative to run_dir."""
    name = f"levels/level_{key}.safetensors"
    (run_dir / "levels").mkdir(exist_ok=True)
    level.masks.save(run_dir / name)
    if level.bias is not None:
        level.bias.save(run_dir / f"levels/level_{key}.bias.safetensors")
    return name
