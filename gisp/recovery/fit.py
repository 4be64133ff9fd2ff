"""The recovery stage: train the students of the asked levels with Lightning's `Trainer.fit`, store what they
learned, evaluate the recovered models. Shared by `python -m gisp.recover` and `gisp.run recover=...`.

lora / distill: one fit per level, on the level's compact model (built in process), `recover.tokens` each.
nested: one fit for every level at once, on the dense model under the levels' masks (a level drawn per micro-batch),
`recover.tokens` in all, distilled from the dense model; every level is then read out of the same recovered weights.
A level already recovered with the same definition is skipped; a killed fit resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gisp.errors import GispError
from gisp.lightning.progress import ScoringProgressBar
from gisp.models.families import family_spec
from gisp.models.structure import layer_modules
from gisp.prune.levels import Level
from gisp.prune.masks import MaskApplier
from gisp.prune.trajectory import target_key
from gisp.recovery.artefacts import NESTED, Recovery, stored_problem
from gisp.recovery.data import TrainingSet, training_set
from gisp.recovery.settings import RecoverSettings, check_positions
from gisp.recovery.students import all_trainable, base_model, compact_student, merged, with_lora
from gisp.recovery.training import AtomicCheckpoint, NestedLevels, RecoveryModule, TokenCurve, TrainingData, schedule

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What the stage gives back per level: the recovered model to evaluate (or None on processes > 0) and its
    record (tokens, seconds, tokens/s, validation loss, curve, where the weights are)."""

    key: str
    record: dict[str, Any]
    model: torch.nn.Module | None = None


def precision_for(setting: str, trainer: dict) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, full precision on the CPU."""
    if setting != "auto":
        return setting
    on_gpu = str(trainer.get("accelerator", "auto")) != "cpu" and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def data_record(data: TrainingSet) -> dict[str, Any]:
    """The part of the training data's record that defines a recovery (not the recipe's long provenance)."""
    keep = ("name", "kind", "files", "hub", "sha256", "held_out", "content_sha256", "train_sequences", "train_tokens",
            "val_sequences", "val_tokens", "seed", "seq_len", "epochs", "scored")
    return {k: data.record[k] for k in keep if k in data.record}


def recover_levels(run_dir: Path, s: RecoverSettings, live, levels: list[Level], *, recipe, data_dir: Path | None,
                   trainer: dict, loggers: Callable[[Path, dict], list], progress: bool, context: dict[str, Any],
                   evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> list[Recovered]:
    """Recover `levels` of the run in `run_dir` as `s` says (`live`: the run's dense model, gisp.runs.LiveModel).
    `loggers(folder, hyperparameters)` builds the loggers of one fit; `evaluate(model)` the metrics for the token
    curve (recover.eval_at); `context`: what else defines the recovery (trajectory id, model name)."""
    if s.method == "nested" and any(level.weights is not None for level in levels):
        raise GispError("recover=nested trains one set of weights for every level, but reconstructed levels each carry "
                        "their own weights (gisp.reconstruct): recover them with recover=lora or distill, or run the "
                        "nested recovery on a run dir with reconstruct=none")
    if s.method == "nested" and any(level.bias is not None for level in levels):
        raise GispError("recover=nested trains one set of weights for every level, but FLAP's levels carry an output "
                        "bias computed from the dense weights: recover FLAP levels with recover=lora or distill")
    check_positions(s, getattr(live.model.config, "max_position_embeddings", None), live.model.config.model_type)
    data = training_set(recipe, live.tokenizer, data_dir, s.tokens, s.seq_len, s.val_tokens, s.seed)
    keys = [target_key(level.target) for level in levels]
    definition = {**s.definition(data_record(data)), **context,
                  "levels": [level.target for level in levels] if s.method == "nested" else None}
    recovery = Recovery(run_dir, s.key)
    record = recovery.open(definition)
    if rank_zero():
        recovery.write(record)
    done = record.setdefault("levels", {})
    out = []
    if s.method == "nested":
        _forget_if_damaged(recovery, done, NESTED)
        if (done.get(NESTED) or {}).get("status") != "complete":
            done[NESTED] = _fit_nested(recovery, s, live, levels, keys, data, trainer, loggers, progress, evaluate)
            if rank_zero():
                recovery.write(record)
        for key in keys:
            out.append(Recovered(key, done[NESTED]))
        return out
    for level, key in zip(levels, keys):
        _forget_if_damaged(recovery, done, key)
        entry = done.get(key) or {}
        if entry.get("status") == "complete":
            log.info("level %s: already recovered by %s (%s); reused", key, s.key, entry.get("artefact"))
            out.append(Recovered(key, entry))
            continue
        entry, model = _fit_level(recovery, s, live, level, key, data, trainer, loggers, progress, evaluate)
        done[key] = entry
        if rank_zero():
            recovery.write(record)
        out.append(Recovered(key, entry, model))
    return out


def _forget_if_damaged(recovery: Recovery, done: dict, key: str) -> None:
    """A level recorded complete whose stored weights are gone or were changed is trained again (and says why),
    rather than reported as recovered with nothing behind it."""
    entry = done.get(key) or {}
    if entry.get("status") != "complete":
        return
    problem = stored_problem(recovery.run_dir, entry)
    if problem is not None:
        log.warning("level %s of the recovery %s is recorded as complete, but %s: training it again", key,
                    recovery.name, problem)
        del done[key]


def checked_checkpoint(path: Path, key: str | None) -> int | None:
    """The optimizer steps a fit's `last.ckpt` holds (None: no checkpoint). One that cannot be read (a disk that
    filled up, a file edited or cut short) is refused, naming it and the fix, instead of a Lightning traceback on
    every rerun. Read with weights_only=True: only tensors and plain values, never pickled code."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["global_step"])
    except Exception as e:  # noqa: BLE001 (zip, pickle and key errors of a damaged file)
        raise GispError(f"the checkpoint of level {key or NESTED}'s fit, {path}, cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}): it is damaged. Delete it (rm {path}) to "
                        "train that level again from its start; the levels already recovered are kept") from None


def rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _fit_level(recovery: Recovery, s: RecoverSettings, live, level: Level, key: str, data: TrainingSet,
               trainer: dict, loggers, progress: bool, evaluate) -> tuple[dict, torch.nn.Module | None]:
    adapter = s.adapter == "lora"
    student = compact_student(live.model, level.masks, live.structure, level.bias, own_weights=not adapter,
                              weights=level.weights)
    torch.manual_seed(s.seed)  # the adapter's initial weights: the same in every invocation (and on resume)
    student = with_lora(student, s.lora) if adapter else all_trainable(student)
    teacher = live.model if s.distills else None
    if teacher is not None:
        teacher.requires_grad_(False)
    curve = TokenCurve(s.eval_at, lambda: {key: evaluate(student)}) if s.eval_at and evaluate else None
    log.info("recovering level %s with %s (%s, %d training tokens)", key, s.method,
             "LoRA" if adapter else "every parameter", data.train_tokens)
    entry = _fit(recovery, key, student, teacher, None, None, s, data, trainer, loggers, progress, curve)
    artefact, sha = recovery.save(key, student, adapter) if rank_zero() else (None, None)
    model = merged(student) if rank_zero() else None
    return {**entry, "artefact": artefact, "artefact_sha256": sha}, model


def _fit_nested(recovery: Recovery, s: RecoverSettings, live, levels: list[Level], keys: list[str],
                data: TrainingSet, trainer: dict, loggers, progress: bool, evaluate) -> dict:
    """One fit of the dense model under every level's masks (the mask applier on the student's own projection
    modules: a LoRA on o_proj / down_proj sees the masked input too, so a pruned structure contributes nothing)."""
    adapter = s.adapter == "lora"
    live.set_level(None)  # the run's own mask hooks stay dense: the nested levels are applied by the fit's applier
    torch.manual_seed(s.seed)
    if adapter:
        student = with_lora(live.model, s.lora)
        teacher, view = student, student.disable_adapter  # the dense model: the adapter off, no masks
    else:
        teacher, view = copy.deepcopy(live.model).requires_grad_(False).eval(), None
        student = all_trainable(live.model)
    layers = layer_modules(base_model(student), family_spec(live.model.config.model_type))
    applier = MaskApplier(layers, live.structure)
    nested = NestedLevels(keys, [level.masks for level in levels], applier, s.seed)

    def curve_points() -> dict[str, dict[str, float]]:
        out = {}
        for i, key in enumerate(keys):
            nested.use(i)
            out[key] = evaluate(student)
        return out

    curve = TokenCurve(s.eval_at, curve_points) if s.eval_at and evaluate else None
    log.info("nested recovery of levels %s (%s, %d training tokens in all)", keys,
             "one LoRA on the dense model" if adapter else "every dense weight", data.train_tokens)
    try:
        entry = _fit(recovery, None, student, teacher, nested, view, s, data, trainer, loggers, progress, curve)
    finally:
        applier.remove()
    artefact, sha = recovery.save(None, student, adapter) if rank_zero() else (None, None)
    live.model = merged(student)
    live.recovered = recovery.name
    return {**entry, "artefact": artefact, "artefact_sha256": sha}


def _fit(recovery: Recovery, key: str | None, student, teacher, nested: NestedLevels | None, view, s: RecoverSettings,
         data: TrainingSet, trainer_args: dict, loggers, progress: bool, curve: TokenCurve | None) -> dict:
    part = recovery.part(key)
    checkpoints = recovery.checkpoints(key)
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume = checkpoints / "last.ckpt"
    callbacks = [AtomicCheckpoint(resume), *([curve] if curve else []),
                 *([ScoringProgressBar("Validation")] if progress else [])]
    fit_trainer = L.Trainer(**trainer_args, precision=precision_for(s.precision, trainer_args),
                            accumulate_grad_batches=s.accumulate, gradient_clip_val=s.grad_clip,
                            reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, use_distributed_sampler=False,
                            enable_model_summary=False, enable_progress_bar=progress, log_every_n_steps=1,
                            logger=loggers(part, {"recovery": recovery.name, "level": key or NESTED}),
                            callbacks=callbacks, default_root_dir=str(part), max_steps=-1,
                            enable_checkpointing=False)
    steps, per_epoch = schedule(s, len(data.train), fit_trainer.world_size)
    fit_trainer.fit_loop.epoch_loop.max_steps = steps
    # the fit ends at max_steps, never by an epoch count: a fit resumed from an end-of-epoch checkpoint counts that
    # epoch twice in Lightning (2.6), which would end it one epoch early
    fit_trainer.fit_loop.max_epochs = -1
    module = RecoveryModule(student, s, steps, teacher, nested, view)
    restored = checked_checkpoint(resume, key)
    if restored is not None:
        log.info("resuming the recovery of %s from its checkpoint after %d of %d optimizer steps (%s)", key or NESTED,
                 restored, steps, resume)
    started = time.perf_counter()
    fit_trainer.fit(module, datamodule=TrainingData(data, s, steps, per_epoch),
                    ckpt_path=str(resume) if restored is not None else None, weights_only=True)
    seconds = module.seconds_before + time.perf_counter() - started
    metrics = {k: float(v) for k, v in fit_trainer.callback_metrics.items() if k.startswith("recover/val_loss")}
    student.eval()
    return {"status": "complete", "tokens": module.tokens_seen, "steps": steps, "seconds": round(seconds, 1),
            "tokens_per_s": round(module.tokens_seen / max(seconds, 1e-9), 1),
            "val_loss": {k.removeprefix("recover/"): v for k, v in metrics.items()},
            "curve": [p for p in (curve.points if curve else []) if "metrics" in p]}
