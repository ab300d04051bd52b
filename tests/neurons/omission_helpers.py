"""Small random HF models for the neuron-omission tests (float64, CPU)."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from centrifuge.models.presets import build_model

VOCAB = 64
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(model_type: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                intermediate: int = 128, **extra):
    fields = dict(
        hidden_size=48, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=128,
    )
    if model_type != "qwen2":
        fields["head_dim"] = 48 // heads
    if model_type == "mistral":
        fields["sliding_window"] = 6  # shorter than the test sequences: exercises the windowed mask
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", *, dtype=torch.float64, seed: int = 0, **kw):
    model = build_model(tiny_config(model_type, **kw), dtype=dtype, seed=seed)
    return model.train()


def batch(seed: int = 0, b: int = 2, s: int = 16) -> dict:
    ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def step_grads(model, inputs: dict):
    """One forward + backward; returns (logits, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}
