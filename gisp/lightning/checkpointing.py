"""Activation checkpointing of the decoder layers for the scoring pass (`prune.checkpointing=true`).

Through the model's own switch (transformers' GradientCheckpointingLayer, non-reentrant torch.utils.checkpoint):
each decoder layer keeps only its input and recomputes its internals in backward. transformers checkpoints only in
training mode, so the scoring pass puts the decoder layers in training mode for each step (`training_layers`); that
is exact only without dropout, which `checkpoint_layers` checks. FSDP2's hooks stay outside the checkpoint
(transformers wraps `forward`, not `__call__`), so sharding and checkpointing combine.
"""

from __future__ import annotations

import contextlib

from torch import nn

from gisp.errors import GispError
from gisp.lightning.sharding import decoder_layers


def checkpoint_layers(model: nn.Module, layers_path: str, enable: bool) -> None:
    """Activation checkpointing of the decoder layers through the model's own switch (transformers'
    GradientCheckpointingLayer, non-reentrant torch.utils.checkpoint); it acts only while the layers are in
    training mode, see `training_layers`."""
    if not enable:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise GispError(f"{type(model).__name__} does not support gradient checkpointing: set "
                        "prune.checkpointing=false")
    for module in decoder_layers(model, layers_path).modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            raise GispError("prune.checkpointing runs the decoder layers in training mode, but this model has "
                            f"dropout (p={module.p}): scores would change; set prune.checkpointing=false")
    if getattr(model.config, "attention_dropout", 0.0):
        raise GispError(f"prune.checkpointing runs the decoder layers in training mode, but attention_dropout="
                        f"{model.config.attention_dropout}: scores would change; set prune.checkpointing=false")
    enable_fn = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: gradient_...
    if enable_fn is not None:
        enable_fn(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def training_layers(model: nn.Module, layers_path: str, enabled: bool):
    """The decoder layers in training mode for one step (transformers checkpoints only in training mode); the model
    has no dropout (checked by `checkpoint_layers`), so the outputs are those of evaluation mode."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model, layers_path)
    was = layers.training
    layers.train()
    try:
        yield
    finally:
        layers.train(was)
