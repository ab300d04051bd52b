"""Neuron omission and the token-sparse backward together equal the combined reference (float64)."""

from __future__ import annotations

import pytest
import torch

import centrifuge
from centrifuge import neurons
from centrifuge.neurons import LayerPlan, OmissionPlan, reference_omission

TOL = 1e-10


def _models():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "tokens"))
    import token_models

    return token_models


tm = _models()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


def _plan(model, channels, groups) -> OmissionPlan:
    cfg = model.config
    attn = model.model.layers[0].self_attn
    return OmissionPlan(rate=0.5, layers={
        i: LayerPlan.build(channels=channels, groups=groups, num_channels=cfg.intermediate_size,
                           num_groups=cfg.num_key_value_heads, heads_per_group=attn.num_key_value_groups,
                           head_dim=attn.head_dim)
        for i in range(cfg.num_hidden_layers)
    })


def _inputs(gen, b=2, t=19):
    ids = torch.randint(0, tm.VOCAB, (b, t), generator=gen)
    keep = torch.rand(b, t, generator=gen) < 0.45
    return ids, keep


def _combined(model, plan, mode, **inputs):
    """Fast: the omitter's sliced path inside the token-sparse layers. Reference: the token reference mode
    (filtered K/V detached) on the dense model with omitted activations × 0."""
    if mode == "fast":
        omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=8)
        omitter.set_plan(plan)
        try:
            return tm.run_mode(model, "fast", **inputs)
        finally:
            omitter.revert()
    with reference_omission(model, plan):
        return tm.run_mode(model, "reference", **inputs)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_tokens_and_neurons_equal_combined_reference(model_type, gen):
    model = tm.tiny_model(model_type, heads=4, kv_heads=2)
    ids, keep = _inputs(gen)
    plan = _plan(model, channels=[1, 5, 6, 17, 30, 41, 42, 77, 79], groups=[1])
    out, grads = _combined(model, plan, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    ref_out, ref = _combined(model, plan, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert tm.max_rel_err(grads, ref) < TOL
    dropped = [c for c in range(80) if c not in (1, 5, 6, 17, 30, 41, 42, 77, 79)]
    assert torch.all(grads["model.layers.0.mlp.up_proj.weight"][dropped] == 0)
    assert torch.all(grads["model.layers.1.self_attn.k_proj.weight"][:12] == 0)  # group 0 omitted
    assert grads["model.layers.1.self_attn.k_proj.weight"][12:].abs().sum() > 0


def test_mask_after_forward_with_neurons_one_kv_head_group_kept(gen):
    model = tm.tiny_model("llama", heads=6, kv_heads=3)
    ids, _ = _inputs(gen, b=3, t=13)

    def select(*, scores, valid):  # the 5 highest-loss tokens of each row
        top = scores.masked_fill(~valid, -1).topk(5, dim=1).indices
        return torch.zeros_like(valid).scatter_(1, top, True) & valid

    plan = _plan(model, channels=list(range(0, 80, 3)), groups=[2])
    _, grads = _combined(model, plan, "fast", input_ids=ids, labels=ids, select=select)
    _, ref = _combined(model, plan, "reference", input_ids=ids, labels=ids, select=select)
    assert tm.max_rel_err(grads, ref) < TOL


def test_statistics_from_the_token_path_equal_the_omission_path(gen):
    """The activation metric sees the same full-row forward through either path."""
    ids, keep = _inputs(gen)
    stats = []
    for with_tokens in (True, False):
        model = tm.tiny_model("qwen2", heads=4, kv_heads=2)
        omitter = neurons.attach(model, rate=0.5, metric="activation", multiple=8)
        omitter.set_plan(_plan(model, channels=list(range(0, 80, 2)), groups=[0]))
        if with_tokens:
            centrifuge.apply(model, mode="fast")
            model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        stats.append(omitter.state_dict())
    assert stats[0].keys() == stats[1].keys() and len(stats[0]) == 4  # mlp / group scores of 2 layers
    for key, value in stats[1].items():
        assert torch.allclose(stats[0][key], value, rtol=1e-10, atol=1e-12), key
