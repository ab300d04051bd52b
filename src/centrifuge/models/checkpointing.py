"""Hugging Face activation checkpointing on and off, under either method name transformers uses.

The token-sparse layers (``centrifuge.tokens.layer``) read each decoder layer's ``gradient_checkpointing``
flag and then save only the layer input and attention-output rows, recomputing the rest on kept rows.
"""

from __future__ import annotations

import torch.nn as nn


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant); the newer method name where transformers has it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
