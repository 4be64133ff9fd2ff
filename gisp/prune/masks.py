"""Keep-masks over heads and channels: the data, its files, and reversible application to a live model.

Masks are applied as forward pre-hooks that zero the inputs of o_proj (per head) and down_proj (per channel).
The weights are never touched, so the dense model is always recoverable and switching between sparsity levels
is a copy of a few bytes. A zeroed o_proj input column removes the head exactly as zeroing its weights does (the
reference zeroes q rows and o columns), and gradients of the pruned rows and columns become exactly zero, so
pruned structures score 0 at the next step, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gisp.errors import GispError
from gisp.io import atomic_file
from gisp.models.structure import LayerModules, ModelStructure


@dataclass
class Masks:
    """Boolean keep-masks: heads (L, H) and channels (L, F); True = kept."""

    heads: torch.Tensor
    channels: torch.Tensor

    @classmethod
    def dense(cls, structure: ModelStructure) -> Masks:
        return cls(
            torch.ones(structure.n_layers, structure.n_heads, dtype=torch.bool),
            torch.ones(structure.n_layers, structure.ffn, dtype=torch.bool),
        )

    def clone(self) -> Masks:
        return Masks(self.heads.clone(), self.channels.clone())

    @property
    def n_pruned(self) -> int:
        return int((~self.heads).sum() + (~self.channels).sum())

    def flat_pruned(self) -> torch.Tensor:
        """(L*H + L*F,) bool, heads first: the order of the global ranking."""
        return torch.cat([~self.heads.flatten(), ~self.channels.flatten()])

    def equal(self, other: Masks) -> bool:
        return self.heads.shape == other.heads.shape and self.channels.shape == other.channels.shape and \
            bool(self.heads.equal(other.heads)) and bool(self.channels.equal(other.channels))

    def is_nested_in(self, earlier: Masks) -> bool:
        """True when everything pruned in `earlier` is pruned here too."""
        return bool(((~earlier.heads) <= (~self.heads)).all() and ((~earlier.channels) <= (~self.channels)).all())

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.heads.shape[0]):
            out[f"layers.{i}.heads"] = self.heads[i].contiguous()
            out[f"layers.{i}.channels"] = self.channels[i].contiguous()
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> Masks:
        n_layers = len({k.split(".")[1] for k in tensors})
        try:
            heads = torch.stack([tensors[f"layers.{i}.heads"] for i in range(n_layers)]).bool()
            channels = torch.stack([tensors[f"layers.{i}.channels"] for i in range(n_layers)]).bool()
        except KeyError as e:
            raise GispError(f"masks file lacks {e}: not a gisp masks file") from None
        return cls(heads, channels)

    def save(self, path: str | Path) -> None:
        """Atomic: written to a temporary file in the same folder, then renamed."""
        _save_atomic(self.state_dict(), Path(path), "gisp-masks")

    @classmethod
    def load(cls, path: str | Path) -> Masks:
        return cls.from_state_dict(load_tensors(path, "masks"))


def load_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is a GispError naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise GispError(f"{what} file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for truncated / corrupt files)
        raise GispError(f"{what} file {path} is not a readable safetensors file ({type(e).__name__}: {e}): it is "
                        "damaged (truncated or edited); use an intact copy, or recompute it") from None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    with atomic_file(path) as tmp:
        # One metadata key: safetensors writes metadata in hash-map order, so two keys made the bytes of identical
        # masks differ from run to run.
        save_file(tensors, str(tmp), metadata={"format": f"{fmt}/1"})


@dataclass
class OutputBias:
    """Per-layer constants added to the outputs of o_proj (attn, (L, d)) and down_proj (mlp, (L, d)).

    FLAP's bias compensation: what the pruned inputs contributed on average, so the layer's output mean stays put.
    Stored next to the step's masks; a level with a bias is masks + bias, both data, replayable on the dense weights.
    """

    attn: torch.Tensor
    mlp: torch.Tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"attn": self.attn.float().contiguous(), "mlp": self.mlp.float().contiguous()}

    def save(self, path: str | Path) -> None:
        _save_atomic(self.state_dict(), Path(path), "gisp-output-bias")

    @classmethod
    def load(cls, path: str | Path) -> OutputBias:
        tensors = load_tensors(path, "output-bias")
        if set(tensors) != {"attn", "mlp"}:
            raise GispError(f"{path} is not a gisp output-bias file (keys {sorted(tensors)})")
        return cls(tensors["attn"], tensors["mlp"])


def group_heads(masks: Masks, group_size: int) -> Masks:
    """The masks with one head bit per group of `group_size` consecutive query heads (a KV group); a group that
    is only partly kept is an error. `group_size` 1 returns the masks themselves."""
    if group_size == 1:
        return masks
    L, H = masks.heads.shape
    grouped = masks.heads.view(L, H // group_size, group_size)  # (L, U, g)
    kept, whole = grouped.any(dim=-1), grouped.all(dim=-1)
    if not bool((whole == kept).all()):
        layer = int((whole != kept).any(dim=1).nonzero()[0])
        raise GispError(f"layer {layer}'s masks keep part of a KV group, but prune.gqa_mode=group prunes whole "
                        "groups: these masks come from a query-mode run (use its gqa_mode)")
    return Masks(kept, masks.channels)


def unit_masks(masks: Masks, structure: ModelStructure) -> Masks:
    """The masks per prunable unit: heads (L, n_units), channels (L, F); query mode: the masks themselves."""
    return group_heads(masks, structure.group_size)


def expand_units(units: Masks, structure: ModelStructure) -> Masks:
    """Unit masks (L, n_units) as query-head masks (L, H): each unit's bit repeated over its query heads."""
    return Masks(units.heads.repeat_interleave(structure.group_size, dim=1), units.channels)


def flat_pruned(masks: Masks, structure: ModelStructure) -> torch.Tensor:
    """(L*n_units + L*F,) bool, units first: the index space of the global ranking and of trajectory orders."""
    return unit_masks(masks, structure).flat_pruned()


def masks_from_flat(pruned: torch.Tensor, structure: ModelStructure) -> Masks:
    """Query-head keep-masks from a flat pruned vector over units and channels (units first)."""
    L, U = structure.n_layers, structure.n_units
    return expand_units(Masks(~pruned[: L * U].view(L, U), ~pruned[L * U:].view(L, structure.ffn)), structure)


def n_pruned(masks: Masks, structure: ModelStructure) -> int:
    """Pruned head units + pruned channels (the numerator of the structural ratio)."""
    return unit_masks(masks, structure).n_pruned


def sparsity(masks: Masks, structure: ModelStructure) -> float:
    """Parameter sparsity of the decoder layers (method.md section 4): pruned parameters / all layer parameters.
    A head unit counts when pruned whole (a query head in query mode, a KV group with its K/V rows in group mode)."""
    units = unit_masks(masks, structure)
    pruned_heads = int((~units.heads).sum())
    pruned_channels = int((~units.channels).sum())
    pruned = pruned_heads * structure.head_params + pruned_channels * structure.channel_params
    return pruned / structure.decoder_params


class MaskApplier:
    """Applies masks to a live model through forward pre-hooks; `remove()` gives back the untouched dense model."""

    def __init__(self, layers: list[LayerModules], structure: ModelStructure):
        self.layers = layers
        self.structure = structure
        self._head_scale: list[torch.Tensor] = []  # per layer (H * d_h,) multiplier on o_proj's input
        self._channel_scale: list[torch.Tensor] = []  # per layer (F,) multiplier on down_proj's input
        self._active: list[bool] = [False] * structure.n_layers  # skip the multiply on fully dense layers
        self._handles = []
        self._bias: dict[str, list[torch.Tensor]] | None = None  # per layer (d,) added to o_proj / down_proj outputs
        for i, layer in enumerate(layers):
            self._head_scale.append(torch.ones(structure.n_heads * structure.head_dim))
            self._channel_scale.append(torch.ones(structure.ffn))
            self._handles.append(layer.o.register_forward_pre_hook(self._hook(i, self._head_scale)))
            self._handles.append(layer.down.register_forward_pre_hook(self._hook(i, self._channel_scale)))
            self._handles.append(layer.o.register_forward_hook(self._bias_hook(i, "attn")))
            self._handles.append(layer.down.register_forward_hook(self._bias_hook(i, "mlp")))
        self.masks = Masks.dense(structure)
        self.bias: OutputBias | None = None

    def _hook(self, layer: int, scales: list[torch.Tensor]):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self._active[layer]:
                return None
            x = args[0]  # (B, T, H*d_h) or (B, T, F)
            scale = scales[layer]
            if scale.device != x.device or scale.dtype != x.dtype:
                scale = scales[layer] = scale.to(device=x.device, dtype=x.dtype)
            return (x * scale, *args[1:])

        return pre_hook

    def _bias_hook(self, layer: int, block: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._bias is None:
                return None
            biases = self._bias[block]
            if biases[layer].device != output.device or biases[layer].dtype != output.dtype:
                biases[layer] = biases[layer].to(device=output.device, dtype=output.dtype)
            return output + biases[layer]

        return hook

    def set(self, masks: Masks, bias: OutputBias | None = None) -> None:
        """Switch the model to these masks (any order: masks need not be nested with the current ones), with an
        optional output bias (FLAP's compensation; None removes any bias set before)."""
        s = self.structure
        if masks.heads.shape != (s.n_layers, s.n_heads) or masks.channels.shape != (s.n_layers, s.ffn):
            raise GispError(
                f"masks of shape heads {tuple(masks.heads.shape)} / channels {tuple(masks.channels.shape)} do not "
                f"fit this model ({s.n_layers} layers, {s.n_heads} heads, {s.ffn} channels)"
            )
        for i in range(s.n_layers):
            head = masks.heads[i].repeat_interleave(s.head_dim)  # (H*d_h,)
            self._head_scale[i] = head.to(self._head_scale[i].device, self._head_scale[i].dtype)
            self._channel_scale[i] = masks.channels[i].to(self._channel_scale[i].device, self._channel_scale[i].dtype)
            self._active[i] = not (bool(masks.heads[i].all()) and bool(masks.channels[i].all()))
        self.masks = masks.clone()
        if bias is not None and (bias.attn.shape != (s.n_layers, s.hidden) or bias.mlp.shape != (s.n_layers, s.hidden)):
            raise GispError(f"output bias of shape {tuple(bias.attn.shape)} does not fit this model "
                            f"({s.n_layers} layers, hidden {s.hidden})")
        self.bias = bias
        self._bias = None if bias is None else {"attn": list(bias.attn.unbind(0)), "mlp": list(bias.mlp.unbind(0))}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = [False] * self.structure.n_layers
        self._bias = self.bias = None


def masks_record(masks: Masks, structure: ModelStructure) -> dict[str, float | int]:
    """What a trajectory step records of its masks: parameter sparsity, structural ratio, heads and channels kept."""
    return {"structural_ratio": n_pruned(masks, structure) / structure.n_structures,
            "sparsity": sparsity(masks, structure), "heads_kept": int(masks.heads.sum()),
            "channels_kept": int(masks.channels.sum())}
