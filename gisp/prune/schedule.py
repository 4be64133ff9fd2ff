"""Iterative pruning schedules: pure functions from step index to the structural fraction pruned so far.

The reference (method.md section 3) uses r_k = (k-1)/(n-1) * R for k = 1..n, whose first step prunes nothing.
Here step k of n prunes up to r_k = shape(k/n) * R, so every scoring pass prunes; `steps=n-1` here reproduces the
reference's ratios for `n` there exactly (the reference's dense first pass is skipped).
"""

from __future__ import annotations

import math

from gisp.errors import GispError

SCHEDULES = ("linear", "cosine", "exponential")


def schedule_fraction(kind: str, t: float, rate: float = 3.0) -> float:
    """Shape of the schedule in [0, 1] at progress t in [0, 1] (shape(0) = 0, shape(1) = 1).

    linear: t. cosine: (1 - cos(pi t)) / 2, small steps at both ends. exponential: front-loaded
    (1 - e^{-rate t}) / (1 - e^{-rate}): large steps while the model is dense, finer steps at high sparsity.
    """
    if kind == "linear":
        return t
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * t)) / 2.0
    if kind == "exponential":
        return (1.0 - math.exp(-rate * t)) / (1.0 - math.exp(-rate))
    raise GispError(f"unknown schedule '{kind}'; choose one of {SCHEDULES} (schedule=linear)")


def structural_ratios(kind: str, steps: int, max_ratio: float, rate: float = 3.0) -> list[float]:
    """Fraction of ALL heads and channels (protected layers included) pruned after each of `steps` steps."""
    if steps < 1:
        raise GispError(f"schedule.steps must be >= 1, got {steps}")
    if not 0.0 < max_ratio <= 1.0:
        raise GispError(f"schedule.max_ratio must be in (0, 1], got {max_ratio}")
    return [max_ratio * schedule_fraction(kind, k / steps, rate) for k in range(1, steps + 1)]


def structures_to_prune(ratio: float, n_structures: int) -> int:
    """How many structures a structural ratio means (floor, robust to float noise like 0.7*10 = 6.999...)."""
    return math.floor(ratio * n_structures + 1e-6)


def ratio_at(ratios: list[float], k: int) -> float:
    """Structural ratio of step k (1-based). Past the schedule's end (a target it does not reach) the last step
    size repeats, up to 1.0, so the run always reaches its largest target instead of failing after hours."""
    if k <= len(ratios):
        return ratios[k - 1]
    last_step = ratios[-1] - (ratios[-2] if len(ratios) > 1 else 0.0)
    return min(1.0, ratios[-1] + (k - len(ratios)) * max(last_step, 1e-3))
