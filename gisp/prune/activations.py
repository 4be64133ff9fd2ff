"""Activation statistics of a calibration pass: per-feature moments of the inputs of o_proj and down_proj.

Used by the activation scores (wanda_sp, FLAP) and FLAP's bias compensation. The recorder is a context manager so
its forward pre-hooks are removed whatever happens inside the pass.
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


class InputRecorder:
    """Context manager: forward pre-hooks on o_proj and down_proj of the unprotected layers that accumulate their
    inputs' moments over the non-padding tokens. The hooks are removed on exit, also after an error."""

    def __init__(self, layers: list[LayerModules], structure: ModelStructure):
        self.layers = layers
        self.structure = structure
        self.moments: dict[tuple[int, str], InputMoments] = {}
        self.token_mask: torch.Tensor | None = None  # (B, T) bool of the current batch; None = every token
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        if self.active:
            raise GispError("the input recorder is already recording")
        for i in self.structure.unprotected:
            self._handles.append(self.layers[i].o.register_forward_pre_hook(self._hook((i, "attn"))))
            self._handles.append(self.layers[i].down.register_forward_pre_hook(self._hook((i, "mlp"))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.token_mask = None

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
