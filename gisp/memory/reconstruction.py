"""The memory plan of a level's least-squares reconstruction (gisp.reconstruct.layerwise), from the model's config:

    weights          P w                      the dense model (the refits replace one layer's o / down at a time)
    streams          2 N d w                  the dense and the pruned hidden states of every reconstruction token
    targets          2 N d w                  one layer's dense o_proj and down_proj outputs (the fit's targets)
    layer inputs     N max(H d_h, F) w        one block's recorded inputs of one batch at a time: B T x that
    statistics       4 (F^2 + d F) (+ H d_h)  one block's Gram matrices in float32, solved in float64 (x 2)
    reserve          1 GiB

N = reconstruct.tokens, d hidden, F the MLP width, w the weights' bytes. Time: about four forward passes over N tokens
per level (a dense pass, two passes to collect each block's statistics, one to move the pruned stream on); `bias`
needs one. Measured figures: experiments/reconstruction/README.md.
"""

from __future__ import annotations

from typing import Any

from gisp.memory.scoring import RESERVE, GiB
from gisp.models.structure import ModelStructure


def reconstruction_plan(structure: ModelStructure, params: int, dtype_bytes: int, tokens: int, batch_tokens: int,
                        method: str) -> dict[str, Any]:
    """Bytes per device of one level's reconstruction (the largest block's statistics), and its forward passes."""
    d, w = structure.hidden, dtype_bytes
    width = max(structure.n_heads * structure.head_dim, structure.ffn)
    rows = {"weights": params * w}
    if method == "lsq":
        rows |= {"streams": 2 * tokens * d * w, "targets": 2 * tokens * d * w,
                 "layer inputs": batch_tokens * width * w,
                 "statistics": 4 * (width * width + d * width) + 8 * (width * width + d * width)}
    rows["reserve"] = RESERVE
    return {"method": method, "device_bytes": rows, "device_total_bytes": sum(rows.values()),
            "forward_passes_per_level": 4 if method == "lsq" else 1, "tokens": tokens}


def plan_table(plan: dict[str, Any]) -> str:
    head = (f"reconstruction memory plan ({plan['method']}, {plan['tokens']} tokens, about "
            f"{plan['forward_passes_per_level']} forward passes of them per level)")
    lines = [head, "| per device | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / GiB:.3f} |" for k, v in plan["device_bytes"].items()]
    lines.append(f"| **total** | **{plan['device_total_bytes'] / GiB:.3f}** |")
    return "\n".join(lines)
