"""Small random HF models and gradient helpers for the token-sparse tests (imported by name: a module
called ``conftest`` would clash with the other test folders' conftest files)."""

from __future__ import annotations

import torch
from transformers import AutoConfig

import centrifuge
from centrifuge.models.presets import build_model

VOCAB = 101


def tiny_config(model_type: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 2, **extra):
    fields = dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256, head_dim=12,
    )
    if model_type == "qwen2":
        fields.pop("head_dim")
        fields["hidden_size"] = 48
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", *, dtype=torch.float64, seed: int = 0, **kw):
    return build_model(tiny_config(model_type, **kw), dtype=dtype, seed=seed)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_mode(model, mode: str, *, attention: str = "auto", compile: bool = False, backward: str = "auto", **inputs):
    """One forward + backward in ``mode``; returns (output, grads). Leaves the model unpatched."""
    centrifuge.apply(model, mode=mode, attention=attention, compile=compile, backward=backward)
    try:
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        return out, grads_of(model)
    finally:
        centrifuge.revert(model)


def patched_forward_saving(model, **inputs):
    """Patch ``model`` (fast mode), run one forward, unpatch; returns (output, numel of every tensor autograd
    saved for the backward)."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel()
        return t

    centrifuge.apply(model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
    finally:
        centrifuge.revert(model)
    return out, saved


def max_rel_err(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), (sorted(set(got) ^ set(ref)))
    worst = 0.0
    for name, r in ref.items():
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (got[name] - r).abs().max().item() / scale)
    return worst
