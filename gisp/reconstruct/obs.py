"""Structured Optimal Brain Surgeon, as pure functions of a linear map's weights and its inputs' Hessian: the
error of removing a group of input columns and the update of the remaining columns that compensates it
(SlimGPT, arXiv 2412.18110; OBS: Hassibi & Stork 1993).

For a linear map y = W x with inputs of Hessian H = E[x x^T] (columns = inputs), removing the set S of inputs and
updating the others optimally costs

    err(S) = trace(W_S (Hinv_SS)^-1 W_S^T),        W <- W - W_S (Hinv_SS)^-1 Hinv_S:

and the inverse Hessian of the remaining inputs is the Schur complement Hinv - Hinv_:S (Hinv_SS)^-1 Hinv_S: (no new
inversion per removal). Everything runs in float64. SlimGPT removes one attention head at a time (S = the head's
d_h columns of o_proj) and MLP channels in shrinking groups (S = single columns, err_j = ||W_:j||^2 / Hinv_jj).
"""

from __future__ import annotations

import math

import torch

from gisp.errors import GispError


def inverse_hessian(gram: torch.Tensor, count: int, percdamp: float) -> torch.Tensor:
    """Hinv of H = gram / count (float64), inputs that never fire set to H_jj = 1 (SlimGPT, GPTQ), damped by
    `percdamp` x the mean diagonal."""
    if count == 0:
        raise GispError("SlimGPT saw no calibration tokens: the calibration set is empty")
    h = gram.double() / count
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += percdamp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise GispError("SlimGPT: the inputs' Hessian is not positive definite even with damping: raise "
                        "pruner.options.percdamp (e.g. 0.1)")
    return torch.cholesky_inverse(factor)


def block_errors(weight: torch.Tensor, hinv: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """err(S) for each row of `blocks` (n, s): the column indices of one candidate group each."""
    w = weight[:, blocks].permute(1, 0, 2)  # (n, out, s)
    b = hinv[blocks[:, :, None], blocks[:, None, :]]  # (n, s, s)
    solved = torch.linalg.solve(b, w.transpose(1, 2))  # (n, s, out) = B^-1 W_S^T
    return (w.transpose(1, 2) * solved).sum(dim=(1, 2))


def remove(weight: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor) -> None:
    """Remove input `columns` in place: the optimal update of the other columns, the columns zeroed, and Hinv
    downdated to the remaining inputs (removed rows and columns zero)."""
    b = hinv[columns[:, None], columns[None, :]]
    rows = hinv[columns, :]  # (s, n)
    weight -= torch.linalg.solve(b, weight[:, columns].t()).t() @ rows
    hinv -= rows.t() @ torch.linalg.solve(b, rows)
    weight[:, columns] = 0.0
    hinv[columns, :] = 0.0
    hinv[:, columns] = 0.0


def prune_groups(weight: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor, n_remove: int) -> list[int]:
    """Greedy: remove `n_remove` of `groups` (n, s column indices) one at a time, each time the one of least error
    given the removals before it (the heads of SlimGPT). Returns the removed groups' indices, in order."""
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    removed = []
    for _ in range(n_remove):
        candidates = alive.nonzero().flatten()
        errors = block_errors(weight, hinv, groups[candidates].to(weight.device))
        pick = int(candidates[int(torch.argmin(errors))])
        remove(weight, hinv, groups[pick].to(weight.device))
        alive[pick] = False
        removed.append(pick)
    return removed


def channel_group_sizes(n_remove: int) -> list[int]:
    """SlimGPT's dynamic group sizes for MLP channels: a large first group that shrinks, then groups of 64 (at most
    1024 at a time), so that the errors are recomputed more often as the remaining channels get more important."""
    sizes, b, left = [], (n_remove - 512) // 2, n_remove
    while left > 0:
        count = min(left, max(b, 64), 1024)
        sizes.append(count)
        left -= count
        b = (b - 512) // 2
    return sizes


def prune_columns(weight: torch.Tensor, hinv: torch.Tensor, n_remove: int) -> list[int]:
    """Remove `n_remove` single columns in SlimGPT's shrinking groups, each group the columns of least error
    ||W_:j||^2 / Hinv_jj among those alive. Returns the removed columns."""
    alive = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed: list[int] = []
    for size in channel_group_sizes(n_remove):
        diag = hinv.diagonal()
        errors = weight.pow(2).sum(0) / torch.where(alive, diag, torch.ones_like(diag))
        errors[~alive] = math.inf
        picked = torch.topk(errors, size, largest=False).indices
        remove(weight, hinv, picked)
        alive[picked] = False
        removed += picked.tolist()
    return removed
