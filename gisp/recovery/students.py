"""The models a recovery trains: a level's compact model (lora, distill) or the dense model under its levels' masks
(nested), with a peft LoRA or every parameter trainable; and how the recovered weights are merged back.

The compact student is built in process from the dense weights (gisp.compact.slicing): no disk round trip, and the
merged result has exactly the shapes of the level's export. Weights the student does not train are shared with the
dense model (the embeddings of a LoRA student cost no memory); weights it trains are its own copies, so the dense
teacher is never changed.
"""

from __future__ import annotations

import torch
from torch import nn

from gisp.compact.modeling_gisp import GispDecoderForCausalLM
from gisp.compact.slicing import compact_model
from gisp.models.families import family_spec
from gisp.models.structure import ModelStructure
from gisp.prune.masks import Masks, OutputBias
from gisp.recovery.settings import LoraSettings

# A compact model names its projections as the Llama layout does, whatever the dense model's family.
COMPACT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj"}


def compact_student(model: nn.Module, masks: Masks, structure: ModelStructure, bias: OutputBias | None = None,
                    own_weights: bool = False, weights: dict[str, torch.Tensor] | None = None
                    ) -> GispDecoderForCausalLM:
    """The level's physically smaller model, built from the dense `model`'s weights (gisp.compact.slicing; with a
    reconstruction's `weights`). `own_weights`: every tensor is a copy (full fine-tuning); otherwise unsliced
    tensors (embeddings, norms) are shared with `model`."""
    return compact_model(model, masks, structure, bias, weights, own_weights=own_weights)


def projection_names(targets: tuple[str, ...], model: nn.Module) -> list[str]:
    """Module names of the projections `targets` (q, k, ..., down) in `model` (compact or dense of any family); a
    plain MLP (Phi-2, OPT) has no gate, which is then left out."""
    if isinstance(model, GispDecoderForCausalLM):
        return [COMPACT_NAMES[t] for t in targets if t != "gate" or model.config.mlp_gated]
    spec = family_spec(model.config.model_type)
    return [getattr(spec, f"{t}_proj") for t in targets if getattr(spec, f"{t}_proj")]


def with_lora(model: nn.Module, lora: LoraSettings):
    """`model` with a peft LoRA on the `lora.targets` projections; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=projection_names(lora.targets, model))
    model.requires_grad_(False)
    return get_peft_model(model, config)


def all_trainable(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM under a peft wrapper (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged(model: nn.Module) -> nn.Module:
    """The recovered model with the adapter folded into its weights (peft's merge_and_unload): the same module
    classes and shapes as before the adapter was added."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.requires_grad_(False).eval()


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The final hidden states (B, T, d) of a causal LM (dense HF model or compact model, under peft or not)."""
    body = base_model(model).model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]


def output_head(model: nn.Module) -> nn.Module:
    return base_model(model).get_output_embeddings()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
