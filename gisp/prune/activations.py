"""Activation statistics of a calibration pass: per-feature moments of projection inputs, and how much each decoder
layer changes its hidden states.

`InputRecorder`: the inputs of o_proj and down_proj (wanda_sp, FLAP and FLAP's bias compensation), and with
`points` also those of q_proj (= k, v) and gate_proj (= up) (OWL's outlier ratio). `BlockRecorder`: the cosine
similarity of each decoder layer's input and output hidden states (ShortGPT's Block Influence). Both are context
managers so their hooks are removed whatever happens inside the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from typing_extensions import Self

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure


@dataclass
class InputMoments:
    """Per-feature sums over calibration tokens (float64): count, sum x, sum x^2."""

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.total_sq / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each feature over all tokens."""
        return (self.mean_sq - self.mean.pow(2)).clamp_min(0.0)


# Where an input recorder hooks: key -> the projection whose input it records ("attn" / "mlp": o_proj / down_proj;
# "gate": the MLP's input, read at up_proj, which every MLP has)
POINTS = {"attn": "o", "mlp": "down", "q": "q", "gate": "up"}


class _HookRecorder:
    """What both recorders share: hooks registered on entering (`_register`, once), all removed on exit (also after
    an error), and the token mask of the current batch (None = every token)."""

    name = "recorder"

    def __init__(self, structure: ModelStructure):
        self.structure = structure
        self.token_mask: torch.Tensor | None = None  # (B, T) bool of the current batch; None = every token
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        if self.active:
            raise GispError(f"the {self.name} is already recording")
        self._handles.extend(self._register())
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.token_mask = None

    def _register(self) -> list:
        raise NotImplementedError


class InputRecorder(_HookRecorder):
    """Context manager: forward pre-hooks on the projections of `points` (default o_proj and down_proj) of the
    unprotected layers that accumulate their inputs' moments over the non-padding tokens. The hooks are removed on
    exit, also after an error."""

    name = "input recorder"

    def __init__(self, layers: list[LayerModules], structure: ModelStructure,
                 points: tuple[str, ...] = ("attn", "mlp")):
        unknown = [p for p in points if p not in POINTS]
        if unknown:
            raise GispError(f"unknown recording points {unknown}; known: {sorted(POINTS)}")
        super().__init__(structure)
        self.layers = layers
        self.points = points
        self.moments: dict[tuple[int, str], InputMoments] = {}

    def _register(self) -> list:
        return [getattr(self.layers[i], POINTS[point]).register_forward_pre_hook(self._hook((i, point)))
                for i in self.structure.unprotected for point in self.points]

    def _hook(self, key: tuple[int, str]):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()  # (B, T, features)
            rows = x[self.token_mask.to(x.device)] if self.token_mask is not None else x.reshape(-1, x.shape[-1])
            rows = rows.double()
            m = self.moments.get(key)
            if m is None:
                zeros = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                m = self.moments[key] = InputMoments(torch.zeros((), dtype=torch.float64, device=x.device),
                                                     zeros, zeros.clone())
            m.count += rows.shape[0]
            m.total += rows.sum(dim=0)
            m.total_sq += rows.pow(2).sum(dim=0)

        return pre_hook


@dataclass
class BlockMoments:
    """Per decoder layer, over calibration tokens (float64): count and sum of cos(input, output hidden state)."""

    count: torch.Tensor
    cosine: torch.Tensor

    @property
    def block_influence(self) -> float:
        """ShortGPT's BI: 1 - the mean cosine similarity of a layer's input and output hidden states."""
        return float(1.0 - self.cosine / self.count)


class BlockRecorder(_HookRecorder):
    """Context manager: forward hooks on the decoder layers of the unprotected layers that accumulate, over the
    non-padding tokens, the cosine similarity between each layer's input and output hidden state (a layer that
    barely changes its input scores low: ShortGPT removes those first). Same interface as InputRecorder."""

    name = "block recorder"

    def __init__(self, decoder_layers, structure: ModelStructure):
        super().__init__(structure)
        self.decoder_layers = decoder_layers
        self.moments: dict[tuple[int, str], BlockMoments] = {}

    def _register(self) -> list:
        return [self.decoder_layers[i].register_forward_hook(self._hook(i), with_kwargs=True)
                for i in self.structure.unprotected]

    def _hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x_in.detach().double(), x_out.detach().double(), dim=-1)
            cos = cos.nan_to_num(0.5)  # as the reference: a zero vector counts as half-similar
            if self.token_mask is not None:
                cos = cos[self.token_mask.to(cos.device)]
            m = self.moments.get((i, "block"))
            if m is None:
                zero = torch.zeros((), dtype=torch.float64, device=cos.device)
                m = self.moments[(i, "block")] = BlockMoments(zero, zero.clone())
            m.count += cos.numel()
            m.cosine += cos.sum()

        return hook
