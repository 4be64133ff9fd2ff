"""The memory plan of a recovery, before anything loads: bytes per device of one training step, from the model's
config and the levels' masks alone (gisp.memory.shapes builds the model on the meta device). `s` is a recovery's
settings (gisp.recovery.settings.RecoverSettings).

    dense model       P w                        the teacher (distill, nested) or the source of the student (lora)
    teacher copy      P w                        nested with every weight trained: a frozen copy of the dense model
    student copies    S w                        the level's sliced projections (LoRA students share the embeddings
                                                 and norms with the dense model); every weight of the compact model
                                                 when all of it trains (recover.adapter=none)
    trainable         N t                        LoRA: r (in + out) per adapted projection of the level, float32 (t=4,
                                                 peft keeps adapters in float32); adapter=none: every student weight
    gradients         N t
    optimizer         2 N t                      AdamW's two moments
    activations       B T sum_layers a(layer)    as the scoring pass (gisp.memory.scoring), with the level's heads and
                                                 channels, + per adapted projection its dropped-out input and r
                                                 floats of LoRA's first product; nested: the dense layers
    logits chunk      B c V 4 x 6                a chunk of student and teacher logits, their softmaxes, the gradient
    reserve           1 GiB

Measured against the real tensors on tiny models (tests/recovery/test_training_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gisp.compact.slicing import kv_plan
from gisp.errors import GispError
from gisp.memory.scoring import RESERVE, GiB
from gisp.memory.shapes import meta_structure, model_config
from gisp.models.spec import DTYPES
from gisp.models.structure import ModelStructure
from gisp.prune.masks import Masks

ADAPTER_BYTES = 4  # peft keeps LoRA weights in float32 whatever the base weights' dtype


@dataclass
class TrainingPlan:
    model: str
    method: str
    level: str
    device: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.device.values())

    def table(self) -> str:
        rows = [f"| {k} | {v / GiB:.3f} |" for k, v in self.device.items()]
        return "\n".join([f"training memory plan: {self.model}, recover={self.method}, level {self.level}",
                          "| per device | GiB |", "|---|---|", *rows, f"| **total** | **{self.total / GiB:.3f}** |"])

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "level": self.level, "device_bytes": dict(self.device),
                "device_total_bytes": self.total, "counts": dict(self.counts)}


def level_shapes(masks: Masks, structure: ModelStructure) -> list[tuple[int, int, int]]:
    """Per layer (kept query heads, kept KV heads, kept channels) of a level's compact model."""
    out = []
    for i in range(structure.n_layers):
        kept_q = masks.heads[i].nonzero().flatten().tolist()
        out.append((len(kept_q), len(kv_plan(kept_q, structure)[0]), int(masks.channels[i].sum())))
    return out


def adapted_shapes(shapes: list[tuple[int, int, int]], structure: ModelStructure, targets: tuple[str, ...]
                   ) -> list[tuple[int, int]]:
    """(in, out) of every projection LoRA adapts in a model of these per-layer shapes (absent blocks have none)."""
    d, dh = structure.hidden, structure.head_dim
    out = []
    for q, kv, f in shapes:
        dims = {"q": (d, q * dh), "k": (d, kv * dh), "v": (d, kv * dh), "o": (q * dh, d),
                "gate": (d, f), "up": (d, f), "down": (f, d)}
        for name in targets:
            if name == "gate" and not structure.gated:  # a plain MLP (Phi-2, OPT) has no gate to adapt
                continue
            block = f if name in ("gate", "up", "down") else q
            if block:
                out.append(dims[name])
    return out


def training_plan(name: str, structure: ModelStructure, counts: dict[str, int], dtype_bytes: int,
                  s, masks: Masks | None, level: str) -> TrainingPlan:
    """The plan of one fit: a level's compact student (`masks`), or the nested student (dense shapes)."""
    w, B, T = dtype_bytes, s.batch_size, s.seq_len
    nested = s.method == "nested"
    shapes = [(structure.n_heads, structure.n_kv_heads, structure.ffn)] * structure.n_layers if nested or \
        masks is None else level_shapes(masks, structure)
    root = counts["params"] - structure.decoder_params  # embeddings, final norm, lm_head
    norms = structure.hidden * sum(bool(q) + bool(f) for q, _, f in shapes)  # a removed block has no norm
    sliced = sum(i * o for i, o in adapted_shapes(shapes, structure, ("q", "k", "v", "o", "gate", "up", "down")))
    student_params = sliced + norms + root  # the level's compact model (biases left out: a rounding error)
    device = {"dense model": counts["params"] * w}
    if nested and s.adapter == "none":
        device["teacher copy"] = counts["params"] * w
    if not nested:  # the sliced projections, + the rest when all of it trains
        device["student copies"] = (student_params if s.adapter == "none" else sliced) * w
    adapted = adapted_shapes(shapes, structure, s.lora.targets)
    if s.adapter == "lora":
        trainable, t = sum(s.lora.rank * (i + o) for i, o in adapted), ADAPTER_BYTES
    else:
        trainable, t = (counts["params"] if nested else student_params), w
    device["trainable"] = trainable * t
    device["gradients"] = trainable * t
    device["optimizer (AdamW)"] = 2 * trainable * t
    per_token = sum(_layer_activation(structure, q, kv, f, w) for q, kv, f in shapes)
    if s.adapter == "lora":
        per_token += sum(i * w + s.lora.rank * ADAPTER_BYTES for i, _ in adapted)
    device["activations"] = B * T * per_token
    device["logits chunk"] = B * min(s.chunk, T) * counts["vocab"] * 4 * 6
    device["reserve"] = RESERVE
    plan_counts = {"trainable_params": trainable, "student_params": student_params, "adapted_projections":
                   len(adapted), "activation_bytes_per_token": per_token}
    return TrainingPlan(name, s.method, level, device, plan_counts)


def _layer_activation(structure: ModelStructure, q: int, kv: int, f: int, w: int) -> int:
    """What one layer with q query heads, kv KV heads and f channels keeps for backward per token: gisp.memory.scoring's
    per-layer estimate (float32 norm input + norm output, q, k, v, attention output and the masked o input; SwiGLU's
    gate, activation, up and down input), each block counted only when the level keeps it."""
    d, dh = structure.hidden, structure.head_dim
    attention = w * (d + 3 * q * dh + 2 * kv * dh) + 4 * d + 4 * q if q else 0
    mlp = w * (d + 4 * f) + 4 * d if f else 0
    return attention + mlp + (8 if q or f else 0)


def peak(plans: list[TrainingPlan]) -> TrainingPlan:
    return max(plans, key=lambda p: p.total)


def fits(plan: TrainingPlan, device_memory: int | None, headroom: float = 0.95) -> str | None:
    """None when the plan fits `device_memory` bytes (or there is nothing to check), else why not and what helps."""
    if device_memory is None or plan.total <= headroom * device_memory:
        return None
    biggest = max(plan.device, key=plan.device.get)
    advice = {"activations": "a smaller recover.batch_size (with recover.accumulate to keep the tokens per step) or "
                             "recover.seq_len",
              "optimizer (AdamW)": "recover.adapter=lora (a LoRA instead of every weight)",
              "dense model": "trainer=ddp does not shard the model: a GPU with more memory",
              "logits chunk": "a smaller recover.chunk"}.get(biggest, "recover.adapter=lora or a smaller batch")
    return (f"the recovery needs {plan.total / GiB:.1f} GiB per device ({biggest}: "
            f"{plan.device[biggest] / GiB:.1f} GiB), the devices have {device_memory / GiB:.1f} GiB "
            f"({headroom:.0%} usable); nothing was loaded. Try {advice}.\n{plan.table()}")


def plan_recovery(spec, settings, levels: dict[str, Masks | None], gqa_mode: str = "query"
                  ) -> TrainingPlan | None:
    """The peak plan over the fits of a recovery (one per level; one for nested), from the model's config alone
    (gisp.memory.shapes); a level without masks yet (gisp.run plans before pruning) is planned at the dense shapes, an
    upper bound. None when the model's shapes are unknown without loading it."""
    try:
        config = model_config(spec)
        structure, counts = meta_structure(config, DTYPES[spec.dtype], {}, gqa_mode)
    except GispError:
        return None
    w = DTYPES[spec.dtype].itemsize
    if settings.method == "nested":
        return training_plan(spec.name, structure, counts, w, settings, None, "nested")
    return peak([training_plan(spec.name, structure, counts, w, settings, masks, key)
                 for key, masks in levels.items()])
