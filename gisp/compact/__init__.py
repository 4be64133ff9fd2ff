"""Physically pruned decoders: per-layer head and channel counts, GQA through a query-to-KV-head index.

`configuration_gisp.py` and `modeling_gisp.py` import only torch and transformers: they are copied into every
exported folder so that `from_pretrained(OUT, trust_remote_code=True)` works without gisp installed.
"""

from gisp.compact.configuration_gisp import GispDecoderConfig
from gisp.compact.modeling_gisp import GispDecoderForCausalLM

__all__ = ["GispDecoderConfig", "GispDecoderForCausalLM", "register_auto_classes"]


def register_auto_classes() -> None:
    """Let `AutoModelForCausalLM.from_pretrained(OUT)` load exported folders when gisp is imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(GispDecoderConfig.model_type, GispDecoderConfig)
        AutoModelForCausalLM.register(GispDecoderConfig, GispDecoderForCausalLM)
    except ValueError:  # already registered
        pass
