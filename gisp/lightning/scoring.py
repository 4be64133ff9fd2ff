"""The scoring passes as LightningModules: one validation epoch = one pass over the calibration set.

`PASSES` maps a score's signal to the module that computes it: `gradients` (GISPModule, a backward pass),
`activations` (ActivationModule, a forward pass with input hooks); `weights` scores need no pass.

Lightning runs the validation loop (devices, progress bar, DDP ranks); each validation step computes the
objective with gradients enabled and runs backward, accumulating the signed gradient of the scored weights only.
At the end of the epoch the summed gradients are all-reduced across processes, so every process computes the same
scores and the same masks, and turned into per-head and per-channel scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.activations import InputMoments, InputRecorder
from gisp.prune.importance import get_score, scored_weights, structure_scores
from gisp.prune.objectives import batch_losses

log = logging.getLogger(__name__)


class GISPModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerModules],
        structure: ModelStructure,
        n_samples: int,
        normalization: str = "reference",
        grad_dtype: torch.dtype | None = None,
        score_fn: Callable | None = None,
    ):
        super().__init__()
        self.model = model
        self.layers = layers
        self.structure = structure
        self.n_samples = n_samples  # global calibration set size: every sequence must be seen once per pass
        self.normalization = normalization
        # grad_of -> (heads (L, H), channels (L, F)); GISP's normalized taylor score unless a registry score is given
        self.score_fn = score_fn or (lambda grad_of: structure_scores(layers, structure, normalization, grad_of))
        self.scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calib_loss: float | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._seen = 0
        self._scored = [p for i in structure.unprotected for p in scored_weights(layers[i], structure)]
        # Only the scored weights need gradients: embeddings, lm_head, norms, protected layers and (with GQA) K/V
        # stay frozen, and backward stops below the first unprotected layer.
        self.model.requires_grad_(False)
        for p in self._scored:
            p.requires_grad_(True)
        # Optional accumulation of the mean gradient in another dtype (float32 for a bf16 model): each batch's
        # gradient is added into a buffer as soon as autograd produced it, and `.grad` is freed.
        self.grad_dtype = grad_dtype
        self._accumulated: dict[int, torch.Tensor] = {}
        if grad_dtype is not None:
            for p in self._scored:
                if p.dtype != grad_dtype:
                    p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, p: torch.Tensor) -> None:
        g = p.grad.to(self.grad_dtype)
        buf = self._accumulated.get(id(p))
        self._accumulated[id(p)] = g if buf is None else buf.add_(g)
        p.grad = None

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The accumulated mean gradient of a scored weight (its own `.grad` unless accumulated elsewhere)."""
        return self._accumulated.get(id(p), p.grad)

    def _set_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if id(p) in self._accumulated or g.dtype != p.dtype:
            self._accumulated[id(p)] = g
        else:
            p.grad = g

    def on_validation_epoch_start(self) -> None:
        for p in self._scored:
            p.grad = None
        self._accumulated.clear()
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._seen = 0
        self.scores = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.enable_grad():
            losses = batch_losses(self.model, batch)  # (B,) per-sequence mean loss over the scored tokens
            # Signed per-sequence weights (1/N for a mean; +1/n+ and -1/n- for the margin objective): one backward
            # of the weighted sum accumulates the objective's gradient over the whole calibration set.
            weighted = losses * batch["weight"].to(losses.dtype)  # (B,)
            weighted.sum().backward()
        self._loss_sum += weighted.detach().double().sum().cpu()
        self._seen += losses.numel()

    def on_validation_epoch_end(self) -> None:
        seen = self._seen
        loss_sum = self._loss_sum
        if self.trainer.world_size > 1:  # every process scored its shard: sum gradients, losses and counts
            for p in self._scored:
                g = self.grad_of(p)
                g = torch.zeros_like(p, dtype=self.grad_dtype or p.dtype) if g is None else g
                self._set_grad(p, self.trainer.strategy.reduce(g, reduce_op="sum"))
            seen = int(self.trainer.strategy.reduce(torch.tensor(seen, device=self.device), reduce_op="sum"))
            loss_sum = self.trainer.strategy.reduce(loss_sum.to(self.device), reduce_op="sum").cpu()
        if seen != self.n_samples:
            raise GispError(f"the scoring pass saw {seen} calibration sequences, expected {self.n_samples}: "
                            "do not limit validation batches (trainer.limit_val_batches) during pruning")
        self._check_finite()
        self.calib_loss = float(loss_sum)  # the objective's value: sum_i w_i L_i
        self.scores = self.score_fn(self.grad_of)
        for p in self._scored:  # free the gradient memory before evaluation
            p.grad = None
        self._accumulated.clear()

    def _check_finite(self) -> None:
        for i in self.structure.unprotected:
            for p in scored_weights(self.layers[i], self.structure):
                g = self.grad_of(p)
                if g is None or not bool(torch.isfinite(g).all()):
                    dtype = p.dtype
                    raise GispError(
                        f"non-finite gradient in layer {i} ({tuple(p.shape)} {dtype}) during scoring: "
                        + ("likely a half-precision overflow; use model.dtype=float32 or bfloat16 "
                           if dtype in (torch.float16, torch.bfloat16) else "check the model and the data; ")
                        + "no masks were written for this step"
                    )


class ActivationModule(L.LightningModule):
    """One validation epoch = one forward-only pass whose o_proj / down_proj input moments are recorded (wanda_sp,
    FLAP); `score_fn(moments)` turns them into per-head and per-channel scores at the end.

    The hooks belong to `self.recorder`, a context manager the caller wraps around `trainer.validate`, so they are
    removed whatever happens inside the pass."""

    def __init__(self, model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                 score_fn):
        super().__init__()
        self.model = model
        self.structure = structure
        self.n_samples = n_samples
        self.score_fn = score_fn
        self.recorder = InputRecorder(layers, structure)
        self.model.requires_grad_(False)
        self.scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.moments: dict[tuple[int, str], InputMoments] | None = None
        self.calib_loss: float | None = None  # no objective in an activation pass
        self._seen = 0

    def on_validation_epoch_start(self) -> None:
        if not self.recorder.active:
            raise GispError("the activation pass runs inside `with module.recorder:` (its hooks record the inputs)")
        self.recorder.moments.clear()
        self._seen = 0
        self.scores = self.moments = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        mask = batch.get("attention_mask")
        self.recorder.token_mask = None if mask is None else mask.bool()
        with torch.no_grad():
            self.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
        self._seen += batch["input_ids"].shape[0]

    def on_validation_epoch_end(self) -> None:
        seen, moments = self._seen, dict(self.recorder.moments)
        if self.trainer.world_size > 1:  # every process saw its shard: sum the moments
            reduce = self.trainer.strategy.reduce
            moments = {k: InputMoments(reduce(m.count, reduce_op="sum"), reduce(m.total, reduce_op="sum"),
                                       reduce(m.total_sq, reduce_op="sum")) for k, m in moments.items()}
            seen = int(reduce(torch.tensor(seen, device=self.device), reduce_op="sum"))
        if seen != self.n_samples:
            raise GispError(f"the activation pass saw {seen} calibration sequences, expected {self.n_samples}: "
                            "do not limit validation batches (trainer.limit_val_batches) during pruning")
        self.moments = moments
        self.scores = self.score_fn(moments)


def gradient_pass(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                  pruner) -> GISPModule:
    score = get_score(pruner.score)
    return GISPModule(model, layers, structure, n_samples, pruner.normalization, pruner.grad_torch_dtype,
                      score_fn=lambda grad_of: score.scores(layers, structure, grad_of, pruner))


def activation_pass(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                    pruner) -> ActivationModule:
    score = get_score(pruner.score)
    return ActivationModule(model, layers, structure, n_samples,
                            score_fn=lambda moments: score.scores(layers, structure, moments, pruner))


PASSES: dict[str, Callable[..., L.LightningModule] | None] = {
    "gradients": gradient_pass,
    "activations": activation_pass,
    "weights": None,  # scores from the weights alone: no calibration pass
}
"""signal -> the scoring pass that feeds scores of that signal (model, layers, structure, n_samples, pruner)."""
