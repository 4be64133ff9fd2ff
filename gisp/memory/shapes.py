"""A model's shapes without its weights: its HF config (from a local folder's config.json, a GGUF header, the model
YAML's `shape`, the hub's config.json or the random model's own config) and the model built on the meta device, from
which gisp.models.structure reads the structure the passes will see (~2 s for a 70B, nothing allocated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gisp.errors import GispError
from gisp.models.families import family_spec, get_submodule, unfuse
from gisp.models.spec import ModelSpec
from gisp.models.structure import ModelStructure, describe, layer_modules
from gisp.prune.importance import scored_weights


def model_config(spec: ModelSpec):
    """The HF config of `spec` without loading weights (see the module docstring for where it comes from)."""
    if spec.source == "random":
        from gisp.models.byte_tokenizer import byte_level_tokenizer

        tok = byte_level_tokenizer()
        fields = {"vocab_size": len(tok), **(spec.config or {})}
        return AutoConfig.for_model(spec.model_type, **fields)
    if spec.source in ("local", "gguf_file"):
        path = Path(spec.path).expanduser()
        try:
            if spec.source == "gguf_file":  # the header only: transformers reads no tensors for a config
                return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            return AutoConfig.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as e:
            raise GispError(f"model {spec.name}: cannot read the config of {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check model.path") from None
    if spec.shape:  # the model YAML's shape (conf/model): no network, no weights
        fields = dict(spec.shape)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if spec.source == "hub":
        try:
            return AutoConfig.from_pretrained(spec.path, revision=spec.revision,
                                              trust_remote_code=spec.trust_remote_code)
        except Exception as e:  # noqa: BLE001 (hub errors come in many types; the plan is advisory)
            raise GispError(f"no shape known for model {spec.name} ({spec.path}): its model YAML has no `shape` and "
                            f"its config.json is not reachable ({type(e).__name__})") from None
    raise GispError(f"no shape known for model {spec.name} (source {spec.source}): add its config.json fields as "
                    "`shape:` to its conf/model YAML")


def meta_structure(config, dtype: torch.dtype, protect: dict[str, Any], gqa_mode: str
                   ) -> tuple[ModelStructure, dict[str, int]]:
    """Build the model on the meta device (shapes only) and read its structure and parameter counts."""
    with torch.device("meta"):
        model = unfuse(AutoModelForCausalLM.from_config(config, dtype=dtype))
    structure = describe(model, gqa_mode=gqa_mode, **protect)
    layers = layer_modules(model, family_spec(config.model_type))
    per_layer_scored = sum(p.numel() for p in scored_weights(layers[0], structure))
    largest_scored = max(p.numel() for p in scored_weights(layers[0], structure))
    decoder = get_submodule(model, family_spec(config.model_type).layers)
    per_layer = sum(p.numel() for p in decoder[0].parameters())
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    counts = {"params": params, "per_layer": per_layer, "per_layer_scored": per_layer_scored,
              "largest_scored": largest_scored, "scored": per_layer_scored * len(structure.unprotected),
              "root": params - per_layer * structure.n_layers, "vocab": config.vocab_size}
    return structure, counts
