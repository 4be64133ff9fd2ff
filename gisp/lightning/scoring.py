"""The scoring passes as LightningModules: one validation epoch = one pass over the calibration set.

`PASSES` maps a score's signal to the module that computes it: `gradients` (GradientPass, a backward pass),
`activations` (ActivationPass, a forward pass with input hooks); `weights` scores need no pass.

Lightning runs the validation loop (devices, progress bar, DDP / FSDP ranks); each validation step computes the
objective with gradients enabled and runs backward, accumulating the signed gradient of the scored weights only.
At the end of the epoch the summed gradients are all-reduced across processes (DDP; under FSDP every backward
reduce-scatters into the shards and only the score vectors are all-reduced, see gisp.lightning.sharding), so every
process computes the same scores and the same masks. Each pass records its throughput (`throughput`: tokens/s, and
the MFU on a GPU of known peak) and the bytes its gradients held (`memory`), which gisp.memory.scoring predicts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from gisp.compact.scores import ROLES, compact_scored_weights, compact_structure_scores, scoring_model, weight_roles
from gisp.errors import GispError
from gisp.lightning.checkpointing import checkpoint_layers, training_layers
from gisp.lightning.sharding import (
    decoder_layers,
    full_state_on_rank0,
    load_shards_from_rank0,
    local,
    materialize_empty,
    shard_model,
    sharded_scores,
)
from gisp.lightning.throughput import throughput
from gisp.models.families import family_spec
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.activations import BlockRecorder, InputMoments, InputRecorder
from gisp.prune.importance import get_score, scored_weights, structure_scores
from gisp.prune.masks import Masks
from gisp.prune.objectives import batch_losses

log = logging.getLogger(__name__)

GRAD_OFFLOAD = (None, "cpu")  # prune.grad_offload


class GradientPass(L.LightningModule):
    """The gradient scoring pass. Where the mean gradient of the scored weights accumulates:

    - plain: in each weight's `.grad`, in the weights' dtype (the reference);
    - `grad_dtype` (e.g. float32 for a bf16 model): in a buffer of that dtype on the device; each batch's gradient
      is added by a post-accumulate-grad hook as soon as autograd produced it, and `.grad` is freed;
    - `grad_offload="cpu"`: the same hook adds each batch's gradient into a float32 buffer in (pinned, with CUDA)
      CPU memory and frees the device copy, so the device holds no resident gradient at all.
    All three give the same scores (sums of the same per-batch gradients; float32 or wider accumulation).
    `checkpointing` recomputes each decoder layer's activations in backward (exact: the same kernels run again).
    Under `trainer=fsdp` (gisp.lightning.sharding) `configure_model` shards the decoder layers and scores come from
    each process's shards.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerModules],
        structure: ModelStructure,
        n_samples: int,
        normalization: str = "reference",
        grad_dtype: torch.dtype | None = None,
        score_fn: Callable | None = None,
        grad_offload: str | None = None,
        checkpointing: bool = False,
        shardable: bool = True,
        compact: bool = False,
    ):
        super().__init__()
        if grad_offload not in GRAD_OFFLOAD:
            raise GispError(f"prune.grad_offload must be one of {GRAD_OFFLOAD}, got {grad_offload!r}")
        self.model = model
        self.layers = layers
        self.structure = structure
        self.n_samples = n_samples  # global calibration set size: every sequence must be seen once per pass
        self.normalization = normalization
        # grad_of -> (heads (L, H), channels (L, F)); GISP's normalized taylor score unless a registry score is given
        self.score_fn = score_fn or (lambda grad_of: structure_scores(layers, structure, normalization, grad_of))
        self.shardable = shardable  # the score is taylor: computable from shards (gisp.lightning.sharding)
        self.scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calib_loss: float | None = None
        self.throughput: dict[str, float | None] = {}  # tokens/s (and MFU on GPU) of the last pass
        self.tokens_per_s: float | None = None  # of the pass running now (gisp.lightning.progress shows it)
        self.memory: dict[str, int] = {}  # bytes held by gradients at the end of the last pass (before reduction)
        self.grad_dtype = grad_dtype
        self.grad_offload = grad_offload
        self.checkpointing = checkpointing
        self._layers_path = family_spec(model.config.model_type).layers
        # prune.compact: passes after the first pruning step run on the level's compact model (`score_on`); the
        # dense model, its layers and its score function stay here for the dense passes, read-out and evaluation
        self.compact = compact
        self._dense = (model, self._layers_path, self.score_fn)
        self.level: Masks | None = None  # the masks of the model the next pass runs on (None: the dense model)
        self._sharded = False
        self._full_state: dict[str, torch.Tensor] | None = None  # rank 0's weights until broadcast (trainer=fsdp)
        self._handles: list = []
        self._accumulated: dict[int, torch.Tensor] = {}  # id(weight) -> accumulation buffer
        self._host_pool: dict[tuple[int, str], torch.Tensor] = {}  # (layer, role) -> flat host buffer (offload)
        self._roles: dict[int, tuple[int, str]] = {}  # id(weight) -> (layer, role), keys of the host pool
        self._written: set[int] = set()  # buffers written in this pass (host buffers are reused from pass to pass)
        self._stage: torch.Tensor | None = None  # pinned staging memory for device -> host copies (CUDA)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._seen = 0
        self._tokens = 0
        self._started = 0.0
        self._largest_grad = 0  # bytes of the largest single .grad autograd produced (freed at once by the hook)
        # Only the scored weights need gradients: embeddings, lm_head, norms, protected layers and (with GQA) K/V
        # stay frozen, and backward stops below the first unprotected layer.
        self.model.requires_grad_(False)
        self._collect_scored()

    def _collect_scored(self) -> None:
        """The scored weights (again after sharding: FSDP2 replaces the parameters) and their accumulation hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.level is None:
            self._scored = [p for i in self.structure.unprotected for p in scored_weights(self.layers[i],
                                                                                           self.structure)]
            self._roles = {id(getattr(m, role).weight): (i, role) for i, m in enumerate(self.layers)
                           for role in ROLES if getattr(m, role) is not None}
        else:
            self._scored = compact_scored_weights(self.model, self.structure)
            self._roles = weight_roles(self.model, self.structure)
        for p in self._scored:
            p.requires_grad_(True)
            if self.grad_offload or (self.grad_dtype is not None and p.dtype != self.grad_dtype):
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulate))

    def score_on(self, masks: Masks) -> bool:
        """With `compact`: the next pass runs on the compact model of `masks` (built from the dense weights, the
        export's slicing), its scores mapped back to the dense indexing (gisp.compact.scores); dense masks: on the
        dense model. Returns whether the pass is compact. Under FSDP (sharded layers) the pass stays on the masked
        dense model. The compact model is sliced where the dense weights are: in host memory between passes
        (Lightning's teardown moves the module back to the CPU after each validation), and Lightning moves it to the
        device for its pass, so the device holds one model at a time."""
        if not self.compact or self._sharded:
            return False
        dense, layers_path, dense_score = self._dense
        # back to the dense model first: the previous step's compact model is released before the next is sliced
        self.model, self._layers_path, self.score_fn, self.level = dense, layers_path, dense_score, None
        if not (bool(masks.heads.all()) and bool(masks.channels.all())):
            structure, normalization = self.structure, self.normalization
            self.level = level = masks.clone()
            self.model = compact = scoring_model(dense, level, structure)
            self._layers_path = "model.layers"
            self.score_fn = lambda grad_of: compact_structure_scores(compact, level, structure, normalization,
                                                                     grad_of)
        self._accumulated.clear()  # buffers are keyed by the weights of the model they were made for
        self._written.clear()
        self._collect_scored()
        return self.level is not None

    @property
    def accumulator_dtype(self) -> torch.dtype | None:
        """Dtype of the accumulation buffers (None: gradients stay in `.grad`, in the weights' dtype)."""
        if self.grad_offload:
            return self.grad_dtype if self.grad_dtype in (torch.float32, torch.float64) else torch.float32
        return self.grad_dtype

    def _accumulate(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add this batch's gradient into the weight's buffer, free `.grad`."""
        g = local(p.grad)
        self._largest_grad = max(self._largest_grad, g.numel() * g.element_size())
        buf = self._accumulated.get(id(p))
        if buf is None and self.grad_offload:
            # host buffers live from pass to pass (pinning is slow), one per (layer, role): a compact weight's
            # buffer is the front of its dense weight's, so compact steps allocate nothing new
            key = self._roles[id(p)]
            pooled = self._host_pool.get(key)
            if pooled is None or pooled.numel() < g.numel():
                pooled = self._host_pool[key] = torch.empty(g.numel(), dtype=self.accumulator_dtype, device="cpu",
                                                            pin_memory=g.device.type == "cuda")
            buf = self._accumulated[id(p)] = pooled[: g.numel()].view(g.shape)
        elif buf is None:
            buf = torch.empty(g.shape, dtype=self.accumulator_dtype, device=g.device)
            self._accumulated[id(p)] = buf
        if buf.device != g.device:
            g = self._to_host(g)
        if id(p) in self._written:
            buf.add_(g)  # float32 (or wider) sum of the batches
        else:
            buf.copy_(g)  # the pass's first batch: no zero-fill needed
            self._written.add(id(p))
        p.grad = None

    def _to_host(self, g: torch.Tensor) -> torch.Tensor:
        """A device gradient copied into reusable pinned memory (a fast copy; valid until the next call)."""
        if self._stage is None or self._stage.numel() < g.numel() or self._stage.dtype != g.dtype:
            self._stage = torch.empty(g.numel(), dtype=g.dtype, pin_memory=True)
        stage = self._stage[: g.numel()].view(g.shape)
        stage.copy_(g)  # synchronous: the buffer is added to right after
        return stage

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The accumulated gradient of a scored weight on the weight's device (offloaded buffers are copied back
        one weight at a time, as the scores consume them)."""
        buf = self._accumulated.get(id(p)) if id(p) in self._written else None
        if buf is None:
            return p.grad
        device = local(p).device
        return buf.to(device, non_blocking=True) if buf.device != device else buf

    def gradient_bytes(self) -> dict[str, int]:
        """Bytes the accumulated gradient holds now: in `.grad` (the device), in device buffers, in host buffers."""
        out = {"grad": 0, "device_buffer": 0, "host_buffer": 0}
        for p in self._scored:
            if p.grad is not None:
                g = local(p.grad)
                out["grad"] += g.numel() * g.element_size()
            buf = self._accumulated.get(id(p)) if id(p) in self._written else None
            if buf is not None:
                key = "host_buffer" if self.grad_offload else "device_buffer"
                out[key] += buf.numel() * buf.element_size()
        return out

    # -- sharding -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (a device mesh exists): shard the decoder layers once, before the weights move to
        the devices; other strategies: nothing."""
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        if not self.shardable:
            raise GispError("trainer=fsdp scores from sharded gradients with the taylor score (pruner=gisp, oneshot, "
                            "llm_pruner); use trainer=ddp or one device for this pruner")
        reduce_dtype = self.grad_dtype if self.grad_dtype in (torch.float32, torch.float64) else None
        # The weights come from rank 0 (the others may hold an empty model, built on the meta device: one copy of
        # the model in host memory per node, not one per process): rank 0 keeps its full tensors until they are
        # broadcast in on_validation_start, after Lightning has placed the shards on the devices.
        self._full_state = full_state_on_rank0(self.model, self.trainer.global_rank)
        shard_model(self.model, self._layers_path, mesh["data_parallel"], reduce_dtype=reduce_dtype)
        materialize_empty(self.model, self.trainer.strategy.root_device)
        self._sharded = True
        self._collect_scored()

    def on_validation_start(self) -> None:
        if self._full_state is not None:
            load_shards_from_rank0(self.model, self._full_state)
            self._full_state = None

    # -- the pass -------------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        for p in self._scored:
            p.grad = None
        self._release_buffers()
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._seen = self._tokens = self._largest_grad = 0
        self.tokens_per_s: float | None = None
        self.scores = None
        self.memory = {}
        if self.checkpointing:
            checkpoint_layers(self.model, self._layers_path, True)
        self._started = time.perf_counter()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.enable_grad(), training_layers(self.model, self._layers_path, self.checkpointing):
            losses = batch_losses(self.model, batch)  # (B,) per-sequence mean loss over the scored tokens
            # Signed per-sequence weights (1/N for a mean; +1/n+ and -1/n- for the margin objective): one backward
            # of the weighted sum accumulates the objective's gradient over the whole calibration set. Padding
            # items (equal batch counts under FSDP) have weight 0.
            weighted = losses * batch["weight"].to(losses.dtype)  # (B,)
            weighted.sum().backward()
        self._loss_sum += weighted.detach().double().sum().cpu()
        real = batch.get("real")
        real = torch.ones(losses.numel(), dtype=torch.bool) if real is None else real.bool().cpu()
        self._seen += int(real.sum())
        mask = batch.get("attention_mask")
        width = batch["input_ids"].shape[1]
        per_row = mask.sum(dim=1).cpu() if mask is not None else torch.full((real.numel(),), width)  # tokens per row
        self._tokens += int(per_row[real].sum())
        self.tokens_per_s = self._tokens / max(time.perf_counter() - self._started, 1e-9)  # on the progress bar

    def on_validation_epoch_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._started
        self.memory = {**self.gradient_bytes(), "largest_grad": self._largest_grad}
        if self.checkpointing:
            checkpoint_layers(self.model, self._layers_path, False)
        counts = torch.tensor([self._seen, self._tokens], dtype=torch.float64)
        loss_sum = self._loss_sum
        if self.trainer.world_size > 1:  # every process scored its shard: sum losses and counts (and gradients)
            reduce = self.trainer.strategy.reduce
            counts = reduce(counts.to(self.device), reduce_op="sum").cpu()
            loss_sum = reduce(loss_sum.to(self.device), reduce_op="sum").cpu()
            if not self._sharded:  # FSDP reduce-scattered every batch already
                self._reduce_gradients()
        seen, tokens = int(counts[0]), int(counts[1])
        if seen != self.n_samples:
            raise GispError(f"the scoring pass saw {seen} calibration sequences, expected {self.n_samples}: "
                            "do not limit validation batches (trainer.limit_val_batches) during pruning")
        self.calib_loss = float(loss_sum)  # the objective's value: sum_i w_i L_i
        if self._sharded:
            reduce = self.trainer.strategy.reduce
            self.scores = sharded_scores(self.layers, self.structure, self.normalization, self.grad_of,
                                         lambda t: reduce(t, reduce_op="sum"), self.device)
        else:
            self.scores = self.score_fn(self.grad_of)
        self._check_finite_scores()
        self.throughput = throughput(tokens, seconds, self.structure, self.model, self.trainer.world_size,
                                     self.device, seq_len=round(tokens / max(seen, 1)))
        for p in self._scored:  # free the gradient memory before evaluation
            p.grad = None
        self._release_buffers()

    def _release_buffers(self) -> None:
        """Device buffers are freed (the device memory is needed for evaluation); pinned host buffers are kept for
        the next pass (pinning is slow) and only marked unwritten."""
        self._written.clear()
        if not self.grad_offload:
            self._accumulated.clear()

    def _reduce_gradients(self) -> None:
        """DDP: sum every scored weight's gradient over the processes, one weight at a time on the device."""
        reduce = self.trainer.strategy.reduce
        for p in self._scored:
            buf = self._accumulated.get(id(p))
            g = buf if id(p) in self._written else p.grad
            if g is None:  # this process's shard never reached the weight
                g = torch.zeros_like(p, dtype=self.accumulator_dtype or p.dtype)
            summed = reduce(g.to(self.device), reduce_op="sum")
            if buf is not None:
                buf.copy_(summed)
                self._written.add(id(p))
            elif summed.dtype == p.dtype:
                p.grad = summed
            else:
                self._accumulated[id(p)] = summed
                self._written.add(id(p))

    def _check_finite_scores(self) -> None:
        """A non-finite gradient shows as a non-finite score of its layer (|W * g| with g inf or nan); checking the
        small score vectors instead of every gradient saves a pass over the gradient memory (and, offloaded, a copy
        back to the device), and under FSDP every process sees the same scores, so all raise together."""
        heads, channels = self.scores
        for i in self.structure.unprotected:
            if not (bool(torch.isfinite(heads[i]).all()) and bool(torch.isfinite(channels[i]).all())):
                raise non_finite(i, self.layers[i].q.weight)


def non_finite(layer: int, p: torch.Tensor) -> GispError:
    dtype = p.dtype
    return GispError(
        f"non-finite gradient in layer {layer} ({tuple(p.shape)} {dtype}) during scoring: "
        + ("likely a half-precision overflow; use model.dtype=float32 or bfloat16 "
           if dtype in (torch.float16, torch.bfloat16) else "check the model and the data; ")
        + "no masks were written for this step"
    )


class ActivationPass(L.LightningModule):
    """One validation epoch = one forward-only pass whose activation statistics are recorded: projection input
    moments (wanda_sp, FLAP, OWL) or each layer's input / output similarity (ShortGPT); `score_fn(moments)` turns
    them into per-head and per-channel scores at the end (and per-layer statistics, `extra`).

    The hooks belong to `self.recorder`, a context manager the caller wraps around `trainer.validate`, so they are
    removed whatever happens inside the pass."""

    def __init__(self, model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                 score_fn, recorder=None):
        super().__init__()
        self.model = model
        self.structure = structure
        self.n_samples = n_samples
        self.score_fn = score_fn
        self.recorder = recorder if recorder is not None else InputRecorder(layers, structure)
        self.model.requires_grad_(False)
        self.scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.extra: dict[str, torch.Tensor] = {}  # per-layer statistics of the score, stored with it
        self.moments: dict[tuple[int, str], InputMoments] | None = None
        self.calib_loss: float | None = None  # no objective in an activation pass
        self._seen = 0

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise GispError("trainer=fsdp shards the weights, but activation scores (wanda_sp, flap) read whole "
                            "o_proj / down_proj weights: use trainer=ddp or one device for these pruners")

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
            moments = {k: type(m)(*(reduce(getattr(m, f.name), reduce_op="sum") for f in dataclasses.fields(m)))
                       for k, m in moments.items()}
            seen = int(reduce(torch.tensor(seen, device=self.device), reduce_op="sum"))
        if seen != self.n_samples:
            raise GispError(f"the activation pass saw {seen} calibration sequences, expected {self.n_samples}: "
                            "do not limit validation batches (trainer.limit_val_batches) during pruning")
        self.moments = moments
        heads, channels, *extra = self.score_fn(moments)
        self.scores, self.extra = (heads, channels), (extra[0] if extra else {})


def gradient_pass(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                  pruner, grad_offload: str | None = None, checkpointing: bool = False,
                  compact: bool = False) -> GradientPass:
    """`compact` (prune.compact): the passes after the first pruning step run on the level's compact model (GISP's
    taylor score, the only gradient score, maps back to the dense indexing)."""
    score = get_score(pruner.score)
    taylor = pruner.score == "taylor"
    return GradientPass(model, layers, structure, n_samples, pruner.normalization, pruner.grad_torch_dtype,
                      score_fn=lambda grad_of: score.scores(layers, structure, grad_of, pruner),
                      grad_offload=grad_offload, checkpointing=checkpointing, shardable=taylor,
                      compact=compact and taylor)


def activation_pass(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, n_samples: int,
                    pruner, grad_offload: str | None = None, checkpointing: bool = False,
                    compact: bool = False) -> ActivationPass:
    """A forward-only pass, run once on the dense model: `grad_offload`, `checkpointing` and `compact`
    (gradient-pass options) have nothing to act on."""
    score = get_score(pruner.score)
    if score.recorder == "blocks":
        recorder = BlockRecorder(decoder_layers(model, family_spec(model.config.model_type).layers), structure)
    else:
        recorder = InputRecorder(layers, structure, score.points)
    return ActivationPass(model, layers, structure, n_samples,
                            score_fn=lambda moments: score.scores(layers, structure, moments, pruner),
                            recorder=recorder)


PASSES: dict[str, Callable[..., L.LightningModule] | None] = {
    "gradients": gradient_pass,
    "activations": activation_pass,
    "weights": None,  # scores from the weights alone: no calibration pass
}
"""signal -> the scoring pass that feeds scores of that signal (model, layers, structure, n_samples, pruner,
grad_offload=prune.grad_offload, checkpointing=prune.checkpointing, compact=prune.compact)."""
