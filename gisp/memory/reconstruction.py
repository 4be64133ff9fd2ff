"""The memory plan of a level's least-squares reconstruction (gisp.reconstruct.layerwise), from the model's config:

    weights          P w                      the dense model (the refits replace one layer's o / down at a time)
    streams          N d w (dense: 2 N d w)   the pruned (and with target=dense the dense) hidden states of the tokens
    targets          2 B T d w (dense: 2 N d w)  the fit's targets: one batch's unpruned block outputs (local), or one
                                             layer's dense o_proj and down_proj outputs for every token (dense)
    layer inputs     N max(H d_h, F) w        one block's recorded inputs of one batch at a time: B T x that
    statistics       4 (F^2 + d F) (+ H d_h)  one block's Gram matrices in float32, solved in float64 (x 2)
    reserve          1 GiB

N = reconstruct.tokens, B T one batch's tokens, d hidden, F the MLP width, w the weights' bytes. Time: about three
forward passes over N tokens per level (two to collect each block's statistics, one to move the pruned stream on;
target=dense adds the dense pass); `bias` needs one. Measured figures: experiments/reconstruction/README.md.
"""

from __future__ import annotations

from typing import Any

from gisp.memory.scoring import RESERVE, GiB
from gisp.models.structure import ModelStructure


def reconstruction_plan(structure: ModelStructure, params: int, dtype_bytes: int, tokens: int, batch_tokens: int,
                        method: str, target: str = "local") -> dict[str, Any]:
    """Bytes per device of one level's reconstruction (the largest block's statistics), and its forward passes."""
    local = target == "local"
    d, w = structure.hidden, dtype_bytes
    width = max(structure.n_heads * structure.head_dim, structure.ffn)
    rows = {"weights": params * w}
    if method == "lsq":
        rows |= {"streams": (1 if local else 2) * tokens * d * w,
                 "targets": 2 * (batch_tokens if local else tokens) * d * w,
                 "layer inputs": batch_tokens * width * w,
                 "statistics": 4 * (width * width + d * width) + 8 * (width * width + d * width)}
    rows["reserve"] = RESERVE
    return {"method": method, "device_bytes": rows, "device_total_bytes": sum(rows.values()),
            "forward_passes_per_level": (3 if local else 4) if method == "lsq" else 1, "tokens": tokens}


def plan_table(plan: dict[str, Any]) -> str:
    head = (f"reconstruction memory plan ({plan['method']}, {plan['tokens']} tokens, about "
            f"{plan['forward_passes_per_level']} forward passes of them per level)")
    lines = [head, "| per device | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / GiB:.3f} |" for k, v in plan["device_bytes"].items()]
    lines.append(f"| **total** | **{plan['device_total_bytes'] / GiB:.3f}** |")
    return "\n".join(lines)
