"""Model presets: Hugging Face configs for random-init models of known shapes.

No hub access is assumed anywhere: a preset builds a ``transformers`` config, and
``build_model`` turns it into a randomly initialised causal LM. A local model directory
(``config.json`` + safetensors weights) loads with ``load_model``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model shape. ``model_type`` picks the HF config class."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    description: str = ""
    extra: tuple[tuple[str, Any], ...] = ()  # family-specific config fields (windows, soft-caps, experts, ...)

    def config(self, **overrides: Any) -> PretrainedConfig:
        fields = dataclasses.asdict(self)
        fields.pop("description")
        fields.update(dict(fields.pop("extra")))
        model_type = fields.pop("model_type")
        rope_theta = fields.pop("rope_theta")
        fields.update(overrides)
        if "layer_types" in fields and "layer_types" not in overrides:  # depth changed: keep the pattern's start
            n = fields["num_hidden_layers"]
            types = list(fields["layer_types"])
            fields["layer_types"] = (types * (n // len(types) + 1))[:n]
        config = AutoConfig.for_model(model_type, **fields)
        # transformers 5 keeps rope settings in `rope_parameters`; older configs read `rope_theta`.
        if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
            config.rope_parameters["rope_theta"] = rope_theta
        else:
            config.rope_theta = rope_theta
        return config


def _tiny(model_type: str, description: str, **extra: Any) -> Preset:
    """A ~1.5M-parameter model of ``model_type`` (the "tiny" Llama's sizes) with family fields ``extra``."""
    return Preset(model_type=model_type, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048,
                  description=description, extra=tuple(extra.items()))


_GEMMA_TINY = dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=64, hidden_activation="gelu_pytorch_tanh")
_LOCAL_GLOBAL = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048,
        description="Llama-style model of ~1.5M parameters for CPU demos and tests",
    ),
    "tinyllama-1.1b": Preset(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=32768,
        description="TinyLlama-1.1B shape (GQA 32 query / 4 KV heads)",
    ),
    "llama2-7b": Preset(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768,
        description="Llama-2-7B width (the benchmark truncates layers to fit one GPU)",
    ),
    "qwen3-0.6b": Preset(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1_000_000.0,
        description="Qwen3-0.6B shape: large vocabulary, tied embeddings, q/k norms, head_dim 128",
    ),
    "qwen2-tiny": Preset(
        model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=4096, max_position_embeddings=2048,
        tie_word_embeddings=True, description="Qwen2-style tiny model (q/k/v bias, one KV head) for tests",
    ),
    # one small random-init model per supported family beyond Llama (CPU demos: `centrifuge train`)
    "gemma2-tiny": _tiny("gemma2", "Gemma 2 family: sandwich norms (1 + w), local/global windows, soft-caps",
                         layer_types=["sliding_attention", "full_attention"] * 2, **_GEMMA_TINY),
    "gemma3-tiny": _tiny("gemma3_text", "Gemma 3 family: q/k norms, 3 local : 1 global layers, two RoPE bases",
                         layer_types=_LOCAL_GLOBAL, **_GEMMA_TINY),
    "olmo2-tiny": _tiny("olmo2", "OLMo 2 family: post-norms, q/k norms over all heads"),
    "granite-tiny": _tiny("granite", "Granite family: embedding / residual / attention / logit multipliers",
                          embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.03125,
                          logits_scaling=8.0),
    "phi3-tiny": _tiny("phi3", "Phi-3 family: fused qkv_proj and gate_up_proj", pad_token_id=0),
    "qwen3-moe-tiny": _tiny("qwen3_moe", "Qwen3-MoE family: 8 experts, top-2, q/k norms",
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True),
    "mixtral-tiny": _tiny("mixtral", "Mixtral family: 4 experts, top-2", num_local_experts=4,
                          num_experts_per_tok=2, intermediate_size=176),
    "olmoe-tiny": _tiny("olmoe", "OLMoE family: 8 experts, top-2, q/k norms over all heads", num_experts=8,
                        num_experts_per_tok=2, intermediate_size=96),
    # benchmark shapes (random init; `centrifuge bench` truncates depth where BENCH_LAYERS says)
    "gemma3-4b": Preset(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=262208, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1_000_000.0,
        description="Gemma-3-4B text shape: 5 local (window 1024) : 1 global layers, head_dim 256, 262k vocab "
                    "(bench: 8 layers, 1.4B)",
        extra=(("head_dim", 256), ("query_pre_attn_scalar", 256), ("sliding_window", 1024),
               ("hidden_activation", "gelu_pytorch_tanh"),
               ("layer_types", ((["sliding_attention"] * 5 + ["full_attention"]) * 6)[:34])),
    ),
    "qwen3-moe-30b-a3b": Preset(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        description="Qwen3-30B-A3B shape: 128 experts (768 wide), top-8, head_dim 128 (bench: 2 layers, 1.9B)",
        extra=(("head_dim", 128), ("num_experts", 128), ("num_experts_per_tok", 8),
               ("moe_intermediate_size", 768), ("norm_topk_prob", True)),
    ),
}


def preset_config(name: str, **overrides: Any) -> PretrainedConfig:
    """Return the HF config of preset ``name``; ``overrides`` replace config fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name].config(**overrides)
    if name == "qwen3-0.6b":
        config.head_dim = 128
    return config


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
) -> torch.nn.Module:
    """A randomly initialised causal LM from ``config`` (deterministic when ``seed`` is given).

    ``attn_implementation="sdpa"`` falls back to "eager" for families whose HF class refuses SDPA (Gemma 2:
    SDPA cannot soft-cap attention scores)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation=_attention_for(config, attn_implementation), trust_remote_code=False
    )
    return model


def _attention_for(config: PretrainedConfig, attn_implementation: str) -> str:
    """``attn_implementation``, or "eager" where it is "sdpa" and the model class does not support SDPA."""
    if attn_implementation != "sdpa":
        return attn_implementation
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "eager" if cls is not None and not getattr(cls, "_supports_sdpa", True) else attn_implementation


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a local directory. Refuses hub ids: nothing is downloaded."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (hub downloads are not used)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=_attention_for(config, attn_implementation),
        trust_remote_code=trust_remote_code, local_files_only=True,
    )
