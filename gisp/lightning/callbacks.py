"""The Lightning callback that runs GISP's iterative schedule: rank globally, mask, snapshot, evaluate targets.

After each scoring pass (one `trainer.validate`) it plans the next step from the module's scores, applies the
masks to the live model (reversibly), snapshots the step, and, when the step lands on a sparsity target,
evaluates the model there. Steps form nested subnetworks: a structure pruned once stays pruned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L
import torch

from gisp.errors import GispError
from gisp.prune.masks import MaskApplier, Masks, OutputBias
from gisp.prune.ranking import Plan, plan_step
from gisp.prune.schedule import ratio_at, structures_to_prune
from gisp.prune.trajectory import Trajectory, target_key

log = logging.getLogger(__name__)


class IterativePruning(L.Callback):
    def __init__(
        self,
        applier: MaskApplier,
        trajectory: Trajectory,
        ratios: list[float],
        targets: list[float],
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ):
        self.applier = applier
        self.structure = applier.structure
        self.trajectory = trajectory
        self.ratios = ratios
        self.targets = sorted(targets)
        self.evaluate = evaluate
        self._step_started = 0.0
        self.restore()

    def restore(self) -> None:
        """Continue from the trajectory's last snapshot (a fresh trajectory starts dense)."""
        last = self.trajectory.last_step
        if last:
            self.applier.set(self.trajectory.masks_at(last), self.trajectory.bias_at(last))
        else:
            self.applier.set(Masks.dense(self.structure))

    @property
    def step(self) -> int:
        return self.trajectory.last_step

    @property
    def pending_targets(self) -> list[float]:
        done = self.trajectory.manifest["targets"]
        return [t for t in self.targets if target_key(t) not in done]

    @property
    def finished(self) -> bool:
        return not self.pending_targets

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_started = time.perf_counter()
        # Inside Lightning's lifecycle the model is on its device and the ranks are launched.
        self.evaluate_missing(trainer, pl_module.model)

    def evaluate_missing(self, trainer: L.Trainer, model: torch.nn.Module) -> None:
        """Evaluate the dense model and every landed target that has no metrics yet (fresh run, or a resumed run
        interrupted during an evaluation), then put the last step's masks back."""
        if self.evaluate is None:
            return
        manifest = self.trajectory.manifest
        current, current_bias = self.applier.masks, self.applier.bias
        if manifest["dense"]["metrics"] is None:
            self.applier.set(Masks.dense(self.structure))
            manifest["dense"]["metrics"] = self._evaluate(model, "dense")
            self._write(trainer)
            self._log(trainer, {f"eval/{k}": v for k, v in manifest["dense"]["metrics"].items()}, 0)
        for key, step in manifest["targets"].items():
            record = self.trajectory.step_record(step)
            if record.get("metrics") is None:
                self.applier.set(self.trajectory.masks_at(step), self.trajectory.bias_at(step))
                record["metrics"] = self._evaluate(model, key)
                self._write(trainer)
                self._log(trainer, {f"eval/{k}": v for k, v in record["metrics"].items()}, step)
        self.applier.set(current, current_bias)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.scores is None:
            raise GispError("the scoring pass produced no scores (empty calibration loader?)")
        k = self.step + 1
        ratio = ratio_at(self.ratios, k)
        if k == len(self.ratios) + 1:
            log.warning("the schedule ended before target %s; continuing at its last step size",
                        self.pending_targets[0])
        heads, channels = pl_module.scores
        plan = plan_step(heads, channels, self.applier.masks, self.structure,
                         structures_to_prune(ratio, self.structure.n_structures), cap=self.pending_targets[0])
        self.applier.set(plan.masks)
        record = self._record(trainer, k, plan, ratio, pl_module.calib_loss)
        log.info("step %d: sparsity %.4f, %d heads and %d channels kept, calibration loss %.4f", k, plan.sparsity,
                 record["heads_kept"], record["channels_kept"], pl_module.calib_loss)
        if plan.landed_target is not None and self.evaluate is not None:
            metrics = self._evaluate(pl_module.model, f"{plan.landed_target:g}")
            self.trajectory.step_record(k)["metrics"] = metrics
            self._write(trainer)
            self._log(trainer, {f"eval/{m}": v for m, v in metrics.items()}, k)

    def _record(self, trainer: L.Trainer, k: int, plan: Plan, scheduled_ratio: float | None,
                calib_loss: float | None, bias: OutputBias | None = None) -> dict:
        """Snapshot step k (rank 0 writes; other ranks keep the manifest in memory so their step counter advances)."""
        record = {
            "structural_ratio": plan.masks.n_pruned / self.structure.n_structures,
            "scheduled_ratio": scheduled_ratio,
            "sparsity": plan.sparsity,
            "heads_kept": int(plan.masks.heads.sum()),
            "channels_kept": int(plan.masks.channels.sum()),
            "calib_loss": calib_loss,
            "target": plan.landed_target,
            "seconds": round(time.perf_counter() - self._step_started, 3),
        }
        if plan.landed_target is not None:
            self.trajectory.manifest["targets"][target_key(plan.landed_target)] = k  # written with the step
        if trainer.is_global_zero:
            self.trajectory.add_step(k, plan.masks, record, bias)
        else:
            self.trajectory.steps.append({"step": k, **record})
        self._log(trainer, {"prune/sparsity": plan.sparsity, "prune/structural_ratio": record["structural_ratio"],
                            "prune/heads_kept": record["heads_kept"], "prune/channels_kept": record["channels_kept"]}
                  | ({} if calib_loss is None else {"prune/calib_loss": calib_loss}), k)
        return record

    def _evaluate(self, model: torch.nn.Module, label: str) -> dict[str, float]:
        started = time.perf_counter()
        metrics = self.evaluate(model)
        log.info("evaluation at %s: %s (%.1f s)", label, metrics, time.perf_counter() - started)
        return metrics

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            self.trajectory.write()

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class OneShotPruning(IterativePruning):
    """Baselines (and GISP one-shot): score ONCE on the dense model, then cut every target from the same scores.

    `plan(heads, channels, current, target)` is the method's ranking rule (global or local); each target becomes one
    trajectory step, so runs of every method share the trajectory/results format. The levels are nested (already
    pruned structures go first). `bias(masks, pl_module)` gives FLAP's output bias of a level from the scoring
    module's statistics. Evaluation of the targets is left to `evaluate_missing`, which the pipeline calls once all
    levels are written.
    """

    def __init__(self, applier: MaskApplier, trajectory: Trajectory, targets: list[float],
                 plan: Callable[[torch.Tensor, torch.Tensor, Masks, float], Plan],
                 evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 bias: Callable[[Masks, L.LightningModule], OutputBias] | None = None):
        super().__init__(applier, trajectory, ratios=[], targets=targets, evaluate=evaluate)
        self.plan = plan
        self.bias = bias

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.scores is None:
            raise GispError("the scoring pass produced no scores (empty calibration loader?)")
        bias = None if self.bias is None else (lambda masks: self.bias(masks, pl_module))
        self.prune_all(trainer, *pl_module.scores, bias=bias, calib_loss=pl_module.calib_loss)

    def prune_all(self, trainer: L.Trainer, heads: torch.Tensor, channels: torch.Tensor,
                  bias: Callable[[Masks], OutputBias] | None = None, calib_loss: float | None = None) -> None:
        if not self._step_started:
            self._step_started = time.perf_counter()
        current = self.applier.masks
        for target in self.pending_targets:
            k = self.step + 1
            plan = self.plan(heads, channels, current, target)
            level_bias = bias(plan.masks) if bias is not None else None
            self._record(trainer, k, plan, None, calib_loss, level_bias)
            log.info("target %g (step %d): sparsity %.4f, %d heads and %d channels kept", target, k, plan.sparsity,
                     int(plan.masks.heads.sum()), int(plan.masks.channels.sum()))
            current = plan.masks
            self.applier.set(plan.masks, level_bias)
