"""Which weights form an attention head and an MLP channel, and how many parameters each one holds.

Head h of a layer = rows h of q_proj (and of k_proj, v_proj without GQA) and columns h of o_proj.
With GQA the reference scores and prunes QUERY heads (`gqa_mode=query`): only q rows and o columns belong to a head;
K/V stay. With `gqa_mode=group` the prunable attention unit is one KV head with all its query heads: the unit's
q rows, k and v rows and o columns go together, so pruning it shrinks the KV cache.
Channel j = row j of gate_proj and up_proj and column j of down_proj.

Masks always hold one bit per QUERY head (L, H); scores and rankings work on units (L, n_units): a unit is
`group_size` consecutive query heads (1 in query mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gisp.errors import GispError
from gisp.models.families import FamilySpec, check_config, get_submodule, projection

GQA_MODES = ("query", "group")


@dataclass(frozen=True)
class LayerModules:
    """The projections of one decoder layer (a plain MLP, Phi-2's or OPT's, has no gate: channel j is row j of up
    and column j of down)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear

    @property
    def channel_rows(self) -> list[nn.Linear]:
        """The projections whose ROWS are the MLP channels (gate and up, or up alone)."""
        return [m for m in (self.gate, self.up) if m is not None]

    @property
    def all(self) -> list[nn.Linear]:
        return [m for m in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down) if m is not None]


@dataclass(frozen=True)
class ModelStructure:
    """Shapes and parameter accounting of a decoder, shared by scoring, planning and sparsity measurement."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    head_params: int  # parameters a pruned head unit zeroes (q rows + o columns, + k/v rows without GQA or in
    # group mode, + biases)
    channel_params: int  # gate row + up row + down column (+ biases)
    decoder_params: int  # all parameters of all decoder layers, norms included (the sparsity denominator)
    protected: tuple[int, ...]
    group_size: int = 1  # query heads per prunable head unit: 1 (query mode, or no GQA), H / KV in group mode

    @property
    def n_units(self) -> int:
        """Prunable attention units per layer: query heads (query mode) or KV groups (group mode)."""
        return self.n_heads // self.group_size

    @property
    def gqa_mode(self) -> str:
        return "group" if self.group_size > 1 else "query"

    @property
    def kv_in_unit(self) -> bool:
        """Whether a unit owns k/v rows: without GQA (each head has its own) and in group mode."""
        return self.n_units == self.n_kv_heads

    @property
    def head_norm_params(self) -> int:
        """The parameter count block-wise normalization divides a unit's score by: the reference's 4 d_h d for a
        head (also with GQA, where it is 2 d_h d in fact); (2 g + 2) d_h d for a group of g query heads."""
        per_head = 4 if self.group_size == 1 else 2 * self.group_size + 2
        return per_head * self.head_dim * self.hidden

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    @property
    def n_structures(self) -> int:
        """Head units and channels of ALL layers: the reference's denominator for the structural ratio."""
        return self.n_layers * (self.n_units + self.ffn)

    @property
    def gated(self) -> bool:
        """Whether a channel has a gate row (SwiGLU / GeGLU) or not (a plain MLP: up and down only); per-channel
        biases are 1 parameter per projection, less than `hidden`, so the quotient counts the weight rows."""
        return self.channel_params // self.hidden >= 3

    @property
    def unprotected(self) -> list[int]:
        return [i for i in range(self.n_layers) if i not in self.protected]

    @property
    def max_sparsity(self) -> float:
        """Sparsity with every head and channel of every unprotected layer pruned (unreachable in practice)."""
        per_layer = self.n_units * self.head_params + self.ffn * self.channel_params
        return len(self.unprotected) * per_layer / self.decoder_params


def protected_layers(
    n_layers: int, first_fraction: float = 0.1, last: int = 1, explicit: list[int] | None = None
) -> tuple[int, ...]:
    """The reference's `prune_skip`: the first int(0.1 L) layers and the last layer; or an explicit list."""
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < n_layers]
        if bad:
            raise GispError(f"prune.protect_layers has layer indices {bad} outside [0, {n_layers})")
        return tuple(sorted(set(explicit)))
    if not 0.0 <= first_fraction < 1.0 or last < 0:
        raise GispError(f"prune.protect_first_fraction must be in [0, 1) and protect_last >= 0, "
                        f"got {first_fraction} and {last}")
    first = list(range(int(first_fraction * n_layers)))
    tail = list(range(max(n_layers - last, 0), n_layers))
    return tuple(sorted(set(first + tail)))


def layer_modules(model: nn.Module, spec: FamilySpec) -> list[LayerModules]:
    layers = get_submodule(model, spec.layers)
    out = []
    for layer in layers:
        attn, mlp = get_submodule(layer, spec.attention), get_submodule(layer, spec.mlp)
        out.append(
            LayerModules(
                q=projection(attn, spec.q_proj, spec.fused_qkv), k=projection(attn, spec.k_proj, spec.fused_qkv),
                v=projection(attn, spec.v_proj, spec.fused_qkv), o=get_submodule(attn, spec.o_proj),
                gate=projection(mlp, spec.gate_proj, spec.fused_gate_up) if spec.gate_proj else None,
                up=projection(mlp, spec.up_proj, spec.fused_gate_up), down=get_submodule(mlp, spec.down_proj),
            )
        )
    return out


def _bias_size(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else 1


def describe(model: nn.Module, protected: tuple[int, ...] | None = None, gqa_mode: str = "query",
             **protect_kwargs) -> ModelStructure:
    """Read the structure of a HF causal LM from its config and modules (checked against each other).

    `gqa_mode`: `query` (the reference: a head is one query head) or `group` (one KV head with its query heads)."""
    if gqa_mode not in GQA_MODES:
        raise GispError(f"prune.gqa_mode={gqa_mode!r} is not one of {GQA_MODES}: query prunes query heads (the "
                        "reference), group prunes whole KV groups (K/V rows too, the KV cache shrinks)")
    config = model.config
    spec = check_config(config.model_type, config)
    n_heads = getattr(config, spec.n_heads_attr)
    n_kv = getattr(config, spec.n_kv_heads_attr, None) or n_heads
    hidden = getattr(config, spec.hidden_attr)
    head_dim = getattr(config, spec.head_dim_attr, None) or hidden // n_heads
    ffn = getattr(config, spec.ffn_attr)
    n_layers = getattr(config, spec.n_layers_attr)
    mods = layer_modules(model, spec)
    for i, m in enumerate(mods):
        shapes = (m.q.weight.shape, m.k.weight.shape, m.o.weight.shape, m.up.weight.shape, m.down.weight.shape)
        expected = ((n_heads * head_dim, hidden), (n_kv * head_dim, hidden), (hidden, n_heads * head_dim),
                    (ffn, hidden), (hidden, ffn))
        if tuple(tuple(s) for s in shapes) != expected:
            raise GispError(f"layer {i} has projection shapes {shapes}, expected {expected} from the config: "
                            "is this model already physically pruned? Prune the dense model instead.")
    m0 = mods[0]
    group_size = n_heads // n_kv if gqa_mode == "group" else 1
    # what a pruned head unit removes: its o columns, and its q rows, except where the q / k norm runs over the
    # whole projection (OLMo 2): the pruned heads' q / k rows then stay for that statistic (gisp.compact keeps
    # them), so they are not counted as removed
    statistic_rows = spec.qk_norm_scope == "projection"
    head_params = group_size * hidden * head_dim
    if not statistic_rows:
        head_params += group_size * head_dim * (hidden + _bias_size(m0.q))
    if n_kv == n_heads or gqa_mode == "group":  # the unit's own K and V rows go with it
        head_params += head_dim * (hidden + _bias_size(m0.v))
        if not statistic_rows:
            head_params += head_dim * (hidden + _bias_size(m0.k))
    channel_params = hidden * (1 + len(m0.channel_rows)) + sum(_bias_size(m) for m in m0.channel_rows)
    layers = get_submodule(model, spec.layers)
    decoder_params = sum(p.numel() for p in layers.parameters())
    if protected is None:
        protected = protected_layers(n_layers, **protect_kwargs)
    return ModelStructure(n_layers, n_heads, n_kv, head_dim, hidden, ffn, head_params, channel_params,
                          decoder_params, tuple(protected), group_size)
