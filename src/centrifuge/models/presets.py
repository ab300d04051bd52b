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

    def config(self, **overrides: Any) -> PretrainedConfig:
        fields = dataclasses.asdict(self)
        fields.pop("description")
        model_type = fields.pop("model_type")
        rope_theta = fields.pop("rope_theta")
        fields.update(overrides)
        config = AutoConfig.for_model(model_type, **fields)
        # transformers 5 keeps rope settings in `rope_parameters`; older configs read `rope_theta`.
        if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
            config.rope_parameters["rope_theta"] = rope_theta
        else:
            config.rope_theta = rope_theta
        return config


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
