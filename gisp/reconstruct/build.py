"""A level's reconstruction: its data, its computation (`bias` or `lsq`) and the artefact it gives.

A `Reconstruction` is data replayed on the dense weights, like the level's masks: per block that lost structures,
the new kept columns of its output projection (`weights`: "attn.{i}" -> (d, kept heads x d_h) for o_proj,
"mlp.{i}" -> (d, kept channels) for down_proj) and an output bias added to the module's own (`bias`, as FLAP's
compensation is applied). `bias` gives biases only; `lsq` weights, and biases with `intercept`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gisp.data.calibration import pad_collate
from gisp.data.recipes import GSM8KRecipe, MultipleChoiceRecipe, TextRecipe
from gisp.errors import GispError
from gisp.io import atomic_file
from gisp.models.families import family_spec, get_submodule
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.activations import InputRecorder
from gisp.prune.masks import Masks, OutputBias
from gisp.prune.objectives import get_objective
from gisp.reconstruct.layerwise import Refit, layerwise_refit
from gisp.reconstruct.settings import ReconstructSettings
from gisp.reconstruct.solve import GramStats, flap_bias, ridge

log = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # "attn.{i}" / "mlp.{i}" -> (d, kept)
    bias: OutputBias | None = None  # added to the outputs of o_proj / down_proj (L, d)
    record: dict[str, Any] = field(default_factory=dict)  # method, tokens, seconds, ...

    def save(self, path: Path) -> None:
        tensors = {f"weights.{k}": v.contiguous().float() for k, v in self.weights.items()}
        if self.bias is not None:
            tensors |= {"bias.attn": self.bias.attn.float().contiguous(),
                        "bias.mlp": self.bias.mlp.float().contiguous()}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "gisp-reconstruction/1"})

    @classmethod
    def load(cls, path: Path, record: dict[str, Any] | None = None) -> Reconstruction:
        tensors = load_file(str(path))
        weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
        bias = OutputBias(tensors["bias.attn"], tensors["bias.mlp"]) if "bias.attn" in tensors else None
        return cls(weights, bias, dict(record or {}))


@contextlib.contextmanager
def installed(layers: list[LayerModules], structure: ModelStructure, masks: Masks, rec: Reconstruction
              ) -> Iterator[None]:
    """The reconstruction's kept columns written into the dense model's o_proj / down_proj while the block runs (the
    masked model then computes the reconstructed level: pair it with MaskApplier.set(masks, rec.bias)); the dense
    weights are back afterwards."""
    saved = []
    try:
        with torch.no_grad():
            for key, weight in rec.weights.items():
                block, _, i = key.partition(".")
                linear = layers[int(i)].o if block == "attn" else layers[int(i)].down
                kept = (masks.heads[int(i)].repeat_interleave(structure.head_dim) if block == "attn"
                        else masks.channels[int(i)]).to(linear.weight.device)
                saved.append((linear, linear.weight.detach().clone()))
                linear.weight[:, kept] = weight.to(linear.weight.device, linear.weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for linear, original in saved:
                linear.weight.copy_(original)


# ---------------------------------------------------------------------------------------------------------------
# Data


def reconstruction_recipe(recipe, s: ReconstructSettings):
    """The calibration recipe at the reconstruction's own budget and seed (forward passes: labels play no part)."""
    if isinstance(recipe, TextRecipe):
        return dataclasses.replace(recipe, n_samples=math.ceil(s.tokens / s.seq_len), seq_len=s.seq_len, seed=s.seed,
                                   batch_size=s.batch_size)
    if isinstance(recipe, MultipleChoiceRecipe):
        return dataclasses.replace(recipe, budget_tokens=s.tokens, seed=s.seed, batch_size=s.batch_size)
    if isinstance(recipe, GSM8KRecipe):
        return dataclasses.replace(recipe, n_samples=max(1, math.ceil(s.tokens / 128)), seed=s.seed,
                                   batch_size=s.batch_size)
    raise GispError(f"reconstruction data of kind {recipe.kind!r} is not supported: use a text, gsm8k or "
                    "multiple_choice recipe (+data@reconstruct.data=...)")


def token_batches(items: list[torch.Tensor], pad_id: int, batch_size: int, device) -> list[dict]:
    """Token sequences as padded forward batches (input_ids, attention_mask) on `device`."""
    collate = pad_collate(pad_id)
    batches = []
    for start in range(0, len(items), batch_size):
        part = [{"input_ids": x, "labels": x, "weight": torch.tensor(1.0)} for x in items[start:start + batch_size]]
        batch = collate(part)
        batches.append({k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    return batches


def reconstruction_batches(recipe, tokenizer, data_dir, s: ReconstructSettings, device) -> tuple[list[dict], dict]:
    """Batches of the reconstruction data (items cut to seq_len) and their record (provenance, tokens, sha256)."""
    calib = reconstruction_recipe(recipe, s).build(get_objective("ppl"), tokenizer, data_dir)
    items = [x[: s.seq_len] for x in calib.input_ids]
    batches = token_batches(items, calib.pad_id, s.batch_size, device)
    h = hashlib.sha256()
    for x in items:
        h.update(x.to(torch.int64).numpy().tobytes())
    keep = ("name", "kind", "files", "hub", "sha256", "dataset", "split", "seed")
    record = {**{k: v for k, v in calib.record.items() if k in keep}, "sequences": len(items),
              "tokens": sum(int(x.numel()) for x in items), "seq_len": s.seq_len, "content_sha256": h.hexdigest()}
    return batches, record


# ---------------------------------------------------------------------------------------------------------------
# The methods


def _bias_method(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, masks: Masks,
                 batches: list[dict]) -> Reconstruction:
    """FLAP's compensation from the dense model's mean inputs of o_proj and down_proj."""
    recorder = InputRecorder(layers, structure)
    with recorder, torch.no_grad():
        for batch in batches:
            mask = batch.get("attention_mask")
            recorder.token_mask = None if mask is None else mask.bool()
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
    attn = torch.zeros(structure.n_layers, structure.hidden)
    mlp = torch.zeros(structure.n_layers, structure.hidden)
    for i in range(structure.n_layers):
        heads = ~masks.heads[i].repeat_interleave(structure.head_dim)
        if bool(heads.any()):
            attn[i] = flap_bias(layers[i].o.weight, heads, recorder.moments[(i, "attn")].mean)
        if bool((~masks.channels[i]).any()):
            mlp[i] = flap_bias(layers[i].down.weight, ~masks.channels[i], recorder.moments[(i, "mlp")].mean)
    return Reconstruction(bias=OutputBias(attn, mlp))


def _lsq_method(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, masks: Masks,
                batches: list[dict], s: ReconstructSettings, progress=None) -> Reconstruction:
    def fit(stats: GramStats, linear: nn.Linear) -> Refit:
        own = linear.bias.detach().float() if linear.bias is not None else None
        weight, bias = ridge(stats, s.damp, s.intercept, fixed_bias=own)
        extra = None if bias is None else bias - (own if own is not None else torch.zeros_like(bias))
        return Refit(weight.cpu(), None if extra is None else extra.cpu())

    decoder = get_submodule(model, family_spec(model.config.model_type).layers)
    refits = layerwise_refit(model, decoder, layers, structure, masks, batches, fit, progress, s.target)
    # a block that lost every input has no columns to refit (only an intercept, where asked, stays of it)
    weights = {f"attn.{i}": r.weight for i, r in refits.attn.items() if r.weight.shape[1]} | \
        {f"mlp.{i}": r.weight for i, r in refits.mlp.items() if r.weight.shape[1]}
    attn = torch.zeros(structure.n_layers, structure.hidden)
    mlp = torch.zeros(structure.n_layers, structure.hidden)
    any_bias = False
    for block, found, table in (("attn", refits.attn, attn), ("mlp", refits.mlp, mlp)):
        for i, r in found.items():
            if r.extra_bias is not None:
                table[i], any_bias = r.extra_bias, True
    return Reconstruction(weights, OutputBias(attn, mlp) if any_bias else None)


def reconstruct(model: nn.Module, layers: list[LayerModules], structure: ModelStructure, masks: Masks,
                batches: list[dict], s: ReconstructSettings, progress=None) -> Reconstruction:
    """The reconstruction of the level `masks` of `model` (the dense weights, unchanged afterwards)."""
    started = time.perf_counter()
    if s.method == "bias":
        out = _bias_method(model, layers, structure, masks, batches)
    elif s.method == "lsq":
        out = _lsq_method(model, layers, structure, masks, batches, s, progress)
    else:
        raise GispError(f"reconstruct.method={s.method!r} reconstructs nothing")
    out.record = {"method": s.method, "seconds": round(time.perf_counter() - started, 2),
                  "blocks_refitted": len(out.weights)}
    return out
