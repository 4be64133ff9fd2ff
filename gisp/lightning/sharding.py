"""Fully sharded scoring: FSDP2 through Lightning's own ModelParallelStrategy, scores from each process's shards.

`trainer=fsdp` selects `ShardedScoring` (registered with Lightning as `strategy: gisp_fsdp`): Lightning's
ModelParallelStrategy used as pure data parallelism (a 1-D mesh over every process of every node, no tensor
parallelism). The scoring pass's `configure_model` hook calls `shard_model`, which applies `fully_shard` to every
decoder layer (the wrapping policy is the decoder layer class, `type(layers[0])` of the family registry's layer
list: no per-model code) and then to the root (embeddings, final norm, lm_head). Weights and accumulated gradients
are row-sharded (`Shard(0)`) over all processes; each backward reduce-scatters the new gradient into the shards
as a SUM (divide factor 1), so after one pass every shard holds the gradient of the whole calibration objective.

Scores never gather a gradient: `partial_scores` turns each process's rows of |W * g| into partial sums per head
and per channel (row sums placed at the shard's row offset, column sums over the local rows), and ONE all-reduce
of the small (L, heads) and (L, channels) vectors gives every process the same scores, hence the same masks.

Why ModelParallelStrategy and not Lightning's FSDPStrategy (FSDP1): FSDPStrategy refuses any accelerator but CUDA,
so the sharded path could not be tested on CPU (gloo); FSDP2 runs on CPU and keeps each parameter's
`requires_grad` (only the scored weights need gradients).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from gisp.errors import GispError
from gisp.models.families import get_submodule
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.importance import taylor_sums

log = logging.getLogger(__name__)

STRATEGY_NAME = "gisp_fsdp"


class ShardedScoring(ModelParallelStrategy):
    """ModelParallelStrategy with data_parallel_size = all processes, tensor_parallel_size = 1: the device mesh of
    FSDP2. The LightningModule shards itself in `configure_model` (see `shard_model`)."""

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = None):
        kwargs = {"timeout": timeout} if timeout is not None else {}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        # Known only now (after Lightning resolved devices and nodes): every process is one data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(STRATEGY_NAME, ShardedScoring,
                              description="gisp: fully sharded scoring (FSDP2, one data-parallel mesh dimension)")


def is_sharded(strategy) -> bool:
    """Whether a Lightning strategy shards the model (every process must then run the same number of batches)."""
    return isinstance(strategy, ModelParallelStrategy)


def decoder_layers(model: nn.Module, layers_path: str) -> nn.ModuleList:
    return get_submodule(model, layers_path)


def shard_model(model: nn.Module, layers_path: str, mesh, reduce_dtype: torch.dtype | None = None) -> bool:
    """`fully_shard` every decoder layer (class `type(layers[0])`), then the root; gradients reduce as sums.
    Returns False when the model was sharded already (Lightning calls `configure_model` at every pass)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return False
    layers = decoder_layers(model, layers_path)
    layer_class = type(layers[0])
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for module in model.modules():
        if isinstance(module, layer_class):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sums: the weighted objective is already a mean
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; factor 1: no divide)
    log.info("sharded %d %s layers and the root over %d processes", len(layers), layer_class.__name__, mesh.size())
    return True


def full_state_on_rank0(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Rank 0's full weights, kept (by reference, no copy) across sharding; the other ranks keep nothing."""
    return dict(model.state_dict()) if rank == 0 else {}


def materialize_empty(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized) memory for the shards of a model built on the meta device, before Lightning would:
    its `reset_parameters` draws random DTensor values, a collective that only the empty processes would enter
    (rank 0 holds real weights), and the values are overwritten from rank 0 anyway."""
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)


def load_shards_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Every process's shards from rank 0's full weights, one tensor at a time (torch.distributed.checkpoint's
    broadcast_from_rank0), then every buffer (rotary frequencies are not in the state dict; a process that built
    its model on the meta device holds uninitialized memory there)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        full_state = {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    log.info("shards of the weights received from rank 0")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """(first global row, number of rows) of this process's shard of a row-sharded weight (torch.chunk layout, as
    FSDP2 shards: chunks of ceil(R / world), the last ones shorter or empty)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return 0, p.shape[0]
    if tuple(p.placements) != (Shard(0),):
        raise GispError(f"sharded scoring expects row-sharded weights (Shard(0)), got {p.placements}")
    mesh = p.device_mesh
    chunk = math.ceil(p.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * chunk, p.shape[0])
    rows = local(p).shape[0]
    if rows != max(min(chunk, p.shape[0] - start), 0):
        raise GispError(f"unexpected shard of {tuple(p.shape)}: {rows} rows at offset {start}")
    return start, rows


GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]


def partial_layer_scores(layer: LayerModules, structure: ModelStructure, grad_of: GradOf
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the raw per-unit (n_units,) and per-channel (F,) sums of |W * g| of one layer: summed
    over processes they are gisp.prune.importance.layer_scores."""
    U, d_h = structure.n_units, structure.head_dim
    w = structure.group_size * d_h  # q rows / o columns of one unit

    def sums(linear: nn.Linear, dim: int) -> torch.Tensor:  # |W * g| of this process's rows, summed over `dim`
        g = grad_of(linear.weight)
        return taylor_sums(local(linear.weight), None if g is None else local(g), dim)

    def rows(linear: nn.Linear) -> torch.Tensor:  # (R,): row sums at this shard's rows, zeros elsewhere
        s = sums(linear, 1)
        start, n = row_range(linear.weight)
        out = torch.zeros(linear.weight.shape[0], dtype=torch.float32, device=s.device)
        out[start:start + n] = s
        return out

    def cols(linear: nn.Linear) -> torch.Tensor:  # (C,): column sums over this shard's rows
        return sums(linear, 0)

    heads = rows(layer.q).view(U, w).sum(dim=1) + cols(layer.o).view(U, w).sum(dim=1)
    if structure.kv_in_unit:
        heads += rows(layer.k).view(U, d_h).sum(dim=1) + rows(layer.v).view(U, d_h).sum(dim=1)
    channels = sum(rows(m) for m in layer.channel_rows) + cols(layer.down)  # (F,)
    return heads, channels


def sharded_scores(layers: list[LayerModules], structure: ModelStructure, normalization: str, grad_of: GradOf,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized scores (L, n_units), (L, F) from local shards: partial sums, ONE all-reduce (sum) of the packed
    score vectors, protected layers +inf, then the block-wise normalization of gisp.prune.importance."""
    from gisp.prune.importance import normalize

    L, U, F = structure.n_layers, structure.n_units, structure.ffn
    heads = torch.zeros(L, U, dtype=torch.float32, device=device)
    channels = torch.zeros(L, F, dtype=torch.float32, device=device)
    for i in structure.unprotected:
        h, c = partial_layer_scores(layers[i], structure, grad_of)
        heads[i], channels[i] = h.to(device), c.to(device)
    packed = all_reduce(torch.cat([heads.flatten(), channels.flatten()]))  # (L*U + L*F,)
    heads, channels = packed[: L * U].view(L, U).cpu(), packed[L * U:].view(L, F).cpu()
    protected = list(structure.protected)
    heads[protected] = float("inf")
    channels[protected] = float("inf")
    return normalize(heads, channels, structure, normalization)
