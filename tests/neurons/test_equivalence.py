"""The sliced fast path equals the reference (omitted activations / head outputs × 0) in float64."""

from __future__ import annotations

import pytest
import torch
from omission_helpers import MODEL_TYPES, batch, step_grads, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from centrifuge import neurons
from centrifuge.models.registry import spec_for
from centrifuge.neurons import LayerPlan, OmissionPlan, omission_linear, reference_omission
from centrifuge.tokens.layer import attention_inputs, layer_output

TOL = 1e-12


def _compare(model, omitter, plan, inputs):
    """Fast path with ``plan`` vs the reference on the same model; checks logits and every gradient."""
    omitter.set_plan(plan)
    logits, grads = step_grads(model, inputs)
    omitter.clear()
    with reference_omission(model, plan):
        ref_logits, ref_grads = step_grads(model, inputs)
    assert grads.keys() == ref_grads.keys()
    assert (logits - ref_logits).abs().max().item() < TOL
    for name, ref in ref_grads.items():
        scale = max(ref.abs().max().item(), 1.0)
        assert (grads[name] - ref).abs().max().item() / scale < TOL, name
    return grads


def _hand_plan(model, *, channels=None, groups=None) -> OmissionPlan:
    cfg = model.config
    attn = model.model.layers[0].self_attn
    layers = {
        i: LayerPlan.build(channels=channels, groups=groups, num_channels=cfg.intermediate_size,
                           num_groups=cfg.num_key_value_heads, heads_per_group=attn.num_key_value_groups,
                           head_dim=attn.head_dim)
        for i in range(cfg.num_hidden_layers)
    }
    return OmissionPlan(rate=0.5, layers=layers)


def test_mlp_channels_equal_reference_and_omitted_rows_get_zero_grad():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", heads=False, multiple=16)
    channels = [0, 3, 7, 8, 20, 64, 100, 127]
    grads = _compare(model, omitter, _hand_plan(model, channels=channels), batch())
    dropped = torch.tensor([c for c in range(128) if c not in channels])
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        assert torch.all(grads[p + "gate_proj.weight"][dropped] == 0)
        assert torch.all(grads[p + "up_proj.weight"][dropped] == 0)
        assert torch.all(grads[p + "down_proj.weight"][:, dropped] == 0)
        assert grads[p + "gate_proj.weight"][channels].abs().sum() > 0


def test_gqa_kv_groups_equal_reference_and_omitted_heads_get_zero_grad():
    model = tiny_model("llama", heads=8, kv_heads=4)  # G = 2, head_dim 6
    omitter = neurons.attach(model, rate=0.5, metric="uniform", mlp=False)
    grads = _compare(model, omitter, _hand_plan(model, groups=[1, 3]), batch(1))
    p = "model.layers.0.self_attn."
    q_dropped = [r for h in (0, 1, 4, 5) for r in range(h * 6, h * 6 + 6)]  # query heads of groups 0, 2
    kv_dropped = [r for g in (0, 2) for r in range(g * 6, g * 6 + 6)]
    assert torch.all(grads[p + "q_proj.weight"][q_dropped] == 0)
    assert torch.all(grads[p + "k_proj.weight"][kv_dropped] == 0)
    assert torch.all(grads[p + "v_proj.weight"][kv_dropped] == 0)
    assert torch.all(grads[p + "o_proj.weight"][:, q_dropped] == 0)
    assert grads[p + "k_proj.weight"][6:12].abs().sum() > 0


def test_plain_multi_head_attention_omits_single_heads():
    model = tiny_model("llama", heads=4, kv_heads=4)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", mlp=False)
    _compare(model, omitter, _hand_plan(model, groups=[2]), batch(2))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_planned_channels_and_heads_equal_reference(model_type):
    model = tiny_model(model_type)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16, seed=3)
    plan = omitter.plan(5)
    assert plan.layers[0].channels.numel() == 64 and plan.layers[0].groups.numel() == 1
    _compare(model, omitter, plan, batch(3, s=20))


def test_one_kv_group_cannot_be_omitted():
    model = tiny_model("qwen2", heads=4, kv_heads=1)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    plan = omitter.plan(0)
    assert plan.layers[0].groups is None and plan.layers[0].channels is not None
    _compare(model, omitter, plan, batch(4))


@pytest.mark.parametrize("metric", ["activation", "uniform"])
def test_rate_zero_equals_dense_exactly(metric):
    model, dense = tiny_model("qwen3"), tiny_model("qwen3")
    inputs = batch(5)
    ref_logits, ref_grads = step_grads(dense, inputs)
    omitter = neurons.attach(model, rate=0.0, metric=metric)
    plan = omitter.plan(0)
    assert plan.layers == {}
    for _ in range(2):  # the second forward runs with statistics from the first
        logits, grads = step_grads(model, inputs)
        assert torch.equal(logits, ref_logits)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_eval_mode_runs_dense_whatever_the_plan():
    model, dense = tiny_model("mistral"), tiny_model("mistral")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    omitter.plan(0)
    ids = batch(6)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, dense.eval()(input_ids=ids).logits)


def test_revert_restores_the_original_forwards():
    model, dense = tiny_model("llama"), tiny_model("llama")
    mlp_forward, attn_forward = type(model.model.layers[0].mlp).forward, type(model.model.layers[0].self_attn).forward
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    omitter.plan(0)
    assert "forward" in vars(model.model.layers[0].mlp)
    with pytest.raises(RuntimeError, match="already has an Omitter"):
        neurons.attach(model, rate=0.5)
    neurons.revert(model)
    assert neurons.omitter_of(model) is None
    for layer in model.model.layers:
        for module in (layer.mlp, layer.self_attn):
            assert "forward" not in vars(module) and not hasattr(module, "_centrifuge_omission")
    assert model.model.layers[0].mlp.forward.__func__ is mlp_forward
    assert model.model.layers[0].self_attn.forward.__func__ is attn_forward
    inputs = batch(7)
    assert torch.equal(step_grads(model, inputs)[0], step_grads(dense, inputs)[0])
    neurons.attach(model, rate=0.5).revert()  # attachable again


def test_omission_linear_composes_with_the_shared_layer_recipe():
    model = tiny_model("qwen3", heads=8, kv_heads=4)
    spec, layer = spec_for(model), model.model.layers[1]
    attn = layer.self_attn
    lp = LayerPlan.build(channels=list(range(0, 128, 3)), groups=[0, 3], num_channels=128, num_groups=4,
                         heads_per_group=2, head_dim=attn.head_dim)
    plan = OmissionPlan(rate=0.5, layers={1: lp})
    gen = torch.Generator().manual_seed(0)
    R, D = 10, attn.head_dim
    x = torch.randn(R, 48, dtype=torch.float64, generator=gen)
    cos = torch.randn(R, D, dtype=torch.float64, generator=gen)
    sin = torch.randn(R, D, dtype=torch.float64, generator=gen)
    kept_heads = torch.tensor([0, 1, 6, 7])
    q, k, v = attention_inputs(layer, spec, x, cos, sin, omission_linear(lp))
    dq, dk, dv = attention_inputs(layer, spec, x, cos, sin, omission_linear(None))
    assert q.shape == (R, 4, D) and k.shape == (R, 2, D)
    assert torch.allclose(q, dq[:, kept_heads])
    assert torch.allclose(k, dk[:, [0, 3]]) and torch.allclose(v, dv[:, [0, 3]])
    o = torch.randn(R, 8, D, dtype=torch.float64, generator=gen)
    y = layer_output(layer, spec, x, o[:, kept_heads], omission_linear(lp))
    with reference_omission(model, plan):
        ref = layer_output(layer, spec, x, o, omission_linear(None))
    assert (y - ref).abs().max().item() < TOL


def test_mlp_backward_flops_halve_at_rate_half():
    model = tiny_model("llama", intermediate=256, layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)

    def backward_flops():
        y = mlp(x)
        with FlopCounterMode(display=False) as counter:
            y.pow(2).sum().backward()
        return counter.get_total_flops()

    dense = backward_flops()
    omitter = neurons.attach(model, rate=0.5, metric="uniform", heads=False, multiple=64)
    omitter.plan(0)
    assert mlp.forward.__self__ is mlp and omitter.current.layers[0].channels.numel() == 128
    assert backward_flops() == pytest.approx(0.5 * dense, rel=0.02)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_the_same_plan(reentrant):
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    plan = omitter.plan(0)
    inputs = batch(8)
    logits, grads = step_grads(model, inputs)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    omitter.set_plan(plan)
    ckpt_logits, ckpt_grads = step_grads(model, inputs)
    assert torch.equal(logits, ckpt_logits)
    for name, g in grads.items():
        assert (ckpt_grads[name] - g).abs().max().item() < TOL, name
