"""Layer by layer on the pruned model's hidden states, so a layer's refit sees the inputs that the already
reconstructed layers before it produce (their errors do not accumulate unseen). The target of a block's refit is
either what the same block outputs unpruned on those inputs (target="local", the default: GPTQ / SlimGPT's
formulation, one stream) or what the DENSE model's block outputs on the dense model's own hidden states
(target="dense": a second stream, measured worse, experiments/reconstruction/README.md).

Decoder layers are called one at a time with the arguments the model itself passes them (rotary tables, attention
masks, positions), captured once from a forward pass of the dense model: every family's own layer code runs, so
norm placement, parallel blocks and per-layer attention types need nothing here. Per layer i:

    dense pass    (target="dense" only) X_d <- layer_i(X_d), recording the outputs of o_proj and down_proj
    attention     the pruned stream through layer_i under the level's masks, recording o_proj's inputs (and, with
                  target="local", its outputs with this block unpruned): statistics against the targets, then
                  `fit_o(stats)` gives o_proj's new kept columns (and output bias)
    MLP           again, with the new o_proj in place: down_proj's inputs, `fit_down(stats)`
    pruned pass   X_p <- layer_i(X_p) with both refits

Only one layer's statistics and weights are changed at a time; the model's own weights are given back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.masks import MaskApplier, Masks, OutputBias
from gisp.reconstruct.solve import GramStats

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the last layer's pre-hook: the arguments of every layer are known, the rest is not needed."""


@dataclass
class Batch:
    """One batch of reconstruction data: the scored tokens' mask and each layer's call arguments."""

    tokens: torch.Tensor  # (B, T) bool: real (non-padding) tokens
    args: list[tuple[tuple, dict]]  # per layer: (positional args without the hidden states, keyword args)


@dataclass
class Refit:
    """A block's new kept columns and the bias added to its output (relative to the module's own bias)."""

    weight: torch.Tensor  # (out, kept)
    extra_bias: torch.Tensor | None = None  # (out,)


@dataclass
class LayerRefits:
    attn: dict[int, Refit] = field(default_factory=dict)
    mlp: dict[int, Refit] = field(default_factory=dict)


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A layer call's hidden states and the rest of its arguments; keyword arguments left at None are dropped (the
    layer's defaults: a cache argument passed as None is deprecated in recent transformers)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args:
        return args[0], args[1:], kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def capture(model: nn.Module, decoder: nn.ModuleList, batches: list[dict]) -> tuple[list[torch.Tensor], list[Batch]]:
    """The first layer's input hidden states and every layer's call arguments, per batch, from the dense model."""
    firsts, out = [], []
    for batch in batches:
        calls: list[tuple[tuple, dict]] = []
        hidden: list[torch.Tensor] = []

        def pre_hook(module, args, kwargs, calls=calls, hidden=hidden):
            h, rest, kw = _hidden_of(args, kwargs)
            if not calls:
                hidden.append(h.detach().clone())
            calls.append((rest, kw))
            if len(calls) == len(decoder):
                raise _Captured

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in decoder]
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(decoder):
            raise GispError("the reconstruction could not follow the model's decoder layers (a layer was skipped)")
        mask = batch.get("attention_mask")
        tokens = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()
        firsts.append(hidden[0])
        out.append(Batch(tokens.to(hidden[0].device), calls))
    return firsts, out


def layer_output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@contextlib.contextmanager
def recording(module: nn.Module, what: str, store: list) -> Iterator[None]:
    """Record a module's input (`what`="in", after any pre-hook: masked) or output ("out") while the block runs."""
    if what == "in":
        handle = module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, output: store.append(output.detach()))
    try:
        yield
    finally:
        handle.remove()


def real_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, n) -> (real tokens, n)."""
    return x.reshape(-1, x.shape[-1])[tokens.reshape(-1)]


class _Stop(Exception):
    """Raised by a hook once a pass has recorded what it needs: the rest of the layer is not computed."""


@contextlib.contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    def hook(m, args, output):
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


TARGETS = ("dense", "local")


def layerwise_refit(model: nn.Module, decoder: nn.ModuleList, layers: list[LayerModules], structure: ModelStructure,
                    masks: Masks, batches: list[dict], fit: Callable[[GramStats, nn.Linear], Refit],
                    progress: Callable[[int], None] | None = None, target: str = "dense") -> LayerRefits:
    """The refits of every block that lost structures at `masks`: o_proj (attention) and down_proj (MLP) of each such
    layer, fitted on the pruned stream (module docstring). `target`: "dense", the dense model's outputs on its own
    stream; "local", what the unpruned block outputs from the pruned stream's inputs (GPTQ / SlimGPT: only this
    block's removal is compensated, no dense stream is kept). `fit(stats, linear)` turns a block's statistics into its
    Refit. The model's weights are unchanged afterwards."""
    if target not in TARGETS:
        raise GispError(f"reconstruct.target={target!r} is not one of {TARGETS}")
    applier = MaskApplier(layers, structure)
    refits = LayerRefits()
    dense_masks = Masks.dense(structure)
    try:
        firsts, calls = capture(model, decoder, batches)
        dense = [h.clone() for h in firsts] if target == "dense" else None
        pruned = [h.clone() for h in firsts]
        d_h = structure.head_dim
        for i, layer in enumerate(decoder):
            m = layers[i]
            kept_cols = masks.heads[i].repeat_interleave(d_h)  # (H d_h,) o_proj's kept inputs
            kept_ch = masks.channels[i]
            blocks_pruned = not bool(kept_cols.all()) or not bool(kept_ch.all())
            targets_o: list[torch.Tensor] = []
            targets_d: list[torch.Tensor] = []
            if dense is not None:
                applier.set(dense_masks)
                with torch.no_grad(), recording(m.o, "out", targets_o), recording(m.down, "out", targets_d):
                    for b, batch in enumerate(calls):
                        dense[b] = layer_output(layer(dense[b], *batch.args[i][0], **batch.args[i][1]))
            if blocks_pruned:
                _refit_layer(layer, i, m, structure, masks, calls, pruned, targets_o, targets_d, applier, fit,
                             refits, local=dense is None)
            else:  # nothing removed here: the pruned stream goes through the layer as it is
                applier.set(dense_masks)
                with torch.no_grad():
                    for b, batch in enumerate(calls):
                        pruned[b] = layer_output(layer(pruned[b], *batch.args[i][0], **batch.args[i][1]))
            if progress is not None:
                progress(i)
    finally:
        applier.remove()
    return refits


def _refit_layer(layer: nn.Module, i: int, m: LayerModules, structure: ModelStructure, masks: Masks,
                 calls: list[Batch], pruned: list[torch.Tensor], targets_o: list[torch.Tensor],
                 targets_d: list[torch.Tensor], applier: MaskApplier, fit, refits: LayerRefits, local: bool) -> None:
    """Refit layer i's o_proj, then its down_proj (with the new o_proj in place), and move the pruned stream on."""
    saved = (m.o.weight.detach().clone(), m.down.weight.detach().clone())
    bias_attn = torch.zeros(structure.n_layers, structure.hidden)
    bias_mlp = torch.zeros(structure.n_layers, structure.hidden)
    kept_cols = masks.heads[i].repeat_interleave(structure.head_dim)
    try:
        blocks = (("attn", m.o, kept_cols, targets_o, bias_attn), ("mlp", m.down, masks.channels[i], targets_d,
                                                                    bias_mlp))
        for block, linear, kept, targets, bias in blocks:
            if bool(kept.all()):
                continue
            # local: this block unpruned (its output is the target), the blocks before it as the level has them
            current = masks.clone()
            if local:
                if block == "attn":
                    current.heads[i] = True
                current.channels[i] = True
            applier.set(current, OutputBias(bias_attn, bias_mlp))
            device = linear.weight.device
            stats = GramStats.zeros(int(kept.sum()), linear.out_features, device)
            inputs: list[torch.Tensor] = []
            outputs: list[torch.Tensor] = []
            with torch.no_grad(), recording(linear, "in", inputs), recording(linear, "out", outputs), \
                    _stop_after(linear):
                for b, batch in enumerate(calls):
                    try:
                        layer(pruned[b], *batch.args[i][0], **batch.args[i][1])
                    except _Stop:
                        pass
                    z = real_tokens(inputs.pop(), batch.tokens)[:, kept.to(device)]  # (n, kept)
                    y = outputs.pop() if local else targets[b]
                    stats.add(z, real_tokens(y, batch.tokens))
            refit = fit(stats, linear)
            (refits.attn if block == "attn" else refits.mlp)[i] = refit
            with torch.no_grad():  # in place for the passes after this one
                w = torch.zeros_like(linear.weight)
                w[:, kept.to(w.device)] = refit.weight.to(w.device, w.dtype)
                linear.weight.copy_(w)
            if refit.extra_bias is not None:
                bias[i] = refit.extra_bias
        applier.set(masks, OutputBias(bias_attn, bias_mlp))
        with torch.no_grad():
            for b, batch in enumerate(calls):
                pruned[b] = layer_output(layer(pruned[b], *batch.args[i][0], **batch.args[i][1]))
    finally:
        with torch.no_grad():
            m.o.weight.copy_(saved[0])
            m.down.weight.copy_(saved[1])
