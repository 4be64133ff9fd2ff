"""How fast a scoring pass ran: tokens/s of the whole pass and, on a GPU of known peak, the model FLOPs utilization
(MFU) from the pass's FLOP count per token."""

from __future__ import annotations

import torch
from torch import nn

from gisp.models.structure import ModelStructure

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name (vendor data sheets), for the MFU.
PEAK_FLOPS_16BIT = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                    ("A100", 312e12), ("L40S", 362e12), ("A6000", 154.8e12), ("A10", 125e12), ("L4", 121e12))


def scoring_flops_per_token(structure: ModelStructure, vocab: int, seq_len: int) -> float:
    """Model FLOPs per token of one scoring pass: forward through every layer, backward (input gradients) from the
    loss down to the first unprotected layer, weight gradients of the scored weights only; attention counted as in
    PaLM (no causal halving)."""
    d, H, K, d_h, F = structure.hidden, structure.n_heads, structure.n_kv_heads, structure.head_dim, structure.ffn
    per_layer = d * (2 * H * d_h + 2 * K * d_h) + 3 * d * F  # q, k, v, o, gate, up, down
    first = min(structure.unprotected) if structure.unprotected else structure.n_layers
    backprop = structure.n_layers - first
    scored = len(structure.unprotected) * (d * (2 * H * d_h + (2 * K * d_h if structure.kv_in_unit else 0)) + 3 * d * F)
    attention = 4 * H * d_h * seq_len  # QK^T and AV, forward, per layer
    forward = 2 * (structure.n_layers * per_layer + vocab * d) + structure.n_layers * attention
    backward = 2 * (backprop * per_layer + vocab * d) + 2 * backprop * attention + 2 * scored
    return float(forward + backward)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense 16-bit tensor-core peak FLOP/s of a known GPU (None: unknown GPU or a 32-bit model)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key, value in PEAK_FLOPS_16BIT:
        if key in device_name:
            return value
    return None


def throughput(tokens: int, seconds: float, structure: ModelStructure, model: nn.Module, world_size: int,
               device: torch.device, seq_len: int) -> dict[str, float | None]:
    """tokens/s of the whole pass (all processes) and, on a GPU of known peak, the model FLOPs utilization
    (`seq_len`: the mean sequence length, for the attention FLOPs). The FLOPs are the dense model's (`structure`),
    so a pass on a compact model (prune.compact) reports its dense-equivalent utilization: the speed-up shows in it."""
    per_s = tokens / max(seconds, 1e-9)
    mfu = None
    if device.type == "cuda":
        dtype = next(model.parameters()).dtype
        peak = peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak:
            flops = scoring_flops_per_token(structure, model.config.vocab_size, seq_len)
            mfu = per_s * flops / (world_size * peak)
    return {"tokens_per_s": round(per_s, 2), "mfu": None if mfu is None else round(mfu, 4),
            "seconds": round(seconds, 3), "tokens": tokens}
