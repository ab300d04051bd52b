"""The hand-written kept-rows backward (``centrifuge.tokens.direct``) against the autograd replay and the
reference: float64 to rounding, every model type, both mask timings, neuron-omission plans, checkpointing,
bf16, frozen parameters, and the hooks autograd runs when it accumulates parameter gradients."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, max_rel_err, run_mode, tiny_model

import centrifuge
from centrifuge import neurons
from centrifuge.neurons import LayerPlan, OmissionPlan
from centrifuge.tokens import direct

TOL = 1e-10  # float64; HF's RMSNorm computes in float32 and the formulas follow autograd op by op


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


@pytest.fixture
def direct_calls(monkeypatch):
    """Counts the layers whose backward ran through ``direct.backward``."""
    calls = []
    original = direct.backward

    def counting(*args, **kwargs):
        calls.append(kwargs["layer"])
        return original(*args, **kwargs)

    monkeypatch.setattr(direct, "backward", counting)
    return calls


def _top7(*, scores, valid):
    """The 7 highest-loss positions of the whole batch (rows get different counts)."""
    flat = scores.masked_fill(~valid, float("-inf")).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(7).indices] = True
    return keep.view_as(valid) & valid


def _selection(timing, gen, b, t):
    return {"keep_mask": torch.rand(b, t, generator=gen) < 0.4} if timing == "before" else {"select": _top7}


@pytest.mark.parametrize("timing", ["before", "after"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_direct_equals_replay_and_reference(model_type, timing, gen, direct_calls):
    model = tiny_model(model_type, heads=6, kv_heads=2, layers=3)
    ids = torch.randint(0, VOCAB, (3, 23), generator=gen)
    sel = _selection(timing, gen, 3, 23)
    out, grads = run_mode(model, "fast", input_ids=ids, labels=ids, **sel)
    assert len(direct_calls) == 3
    _, replay = run_mode(model, "fast", backward="replay", input_ids=ids, labels=ids, **sel)
    assert len(direct_calls) == 3  # the replay did not call it
    ref_out, ref = run_mode(model, "reference", input_ids=ids, labels=ids, **sel)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert grads.keys() == ref.keys() == replay.keys()
    assert max_rel_err(grads, replay) < TOL
    assert max_rel_err(grads, ref) < TOL


def test_padding_and_bias_model(gen, direct_calls):
    """qwen2 (q/k/v biases) with left padding and an odd keep pattern."""
    model = tiny_model("qwen2", heads=4, kv_heads=1)
    ids = torch.randint(0, VOCAB, (2, 17), generator=gen)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0
    keep = (torch.rand(2, 17, generator=gen) < 0.5) & mask.bool()
    _, grads = run_mode(model, "fast", input_ids=ids, attention_mask=mask, labels=ids, keep_mask=keep)
    _, ref = run_mode(model, "reference", input_ids=ids, attention_mask=mask, labels=ids, keep_mask=keep)
    assert direct_calls and max_rel_err(grads, ref) < TOL
    assert grads["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0


def _plan(model, channels, groups) -> OmissionPlan:
    cfg, attn = model.config, model.model.layers[0].self_attn
    return OmissionPlan(rate=0.5, layers={
        i: LayerPlan.build(channels=channels, groups=groups, num_channels=cfg.intermediate_size,
                           num_groups=cfg.num_key_value_heads, heads_per_group=attn.num_key_value_groups,
                           head_dim=attn.head_dim)
        for i in range(cfg.num_hidden_layers)
    })


def _direct_and_replay_with_omission(model, ids, keep, *, channels, groups):
    """Parameter gradients of the direct backward and of the replay, both under one omission plan."""
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=8)
    omitter.set_plan(_plan(model, channels=channels, groups=groups))
    try:
        _, grads = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
        _, replay = run_mode(model, "fast", backward="replay", input_ids=ids, labels=ids, keep_mask=keep)
    finally:
        omitter.revert()
    return grads, replay


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_direct_with_neuron_omission_equals_replay(model_type, gen, direct_calls):
    model = tiny_model(model_type, heads=6, kv_heads=3)
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    keep = torch.rand(2, 19, generator=gen) < 0.45
    grads, replay = _direct_and_replay_with_omission(model, ids, keep, channels=[0, 3, 4, 9, 31, 50, 51, 52, 79],
                                                     groups=[0, 2])
    assert len(direct_calls) == 2
    assert max_rel_err(grads, replay) < TOL
    up = grads["model.layers.0.mlp.up_proj.weight"]
    assert torch.all(up[1] == 0) and up[3].abs().sum() > 0
    assert torch.all(grads["model.layers.1.self_attn.o_proj.weight"][:, 24:48] == 0)  # group 1: heads 2, 3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_direct_reuses_the_forwards_weight_slices_except_under_checkpointing(checkpointing, gen, direct_calls,
                                                                              monkeypatch):
    model = tiny_model("llama", heads=6, kv_heads=3)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids = torch.randint(0, VOCAB, (2, 17), generator=gen)
    keep = torch.rand(2, 17, generator=gen) < 0.5
    sliced_again = []
    original = direct.plan_weight
    monkeypatch.setattr(direct, "plan_weight", lambda *a: sliced_again.append(a[1]) or original(*a))
    grads, replay = _direct_and_replay_with_omission(model, ids, keep, channels=[2, 5, 6, 40, 41, 70, 71, 72, 78],
                                                     groups=[1, 2])
    assert len(direct_calls) == 2
    assert max_rel_err(grads, replay) < TOL
    assert len(sliced_again) == (2 * 7 if checkpointing else 0)


@pytest.mark.parametrize("timing", ["before", "after"])
def test_direct_with_activation_checkpointing(timing, gen, direct_calls):
    model = tiny_model("qwen3", heads=4, kv_heads=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, VOCAB, (2, 21), generator=gen)
    sel = _selection(timing, gen, 2, 21)
    _, grads = run_mode(model, "fast", input_ids=ids, labels=ids, **sel)
    _, replay = run_mode(model, "fast", backward="replay", input_ids=ids, labels=ids, **sel)
    assert direct_calls and max_rel_err(grads, replay) < TOL


def test_bf16_close_to_reference(gen, direct_calls):
    model = tiny_model("llama", dtype=torch.bfloat16, heads=4, kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 31), generator=gen)
    keep = torch.rand(2, 31, generator=gen) < 0.5
    _, grads = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    assert direct_calls
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert max_rel_err(grads, ref) < 3e-2


def test_frozen_parameters_get_no_gradient(gen, direct_calls):
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.input_layernorm.weight.requires_grad_(False)
        layer.self_attn.k_proj.weight.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, 15), generator=gen)
    keep = torch.rand(2, 15, generator=gen) < 0.5
    _, grads = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    _, replay = run_mode(model, "fast", backward="replay", input_ids=ids, labels=ids, keep_mask=keep)
    assert direct_calls
    assert "model.layers.0.input_layernorm.weight" not in grads
    assert "model.layers.1.self_attn.k_proj.weight" not in grads
    assert grads.keys() == replay.keys() and max_rel_err(grads, replay) < TOL


def test_accumulation_hooks_run_and_gradients_accumulate(gen, direct_calls):
    """Parameter gradients go through autograd's accumulation: hooks fire (DDP relies on them) and a second
    backward adds to ``.grad``."""
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.gate_proj.weight
    fired = []
    weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    ids = torch.randint(0, VOCAB, (2, 15), generator=gen)
    keep = torch.rand(2, 15, generator=gen) < 0.5
    centrifuge.apply(model)
    try:
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
    finally:
        centrifuge.revert(model)
    assert direct_calls and len(fired) == 2
    assert torch.allclose(weight.grad, 2 * fired[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("variant", ["plain", "omission", "checkpointing"])
def test_autocast_direct_equals_replay(model_type, variant, gen, direct_calls):
    """fp32 master weights under bf16 autocast (the training loop's default on CUDA): the formulas cast where
    autograd casts, so direct and replay agree bit for bit in every layer's parameters (the fp32 sum of the
    three projections' input gradients may round in another order: ~1e-7 in the embedding); both stay close
    to the fp32 reference."""
    model = tiny_model(model_type, dtype=torch.float32, heads=6, kv_heads=3, layers=3)
    ids = torch.randint(0, VOCAB, (3, 29), generator=gen)
    keep = torch.rand(3, 29, generator=gen) < 0.45
    omitter = None
    if variant == "omission":
        omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=8)
        omitter.set_plan(_plan(model, channels=[1, 2, 7, 8, 30, 44, 60, 61, 77], groups=[0, 2]))
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
            assert len(direct_calls) == 3
            _, replay = run_mode(model, "fast", backward="replay", input_ids=ids, labels=ids, keep_mask=keep)
        _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    finally:
        if omitter is not None:
            omitter.revert()
    assert len(direct_calls) == 3
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert max_rel_err(grads, replay) < 1e-5
    assert max_rel_err(grads, ref) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_autocast_direct_equals_replay_on_cuda(model_type, compile, gen, direct_calls):
    """The training loop's setting on a GPU: fp32 weights, CUDA bf16 autocast, the backend's kept-token attention
    (head dim 64: the Triton kernel), compiled or eager element-wise formulas."""
    model = tiny_model(model_type, dtype=torch.float32, heads=4, kv_heads=2, layers=2, head_dim=64,
                       hidden_size=128, intermediate_size=200).cuda()
    ids = torch.randint(0, VOCAB, (2, 150), generator=gen).cuda()
    keep = (torch.rand(2, 150, generator=gen) < 0.45).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, grads = run_mode(model, "fast", compile=compile, input_ids=ids, labels=ids, keep_mask=keep)
        _, replay = run_mode(model, "fast", compile=compile, backward="replay", input_ids=ids, labels=ids,
                             keep_mask=keep)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    assert len(direct_calls) == 2
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Eager: the same roundings (measured bit-equal up to fp32 summation order). Compiled: inductor keeps a
    # fused kernel's bf16 intermediates in fp32, and the two graphs fuse differently — bf16-level differences.
    assert max_rel_err(grads, replay) < (1e-2 if compile else 1e-3)
    assert max_rel_err(grads, ref) < 5e-2


def test_peft_like_layers_use_the_replay():
    model = tiny_model("llama", dtype=torch.float32)
    layer = model.model.layers[0]
    assert direct.supports(layer, centrifuge.models.registry.spec_for(model))
    layer.mlp.up_proj = torch.nn.Sequential(layer.mlp.up_proj)  # stands in for a wrapped (e.g. LoRA) linear
    assert not direct.supports(layer, centrifuge.models.registry.spec_for(model))


def test_unknown_backward_is_refused():
    with pytest.raises(ValueError, match="unknown backward"):
        centrifuge.apply(tiny_model("llama"), backward="manual")
