"""One registry of supported architectures, keyed by ``config.model_type``.

Every supported family is a pre-LN-or-sandwich decoder layer — attention with RoPE and GQA, then a gated MLP —
so one layer recipe (``centrifuge.tokens.layer``) serves them all; an ``ArchSpec`` records, as data and a few
small hooks, only where a family differs from Llama:

* where the norms sit (``norms``: Llama's two pre-norms, Gemma's four "sandwich" norms, OLMo 2's two post-norms)
  — the norm *formula* (Gemma's ``(1 + w)``) is the HF module's own, run as is;
* q / k norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
* fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) and the MLP activation's attribute name;
* scalar multipliers read from the config (Granite's embedding / residual multipliers and logit scaling);
* logit soft-capping of attention scores and of the LM head's logits (Gemma 2);
* per-layer attention geometry (sliding / full layers) and per-layer-type rotary tables (Gemma 3);
* mixture-of-experts MLPs (Qwen3-MoE, Mixtral, OLMoE): the HF block runs whole, as a module (``moe``).

Query pre-scaling (Gemma's ``query_pre_attn_scalar``, Granite's ``attention_multiplier``) and embedding scaling
inside the embedding module (Gemma) need no entry: the recipe reads ``self_attn.scaling`` and calls the
model's own ``embed_tokens``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch.nn as nn

from centrifuge.ops.liger import is_liger_swiglu

Norms = tuple[str | None, str | None, str | None, str | None]
# Norm module names of a decoder layer: (before attention, after attention, before the MLP, after the MLP).
PRE_NORMS: Norms = ("input_layernorm", None, "post_attention_layernorm", None)  # Llama: pre-LN
SANDWICH_NORMS: Norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm")  # Gemma 2 / 3
POST_NORMS: Norms = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")  # OLMo 2


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the shared layer recipe needs to know about one architecture.

    Attributes:
        model_type: the HF ``config.model_type``.
        modeling_module: the transformers module holding the model code (for ``apply_rotary_pos_emb``).
        qk_norm: True when q and k go through an RMSNorm before RoPE (Qwen3, Gemma 3, OLMo 2).
        qk_norm_flat: the q / k norms normalise the whole projection (all heads at once: OLMo 2), not each head.
        norms: the layer's norm module names (``PRE_NORMS``, ``SANDWICH_NORMS``, ``POST_NORMS``).
        fused_qkv: name of a fused q/k/v projection ([q; k; v] rows: Phi-3's "qkv_proj"), or None.
        fused_gate_up: name of a fused gate/up projection ([gate; up] rows: Phi-3's "gate_up_proj"), or None.
        activation: the MLP's activation attribute ("act_fn"; Phi-3: "activation_fn").
        residual_multiplier / embedding_multiplier / logits_divisor: config attributes of scalar multipliers
            (Granite: sublayer outputs × residual_multiplier, embeddings × embedding_multiplier, logits /
            logits_scaling), or None.
        final_softcap / attn_softcap: config attributes of logit soft-capping (``c · tanh(x / c)``) of the LM
            head's logits and of the attention scores (Gemma 2), or None.
        rope_by_layer_type: rotary tables differ per layer type (Gemma 3: local and global bases).
        omission: neuron omission support: "all" (MLP channels and KV-group heads), "mlp" (channels only; e.g.
            OLMo 2, whose q/k norm over all heads makes a head's output depend on the omitted heads), or None.
        moe: layers whose ``mlp`` has ``experts`` are mixture-of-experts blocks, run whole as the HF module
            (router, top-k, experts). Their routing is per token and dropless (no expert capacity), so a kept
            row is routed the same in the forward over all rows and in the backward's recompute on kept rows:
            expert and router gradients come from kept rows only, as the reference semantics ask. With
            ``output_router_logits`` the load-balancing loss is taken over the counted tokens
            (``centrifuge.tokens.forward``), its gradient entering each MoE layer's backward at its kept rows.
    """

    model_type: str
    modeling_module: str
    qk_norm: bool = False
    qk_norm_flat: bool = False
    norms: Norms = PRE_NORMS
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    activation: str = "act_fn"
    residual_multiplier: str | None = None
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
    final_softcap: str | None = None
    attn_softcap: str | None = None
    rope_by_layer_type: bool = False
    omission: str | None = "all"
    moe: bool = False

    @property
    def apply_rotary_pos_emb(self) -> Callable:
        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb

    @property
    def llama_like(self) -> bool:
        """The plain Llama layer (pre-norms, separate projections, no multipliers or soft-capping): what the
        hand-written backward (``centrifuge.tokens.direct``) computes. Other families use the autograd replay."""
        return (self.norms == PRE_NORMS and not self.qk_norm_flat and self.fused_qkv is None
                and self.fused_gate_up is None and self.activation == "act_fn" and self.residual_multiplier is None
                and self.attn_softcap is None and not self.moe)

    def scalar(self, config, attr: str | None) -> float | None:
        """The config value named by ``attr`` (a multiplier or soft-cap field), or None."""
        return None if attr is None else getattr(config, attr, None)

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

    def layer_type(self, config, layer_idx: int) -> str | None:
        """The layer's rotary-table key when ``rope_by_layer_type`` (its ``config.layer_types`` entry), else None."""
        return config.layer_types[layer_idx] if self.rope_by_layer_type else None


def _hf(family: str) -> str:
    return f"transformers.models.{family}.modeling_{family}"


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", _hf("llama")),
        ArchSpec("mistral", _hf("mistral")),
        ArchSpec("qwen2", _hf("qwen2")),
        ArchSpec("qwen3", _hf("qwen3"), qk_norm=True),
        ArchSpec("gemma2", _hf("gemma2"), norms=SANDWICH_NORMS, final_softcap="final_logit_softcapping",
                 attn_softcap="attn_logit_softcapping"),
        # (Gemma 3's attention does not soft-cap scores, whatever attn_logit_softcapping says: HF ignores it)
        ArchSpec("gemma3_text", _hf("gemma3"), norms=SANDWICH_NORMS, qk_norm=True, rope_by_layer_type=True,
                 final_softcap="final_logit_softcapping"),
        ArchSpec("olmo2", _hf("olmo2"), norms=POST_NORMS, qk_norm=True, qk_norm_flat=True, omission="mlp"),
        ArchSpec("granite", _hf("granite"), residual_multiplier="residual_multiplier",
                 embedding_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
        ArchSpec("phi3", _hf("phi3"), fused_qkv="qkv_proj", fused_gate_up="gate_up_proj",
                 activation="activation_fn", omission=None),
        ArchSpec("qwen3_moe", _hf("qwen3_moe"), qk_norm=True, moe=True, omission=None),
        ArchSpec("mixtral", _hf("mixtral"), moe=True, omission=None),
        ArchSpec("olmoe", _hf("olmoe"), qk_norm=True, qk_norm_flat=True, moe=True, omission=None),
    )
}

def layer_attrs(spec: ArchSpec) -> tuple[str, ...]:
    """The decoder-layer submodules the recipe reads for ``spec`` (dotted paths)."""
    attn = ((f"self_attn.{spec.fused_qkv}",) if spec.fused_qkv else
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp = (f"mlp.{spec.fused_gate_up}",) if spec.fused_gate_up else ("mlp.gate_proj", "mlp.up_proj")
    mlp += ("mlp.down_proj", f"mlp.{spec.activation}")
    return (tuple(n for n in spec.norms if n is not None) + attn + ("self_attn.o_proj",)
            + (("mlp",) if spec.moe else mlp)  # (MoE families: dense and expert layers mix, e.g. Qwen3-MoE)
            + (("self_attn.q_norm", "self_attn.k_norm") if spec.qk_norm else ()))


# Config settings the token-sparse step does not compute (it would train another function): refused when set.
_REFUSED = (
    ("resid_pdrop", "residual dropout"),
    ("embd_pdrop", "embedding dropout"),
    ("router_jitter_noise", "router jitter noise (random routing would differ between forward and backward)"),
    ("clip_qkv", "q/k/v clipping"),
)


class UnsupportedModelError(ValueError):
    """The model's architecture is not one Centrifuge can patch."""


def spec_for(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of an HF causal LM, after checking that its modules have the expected structure."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"Centrifuge does not support model_type {model_type!r} ({type(model).__name__}); supported "
            f"families (config.model_type): {', '.join(sorted(REGISTRY))}"
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
    for name, what in _REFUSED:
        if getattr(config, name, None):
            raise UnsupportedModelError(f"config.{name}={getattr(config, name)!r} ({what}) is not supported by "
                                        f"Centrifuge; unset it (0 / None / False)")
    for layer in inner.layers:
        attrs = layer_attrs(spec)
        if is_liger_swiglu(getattr(layer, "mlp", None)):  # Liger's SwiGLU MLP has no act_fn (SiLU built in)
            attrs = tuple(a for a in attrs if a != f"mlp.{spec.activation}")
        for attr in attrs:
            obj = layer
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise UnsupportedModelError(f"decoder layer {type(layer).__name__} has no {attr!r}")
    return spec
