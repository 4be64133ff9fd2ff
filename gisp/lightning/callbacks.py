"""The Lightning callbacks that turn each scoring pass into a trajectory step.

`IterativePruning` (GISP): after each pass (one `trainer.validate`) it ranks every head and channel globally, prunes
up to the schedule's ratio for that step (never cut short at a target: the trajectory does not depend on the
targets), applies the masks to the live model (reversibly) and snapshots the step with the ORDER in which it pruned
its structures, so any sparsity can be read out later (gisp.prune.levels). Steps are nested: a structure pruned once
stays pruned. `OneShotPruning` (baselines, one-shot GISP): stores the scores of its single pass; levels are cut from
them by the method's ranking rule.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from gisp.errors import GispError
from gisp.prune.masks import MaskApplier, Masks, masks_from_flat, masks_record, n_pruned
from gisp.prune.ranking import global_order
from gisp.prune.schedule import ratio_at, structures_to_prune
from gisp.prune.trajectory import Trajectory

log = logging.getLogger(__name__)


class _TrajectoryCallback(L.Callback):
    def __init__(self, applier: MaskApplier, trajectory: Trajectory, stop_at: float):
        self.applier = applier
        self.structure = applier.structure
        self.trajectory = trajectory
        self.stop_at = stop_at  # the highest sparsity the run needs: the trajectory goes at least that far
        self.computed: list[int] = []  # steps this job computed (the others were reused)
        self._step_started = 0.0

    @property
    def step(self) -> int:
        return self.trajectory.last_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_started = time.perf_counter()

    def _snapshot(self, trainer: L.Trainer, k: int, record: dict, **files) -> None:
        """Rank 0 writes the step; the other ranks keep the record in memory so their step counter advances."""
        record = {**record, "seconds": round(time.perf_counter() - self._step_started, 3)}
        if trainer.is_global_zero:
            self.trajectory.add_step(k, record, **files)
        else:
            self.trajectory.steps.append({"step": k, **record})
        self.computed.append(k)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class IterativePruning(_TrajectoryCallback):
    def __init__(self, applier: MaskApplier, trajectory: Trajectory, ratios: list[float], stop_at: float):
        super().__init__(applier, trajectory, stop_at)
        self.ratios = ratios
        last = trajectory.last_step  # continue from the last snapshot (a fresh trajectory starts dense)
        self.applier.set(trajectory.masks_at(last) if last else Masks.dense(self.structure))

    @property
    def finished(self) -> bool:
        if self.trajectory.reached >= self.stop_at:
            return True
        # every prunable structure gone: nothing further to read out
        return bool(self.trajectory.steps) and self.trajectory.steps[-1].get("exhausted", False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.scores is None:
            raise GispError("the scoring pass produced no scores (empty calibration loader?)")
        k = self.step + 1
        ratio = ratio_at(self.ratios, k)
        if k == len(self.ratios) + 1:
            log.warning("the schedule ended below sparsity %s; continuing at its last step size", self.stop_at)
        heads, channels = pl_module.scores
        current = self.applier.masks
        order = global_order(heads, channels, current)  # already pruned first, then ascending score, ties by index
        prunable = int(torch.isfinite(torch.cat([heads.flatten(), channels.flatten()])).sum())
        n_current = n_pruned(current, self.structure)  # head units (query heads or KV groups) + channels
        n = min(max(structures_to_prune(ratio, self.structure.n_structures), n_current), prunable)
        pruned = torch.zeros(order.numel(), dtype=torch.bool)
        pruned[order[:n]] = True
        masks = masks_from_flat(pruned, self.structure)
        self.applier.set(masks)
        record = {**masks_record(masks, self.structure), "scheduled_ratio": ratio,
                  "calib_loss": pl_module.calib_loss, "exhausted": n >= prunable, **_throughput(pl_module),
                  # scored on the previous level's compact model (prune.compact)
                  "compact": getattr(pl_module, "level", None) is not None}
        level = record["sparsity"]
        self._snapshot(trainer, k, record, masks=masks, order=order[n_current:n].clone())
        log.info("step %d: sparsity %.4f, %d heads and %d channels kept, calibration loss %.4f", k, level,
                 record["heads_kept"], record["channels_kept"], pl_module.calib_loss)
        self._log(trainer, {"prune/sparsity": level, "prune/structural_ratio": record["structural_ratio"],
                            "prune/heads_kept": record["heads_kept"], "prune/channels_kept": record["channels_kept"],
                            "prune/calib_loss": pl_module.calib_loss,
                            **{f"prune/{m}": v for m, v in _throughput(pl_module).items() if v is not None}}, k)


class OneShotPruning(_TrajectoryCallback):
    """Baselines (and GISP one-shot): score ONCE on the dense model and store the scores (plus FLAP's input means);
    every level is cut from them by the method's ranking rule, so levels are nested and any target is a read-out."""

    def __init__(self, applier: MaskApplier, trajectory: Trajectory, stop_at: float, keep_means: bool = False):
        super().__init__(applier, trajectory, stop_at)
        self.keep_means = keep_means
        self.applier.set(Masks.dense(self.structure))

    @property
    def finished(self) -> bool:
        return bool(self.trajectory.steps)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.scores is None:
            raise GispError("the scoring pass produced no scores (empty calibration loader?)")
        means = input_means(pl_module.moments, self.structure) if self.keep_means else {}
        extra = {**(getattr(pl_module, "extra", None) or {}), **means}  # per-layer statistics of the score too
        self.store_scores(trainer, *pl_module.scores, calib_loss=pl_module.calib_loss, extra=extra,
                          throughput=_throughput(pl_module))

    def store_scores(self, trainer: L.Trainer, heads: torch.Tensor, channels: torch.Tensor,
                     calib_loss: float | None = None, extra: dict[str, torch.Tensor] | None = None,
                     throughput: dict[str, float | None] | None = None) -> None:
        if not self._step_started:
            self._step_started = time.perf_counter()
        record = {"kind": "scores", "sparsity": self.structure.max_sparsity, "calib_loss": calib_loss,
                  **(throughput or {})}
        if throughput:
            self._log(trainer, {f"prune/{m}": v for m, v in throughput.items() if v is not None}, 1)
        tensors = {"heads": heads.float().contiguous(), "channels": channels.float().contiguous(), **(extra or {})}
        self._snapshot(trainer, 1, record, tensors=tensors)
        log.info("scores of every head and channel stored (one %s pass)", "calibration" if calib_loss else "scoring")


def _throughput(pl_module: L.LightningModule) -> dict[str, float | None]:
    """tokens/s and MFU of the scoring pass (GradientPass.throughput), for the step record and the loggers."""
    t = getattr(pl_module, "throughput", None) or {}
    return {"tokens_per_s": t.get("tokens_per_s"), "mfu": t.get("mfu")} if t else {}


def input_means(moments: dict, structure) -> dict[str, torch.Tensor]:
    """FLAP's compensation needs the mean input of o_proj / down_proj per layer: (L, H*d_h) and (L, F), float64."""
    attn = torch.zeros(structure.n_layers, structure.n_heads * structure.head_dim, dtype=torch.float64)
    mlp = torch.zeros(structure.n_layers, structure.ffn, dtype=torch.float64)
    for i in structure.unprotected:
        attn[i] = moments[(i, "attn")].mean.cpu()
        mlp[i] = moments[(i, "mlp")].mean.cpu()
    return {"attn_mean": attn, "mlp_mean": mlp}
