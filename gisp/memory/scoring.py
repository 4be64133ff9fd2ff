"""The memory plan of a scoring pass, before loading: bytes per device, from the model's config alone.

    python -m gisp.plan model=llama2_70b trainer=fsdp trainer.devices=8 [device_memory_gb=80]

The plan builds the model on the meta device (no weights) from its config (gisp.memory.shapes: a local folder's
config.json, the `shape` of the model's YAML for the hub and GGUF models of conf/model, so it works offline, or the
hub's config.json); `gisp.models.structure.describe` then gives the protected layers and the scored weights exactly
as the pass will see them. Per device (batch B per process, sequence T, weight dtype w bytes, N processes):

    weights      P w                         fsdp: P w / N, plus the gathered root (embeddings, final norm,
                                             lm_head, never resharded) and 2 gathered decoder layers (prefetch)
    gradients    S w   (plain)               S = scored weights (q, o, gate, up, down, + k, v without GQA) of
                 S 4   (grad_dtype float32)  the unprotected layers; fsdp: / N. grad_offload: nothing resident,
                 0     (grad_offload=cpu)    S 4 / N in host memory per process
    in flight    one weight's gradient (single, ddp), one layer's (fsdp: unsharded before reduce-scatter)
    activations  B T a_layer L_bp            L_bp = layers from the first unprotected one up (no graph below);
                                             a_layer = w (2d + 3 H d_h + 2 K d_h + 4F) + 8d + 4H + 8 bytes/token:
                                             norm inputs in float32, their outputs, q, k, v and the attention
                                             output kept by SDPA (flash / memory-efficient, no T^2 term), the
                                             masked o input (a copy once heads are masked), SwiGLU's gate, act, up
                                             and down input. Measured with saved-tensor hooks on masked tiny
                                             models: 95% of this (tests/test_plan.py)
                 checkpointing: B T (w d L_bp + a_layer) (layer inputs + one layer recomputed)
    compact      prune.compact: 0 on the device. Lightning leaves the model in host memory between passes, so
                 each compact model is sliced there (+ D w on the host per process, D = the decoder layers'
                 parameters: the first compact step's copy at most) and moved to the device for its pass alone
    logits       B T V (w + 12)              logits, their float32 copy and log-softmax, its gradient
    reserve      1 GiB                       CUDA context and allocator slack

Pure functions above gisp.models and gisp.prune.importance (which weights are scored); the command line
(gisp.plan) alone reads the Hydra config.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from gisp.errors import GispError
from gisp.memory.shapes import meta_structure, model_config
from gisp.models.spec import DTYPES, ModelSpec
from gisp.models.structure import ModelStructure

log = logging.getLogger(__name__)

GiB = 2**30
RESERVE = 1 * GiB  # CUDA context + allocator slack per device
HEADROOM = 0.95  # a plan fits when its total is at most this fraction of the device memory
STRATEGIES = ("single", "ddp", "fsdp")
SHARDED_STRATEGY = "gisp_fsdp"  # gisp.lightning.sharding.STRATEGY_NAME (not imported: Lightning is heavy)

@dataclass(frozen=True)
class PlanInputs:
    strategy: str  # single | ddp | fsdp
    devices: int  # processes in all (devices per node x nodes)
    devices_per_node: int
    dtype: str  # the weights'
    grad_dtype: str | None
    grad_offload: bool
    checkpointing: bool
    batch_size: int  # per process
    seq_len: int
    seq_len_source: str = "data.seq_len"
    attn_implementation: str | None = None
    compact: bool = False  # prune.compact: the passes after the first run on compact models


@dataclass
class ScoringPlan:
    model: str
    inputs: PlanInputs
    structure: ModelStructure = field(repr=False)
    counts: dict[str, int]
    device: dict[str, int]  # bytes per device, by row
    host: dict[str, int]  # bytes per node
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.device.values())

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": asdict(self.inputs), "counts": dict(self.counts),
                "device_bytes": dict(self.device), "device_total_bytes": self.total,
                "host_bytes_per_node": dict(self.host), "notes": list(self.notes)}

    def table(self) -> str:
        i = self.inputs
        head = (f"memory plan: {self.model}, {i.strategy} on {i.devices} device(s), weights {i.dtype}, gradients "
                f"{i.grad_dtype or i.dtype}{' offloaded to cpu' if i.grad_offload else ''}"
                f"{', checkpointing' if i.checkpointing else ''}, batch {i.batch_size} x {i.seq_len} tokens per "
                "process")
        rows = [f"| {k} | {v / GiB:.2f} |" for k, v in self.device.items()]
        host = [f"| host: {k} (per node) | {v / GiB:.2f} |" for k, v in self.host.items()]
        total = f"| **total** | **{self.total / GiB:.2f}** |"
        return "\n".join([head, "| per device | GiB |", "|---|---|", *rows, total, *host,
                          *(f"note: {n}" for n in self.notes)])


def activation_bytes_per_token(structure: ModelStructure, w: int, eager_seq_len: int | None = None) -> int:
    """Bytes one decoder layer keeps for backward per token (see the module docstring)."""
    d, H, K, d_h, F = structure.hidden, structure.n_heads, structure.n_kv_heads, structure.head_dim, structure.ffn
    out = w * (2 * d + 3 * H * d_h + 2 * K * d_h + 4 * F) + 8 * d + 4 * H + 8
    if eager_seq_len:  # eager attention keeps the (H, T) attention probabilities per token: float32 softmax + copy
        out += (4 + w) * H * eager_seq_len
    return out


def build_plan(name: str, structure: ModelStructure, counts: dict[str, int], inputs: PlanInputs) -> ScoringPlan:
    i = inputs
    if i.strategy not in STRATEGIES:
        raise GispError(f"plan strategy must be one of {STRATEGIES}, got {i.strategy!r}")
    w = DTYPES[i.dtype].itemsize
    shards = i.devices if i.strategy == "fsdp" else 1
    acc = 4 if (i.grad_offload and i.grad_dtype != "float64") else {None: w, "float32": 4, "float64": 8}[i.grad_dtype]
    device: dict[str, int] = {"weights": math.ceil(counts["params"] / shards) * w}
    if i.strategy == "fsdp":
        device["weights gathered (root + 2 layers)"] = (counts["root"] + 2 * counts["per_layer"]) * w
    scored = math.ceil(counts["scored"] / shards)
    device["gradients (resident)"] = 0 if i.grad_offload else scored * acc
    in_flight = counts["per_layer_scored"] if i.strategy == "fsdp" else counts["largest_scored"]
    device["gradients (in flight)"] = in_flight * w
    tokens = i.batch_size * i.seq_len
    first = min(structure.unprotected) if structure.unprotected else structure.n_layers
    backprop_layers = structure.n_layers - first
    eager = i.seq_len if i.attn_implementation == "eager" else None
    per_layer = activation_bytes_per_token(structure, w, eager)
    if i.checkpointing:
        device["activations"] = tokens * (w * structure.hidden * backprop_layers + per_layer)
    else:
        device["activations"] = tokens * per_layer * backprop_layers
    device["logits"] = tokens * counts["vocab"] * (w + 12)
    device["reserve"] = RESERVE
    # FSDP: rank 0 reads the weights and broadcasts the shards (the other processes build an empty model), so a node
    # holds one copy; DDP: every process loads the whole model before moving it to its device.
    loaders = 1 if i.strategy == "fsdp" else i.devices_per_node
    host = {"model load": loaders * counts["params"] * w}
    if i.grad_offload:
        host["gradient buffers"] = i.devices_per_node * scored * acc
    notes = []
    if loaders > 1:
        notes.append(f"each of the {loaders} processes of a node loads the whole model into host memory before it "
                     "moves it to its device (trainer=fsdp loads it once, on rank 0)")
    if i.seq_len_source != "data.seq_len":
        notes.append(f"sequence length {i.seq_len}: {i.seq_len_source}")
    if i.compact:
        host["compact model (sliced on the host)"] = i.devices_per_node * (counts["params"] - counts["root"]) * w
        notes.append("prune.compact: the passes after the first run on the last step's compact model, sliced from the "
                     "dense weights in host memory and moved to the device for its pass: the device holds one model "
                     "at a time, so the first, dense pass is its peak")
    counts = {**counts, "backprop_layers": backprop_layers, "activation_bytes_per_token_layer": per_layer}
    return ScoringPlan(name, inputs, structure, counts, device, host, notes)


def plan_model(spec: ModelSpec, inputs: PlanInputs, protect: dict[str, Any] | None = None,
               gqa_mode: str = "query") -> ScoringPlan:
    """The plan of one model spec (config only, meta device)."""
    config = model_config(spec)
    structure, counts = meta_structure(config, DTYPES[inputs.dtype], protect or {}, gqa_mode)
    return build_plan(spec.name, structure, counts, inputs)


# ---------------------------------------------------------------------------------------------------------------
# From run settings (gisp.config.RunSettings); the check


def _devices(value: Any, accelerator: str) -> int:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def inputs_from_settings(s) -> PlanInputs:
    """The plan's inputs from run settings (gisp.config.RunSettings)."""
    t = s.trainer or {}
    accelerator = str(t.get("accelerator", "auto"))
    per_node = _devices(t.get("devices", 1), accelerator)
    devices = per_node * int(t.get("num_nodes", 1) or 1)
    strategy_flag = str(t.get("strategy", "auto"))
    strategy = "fsdp" if strategy_flag == SHARDED_STRATEGY else ("ddp" if devices > 1 else "single")
    seq_len = getattr(s.calibration, "seq_len", None)
    source = "data.seq_len"
    if seq_len is None:
        seq_len, source = 512, "assumed upper bound for variable-length calibration data (prompt + answer)"
    return PlanInputs(strategy=strategy, devices=devices, devices_per_node=per_node, dtype=s.model.dtype,
                      grad_dtype=s.pruner.grad_dtype, grad_offload=s.prune.grad_offload == "cpu",
                      checkpointing=bool(s.prune.checkpointing), batch_size=s.calibration.batch_size, seq_len=seq_len,
                      seq_len_source=source, attn_implementation=s.model.attn_implementation,
                      compact=bool(s.prune.compact and s.pruner.iterative and strategy != "fsdp"))


def plan_for_run(s, quiet: bool = False) -> ScoringPlan | None:
    """The plan of a run, or None (logged unless `quiet`) when the pass needs no gradients or the model's shape is
    unknown."""
    if s.pruner.signal != "gradients":
        return None
    protect = {"explicit": list(s.prune.protect_layers) if s.prune.protect_layers is not None else None,
               "first_fraction": s.prune.protect_first_fraction, "last": s.prune.protect_last}
    try:
        return plan_model(s.model, inputs_from_settings(s), protect, s.prune.gqa_mode)
    except Exception as e:  # noqa: BLE001 (advisory: a model the plan cannot build on the meta device still runs)
        if not quiet:
            log.warning("no memory plan: %s", e if isinstance(e, GispError) else f"{type(e).__name__}: {e}")
        return None


def visible_device_memory(trainer: dict) -> int | None:
    """Bytes of the smallest visible GPU when the run will use GPUs; None on CPU (nothing to check)."""
    if str((trainer or {}).get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _alternatives(plan: ScoringPlan, budget: float) -> list[tuple[str, ScoringPlan]]:
    """Single changes of the settings (and the cheapest FSDP layout) with their plans."""
    structure, counts, i = plan.structure, plan.counts, plan.inputs
    options: list[tuple[str, PlanInputs]] = []
    if not i.grad_offload:
        options.append(("prune.grad_offload=cpu", replace(i, grad_offload=True)))
    if not i.checkpointing:
        options.append(("prune.checkpointing=true", replace(i, checkpointing=True)))
    if not i.grad_offload and not i.checkpointing:
        options.append(("prune.grad_offload=cpu prune.checkpointing=true",
                        replace(i, grad_offload=True, checkpointing=True)))
    for b in range(i.batch_size - 1, 0, -1):
        candidate = replace(i, batch_size=b)
        if build_plan(plan.model, structure, counts, candidate).total <= budget:
            options.append((f"data.batch_size={b}", candidate))
            break
    for n in (2, 4, 8, 16, 32, 64, 128):
        if i.strategy == "fsdp" and n <= i.devices:
            continue
        nodes = max(n // 8, 1)
        per_node = n // nodes
        candidate = replace(i, strategy="fsdp", devices=n, devices_per_node=per_node, compact=False)  # masked
        if build_plan(plan.model, structure, counts, candidate).total <= budget:
            where = f"trainer.devices={per_node}" + (f" trainer.num_nodes={nodes}" if nodes > 1 else "")
            options.append((f"trainer=fsdp {where} ({n} GPUs)", candidate))
            break
    return [(label, build_plan(plan.model, structure, counts, c)) for label, c in options]


def check_fits(plan: ScoringPlan, device_memory: int | None) -> None:
    """Raise a GispError BEFORE loading when the plan does not fit `device_memory` bytes per device (with
    HEADROOM), naming the settings that would fit; None device memory (CPU): nothing to check."""
    if device_memory is None:
        return
    budget = HEADROOM * device_memory
    if plan.total <= budget:
        return
    fitting = [(label, p) for label, p in _alternatives(plan, budget) if p.total <= budget]
    lines = [f"  {label}: {p.total / GiB:.1f} GiB per device" for label, p in fitting]
    fix = ("options that fit:\n" + "\n".join(lines)) if lines else "no single change fits; combine them (see the plan)"
    raise GispError(f"the scoring pass needs {plan.total / GiB:.1f} GiB per device, the devices have "
                    f"{device_memory / GiB:.1f} GiB ({HEADROOM:.0%} usable); nothing was loaded (the plan is logged "
                    f"above; `python -m gisp.plan ...` prints it).\n{fix}")
