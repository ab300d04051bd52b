"""Tiny random configs of every supported family beyond Llama, with the features that set each apart turned
on and made to matter (windows shorter than the sequence, soft-caps near the logits' size, multipliers far
from 1, odd head counts), for the token-sparse and omission tests."""

from __future__ import annotations

import pytest
import torch
from token_models import tiny_model

WINDOW = 7

# model_type → config fields on top of ``token_models.tiny_config`` (hidden 48, 2 layers, head_dim 12)
FAMILIES: dict[str, dict] = {
    "gemma2": dict(hidden_activation="gelu_pytorch_tanh", sliding_window=WINDOW, query_pre_attn_scalar=7,
                   layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=1.5,
                   final_logit_softcapping=2.0),
    "gemma3_text": dict(hidden_activation="gelu_pytorch_tanh", sliding_window=WINDOW, query_pre_attn_scalar=7,
                        layer_types=["full_attention", "sliding_attention"], final_logit_softcapping=2.0),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2,
                    logits_scaling=2.5),
    "phi3": dict(partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # mixture of experts: few, small experts, top-2 / top-3 routing; Qwen3-MoE mixes in a dense layer
    "qwen3_moe": dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=WINDOW),
    "olmoe": dict(num_experts=6, num_experts_per_tok=3, intermediate_size=24),
}


def family_model(model_type: str, *, heads: int = 6, kv_heads: int = 2, **kw):
    """A float64 model of ``model_type`` (GQA 6 query / 2 KV heads by default), random init."""
    fields = {**FAMILIES[model_type], **kw}
    if model_type in ("phi3", "olmoe"):  # head_dim = hidden / heads (Phi-3: no head_dim field; OLMoE: q_norm [hidden])
        fields.setdefault("hidden_size", fields.get("head_dim", 12) * heads)
    model = tiny_model(model_type, heads=heads, kv_heads=kv_heads, **fields)
    if hasattr(model, "set_experts_implementation") and "num_experts_per_tok" in fields:
        model.set_experts_implementation("eager")  # float64: the grouped-GEMM experts take fp32 / 16-bit only
    return model


def _norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm, ``norm(x) · (1 + w)``, computed in x's dtype when that is float64 (HF computes in
    float32 always, which would cap every float64 comparison at float32 precision)."""
    if x.dtype != torch.float64:
        return self._centrifuge_test_forward(x)
    return self._norm(x) * (1.0 + self.weight.to(x.dtype))


@pytest.fixture(autouse=True)
def float64_gemma_norms(monkeypatch):
    """For the tests of this folder: Gemma 2 / 3 norms in float64 for float64 models (the fast path and the
    reference both call the module, so both see the same formula)."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3

    for cls in (modeling_gemma2.Gemma2RMSNorm, modeling_gemma3.Gemma3RMSNorm):
        monkeypatch.setattr(cls, "_centrifuge_test_forward", cls.forward, raising=False)
        monkeypatch.setattr(cls, "forward", _norm_in_input_dtype)
