"""The closed forms of a reconstruction, as pure functions of accumulated statistics.

Ridge least squares of a linear map's kept input columns: find W' (out x k) and, optionally, an intercept b' that
minimize sum over tokens ||W' z + b' - y||^2 + lam ||W'||^2, where z (k) are the kept inputs as the pruned model
produces them and y (out) the dense layer's outputs. From the Gram matrices accumulated over the tokens,

    G = sum z z^T (k x k),   C = sum y z^T (out x k),   s_z = sum z,   s_y = sum y,   n tokens,

the solution solves (G + lam I) W'^T = C^T, or with the intercept the augmented system over [z, 1] (the intercept
is not damped). The statistics are accumulated in float32 and solved in float64 with a Cholesky factorization; lam is
`damp` x the mean of G's diagonal, so one damping setting means the same for every layer and model scale.

FLAP's bias compensation: the output bias that keeps a layer's mean output when inputs are removed,
b = W[:, pruned] @ mean(x[pruned]) over the dense model's inputs x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.errors import GispError


@dataclass
class GramStats:
    """Sufficient statistics of a least-squares fit of `out` outputs on `k` inputs, accumulated over tokens."""

    gram: torch.Tensor  # (k, k) sum z z^T
    cross: torch.Tensor  # (out, k) sum y z^T
    sum_in: torch.Tensor  # (k,) sum z
    sum_out: torch.Tensor  # (out,) sum y
    count: int = 0

    @classmethod
    def zeros(cls, k: int, out: int, device: torch.device | str = "cpu") -> GramStats:
        f = {"dtype": torch.float32, "device": device}
        return cls(torch.zeros(k, k, **f), torch.zeros(out, k, **f), torch.zeros(k, **f), torch.zeros(out, **f))

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Tokens z (n, k) and their targets y (n, out)."""
        z, y = z.float(), y.float()
        self.gram.addmm_(z.t(), z)
        self.cross.addmm_(y.t(), z)
        self.sum_in += z.sum(0)
        self.sum_out += y.sum(0)
        self.count += z.shape[0]

    def reduce(self, reduce_fn) -> None:
        """Sum the statistics of several processes (their shares of the tokens)."""
        for name in ("gram", "cross", "sum_in", "sum_out"):
            setattr(self, name, reduce_fn(getattr(self, name)))
        self.count = int(reduce_fn(torch.tensor(float(self.count), device=self.gram.device)))


def ridge(stats: GramStats, damp: float, intercept: bool, fixed_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W' (out, k), b' (out,) or None) minimizing the damped squared error of the statistics. `fixed_bias`: an
    output bias that stays (the layer has one and no intercept is fitted): the targets are y - fixed_bias."""
    if stats.count == 0:
        raise GispError("a reconstruction saw no tokens: the reconstruction data is empty (reconstruct.tokens)")
    g = stats.gram.double()
    c = stats.cross.double()
    k = g.shape[0]
    if fixed_bias is not None and not intercept:
        c = c - fixed_bias.double()[:, None] * stats.sum_in.double()[None, :]
    lam = damp * float(g.diagonal().mean()) if k else 0.0
    if intercept:
        a = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=g.device)
        a[:k, :k] = g + lam * torch.eye(k, dtype=torch.float64, device=g.device)
        a[:k, k] = a[k, :k] = stats.sum_in.double()
        a[k, k] = stats.count
        rhs = torch.cat([c, stats.sum_out.double()[:, None]], dim=1)  # (out, k + 1)
        solution = _solve(a, rhs)
        return solution[:, :k].float(), solution[:, k].float()
    if k == 0:
        return torch.zeros(c.shape[0], 0), None
    return _solve(g + lam * torch.eye(k, dtype=torch.float64, device=g.device), c).float(), None


def _solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with X a = rhs for a symmetric positive (semi)definite a: Cholesky, or a least-squares solve where a is
    singular (an undamped fit on inputs that are exact linear combinations of each other)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.t(), factor).t()
    return torch.linalg.lstsq(a, rhs.t()).solution.t()  # the minimum-norm solution of a singular system


def flap_bias(weight: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation of a linear map whose `pruned` (bool, in) inputs are removed: W[:, pruned] @ mean[pruned],
    in float64 (weight (out, in), mean (in,))."""
    return (weight.detach().double().cpu() @ (mean.double().cpu() * pruned.cpu())).float()
