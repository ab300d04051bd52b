"""One registry of supported architectures, keyed by ``config.model_type``.

Llama, Mistral, Qwen2 and Qwen3 share one decoder-layer structure (pre-norm attention with RoPE and GQA,
then a gated SiLU MLP), so one layer recipe (``centrifuge.tokens.layer``) serves them all; an ``ArchSpec``
records only where they differ.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch.nn as nn

from centrifuge.ops.liger import is_liger_swiglu


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the shared layer recipe needs to know about one architecture.

    Attributes:
        model_type: the HF ``config.model_type``.
        qk_norm: True when q and k go through a per-head RMSNorm before RoPE (Qwen3).
        modeling_module: the transformers module holding the model code (for ``apply_rotary_pos_emb``).
    """

    model_type: str
    qk_norm: bool
    modeling_module: str

    @property
    def apply_rotary_pos_emb(self) -> Callable:
        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb

    def sliding_window(self, config, layer_idx: int) -> int | None:
        """The layer's sliding window length, or None for full causal attention."""
        window = getattr(config, "sliding_window", None)
        if window is None:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" else None
        if self.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            return None
        return window


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", qk_norm=False, modeling_module="transformers.models.llama.modeling_llama"),
        ArchSpec("mistral", qk_norm=False, modeling_module="transformers.models.mistral.modeling_mistral"),
        ArchSpec("qwen2", qk_norm=False, modeling_module="transformers.models.qwen2.modeling_qwen2"),
        ArchSpec("qwen3", qk_norm=True, modeling_module="transformers.models.qwen3.modeling_qwen3"),
    )
}

_LAYER_ATTRS = (
    "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
    "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn",
)


class UnsupportedModelError(ValueError):
    """The model's architecture is not one Centrifuge can patch."""


def spec_for(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of an HF causal LM, after checking that its modules have the expected structure."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"Centrifuge does not support model_type {model_type!r}; supported: {', '.join(sorted(REGISTRY))}"
        )
    if getattr(config, "pretraining_tp", 1) > 1:
        raise UnsupportedModelError("pretraining_tp > 1 is not supported; set config.pretraining_tp = 1")
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            raise UnsupportedModelError(f"{type(model).__name__}.model has no {name!r}; is it a causal LM?")
    if not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__} has no lm_head")
    spec = REGISTRY[model_type]
    for layer in inner.layers:
        attrs = _LAYER_ATTRS + (("self_attn.q_norm", "self_attn.k_norm") if spec.qk_norm else ())
        if is_liger_swiglu(getattr(layer, "mlp", None)):  # Liger's SwiGLU MLP has no act_fn (SiLU built in)
            attrs = tuple(a for a in attrs if a != "mlp.act_fn")
        for attr in attrs:
            obj = layer
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise UnsupportedModelError(f"decoder layer {type(layer).__name__} has no {attr!r}")
    return spec
