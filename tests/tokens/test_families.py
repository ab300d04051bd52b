"""Gemma 2 / 3, OLMo 2, Granite and Phi-3 through the token-sparse fast path, float64, against

* the reference semantics (plain autograd through the HF model with filtered tokens' K/V detached): GQA,
  odd keep counts, both mask timings, padding, packed documents — to 1e-10;
* the unpatched HF model itself with every token kept (the fast path's loss and gradients are then ordinary
  dense training: this also checks the oracle's handling of soft-caps, multipliers and norms).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_models import FAMILIES, family_model, float64_gemma_norms  # noqa: F401 (autouse fixture)
from token_models import VOCAB, grads_of, max_rel_err, run_mode

import centrifuge

TOL = 1e-10
B, T = 3, 23


def _top_11(*, scores, valid):
    """11 highest-loss positions of the batch (odd count, rows get different counts)."""
    flat = scores.masked_fill(~valid, float("-inf")).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(11).indices] = True
    return keep.view_as(valid) & valid


def _compare(model, **inputs):
    ref_out, ref = run_mode(model, "reference", **inputs)
    out, got = run_mode(model, "fast", **inputs)
    assert torch.equal(out.keep_mask, ref_out.keep_mask)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert got.keys() == ref.keys()
    assert max_rel_err(got, ref) < TOL
    return out, got, ref


@pytest.mark.parametrize("timing", ["before", "after"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_fast_equals_reference(model_type, timing, gen):
    model = family_model(model_type)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    sel = {"keep_mask": torch.rand(B, T, generator=gen) < 0.43} if timing == "before" else {"select": _top_11}
    _, got, ref = _compare(model, input_ids=ids, labels=ids, **sel)
    if timing == "before":  # the approximation is real: the masked-loss gradient differs
        _, exact = run_mode(model, "loss_only", input_ids=ids, labels=ids, **sel)
        assert max_rel_err(exact, ref) > 1e-4


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_padding_and_packed_documents(model_type, gen):
    model = family_model(model_type, heads=4, kv_heads=1)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    keep = torch.rand(B, T, generator=gen) < 0.5
    _compare(model, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), keep_mask=keep)
    pos = torch.cat([torch.arange(10), torch.arange(13)]).expand(B, T).clone()
    pos[1] = torch.cat([torch.arange(4), torch.arange(6), torch.arange(13)])
    _compare(model, input_ids=ids, position_ids=pos, labels=ids.masked_fill(pos == 0, -100), keep_mask=keep,
             use_cache=False)


def _dense_float64(model, ids):
    """Loss (mean CE from the HF model's float64 logits) and gradients of the unpatched model."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_keep_all_is_the_hf_model(model_type, gen):
    model = family_model(model_type)
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    dense_loss, dense = _dense_float64(model, ids)
    keep_all = torch.ones_like(ids, dtype=torch.bool)
    out, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep_all)
    # Gemma 2's HF attention is eager with a float32 softmax even for float64 inputs: float32-level agreement
    tol = 1e-6 if model_type == "gemma2" else TOL
    assert abs(out.loss.item() - dense_loss.item()) < tol
    assert max_rel_err(got, dense) < tol


def test_gemma2_soft_caps_matter_and_other_backends_refuse(gen):
    """Gemma 2's soft-caps change the model (so the tests above see them), and a backend that cannot
    soft-cap attention scores refuses instead of computing another function."""
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    _, capped = _dense_float64(family_model("gemma2"), ids)
    _, uncapped = _dense_float64(family_model("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None),
                                 ids)
    assert max_rel_err(capped, uncapped) > 1e-2
    model = family_model("gemma2")
    keep = torch.rand(2, 19, generator=gen) < 0.5
    for attention in ("sdpa", "triton"):
        with pytest.raises(ValueError, match="soft-cap"):
            run_mode(model, "fast", attention=attention, input_ids=ids, labels=ids, keep_mask=keep)
    # without the score cap, Gemma 2 runs on the other backends too
    model = family_model("gemma2", attn_logit_softcapping=None)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", attention="sdpa", input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err(got, ref) < TOL


def test_families_are_registered_and_others_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert set(FAMILIES) <= set(centrifuge.REGISTRY)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(centrifuge.UnsupportedModelError, match="supported families") as err:
        centrifuge.apply(gpt2)
    assert all(family in str(err.value) for family in centrifuge.REGISTRY)


def test_chunked_loss_with_logit_softcap_equals_reference(gen):
    """The chunked LM-head loss with Gemma 2's final soft-cap against plain autograd on full logits."""
    from centrifuge.ops.cross_entropy import chunked_token_loss, reference_token_loss, token_loss_no_grad

    h = torch.randn(37, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 53, (37,), generator=gen)
    targets[::5] = -100
    weights = torch.rand(37, dtype=torch.float64, generator=gen)
    ref = reference_token_loss(h, w, targets, softcap=1.7)
    dh, dw = torch.autograd.grad((ref * weights).sum(), (h, w))
    got = chunked_token_loss(h, w, targets, chunk_size=8, softcap=1.7)
    gh, gw = torch.autograd.grad((got * weights).sum(), (h, w))
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert torch.allclose(gh, dh, rtol=0, atol=1e-12) and torch.allclose(gw, dw, rtol=0, atol=1e-12)
    assert torch.allclose(token_loss_no_grad(h, w, targets, softcap=1.7).double(), ref, atol=1e-6)
    assert (reference_token_loss(h, w, targets) - ref).abs().max() > 1e-2  # the cap matters


# ------------------------------------------------------------------------------------------------------
# Neuron omission: MLP channels and KV-group heads where the family allows them, a clear refusal elsewhere
# ------------------------------------------------------------------------------------------------------

OMISSION = {"gemma2": True, "gemma3_text": True, "granite": True, "olmo2": False}  # heads omitted too?


def _omission_plan(model, heads: bool):
    from centrifuge.neurons import LayerPlan, OmissionPlan

    cfg, attn = model.config, model.model.layers[0].self_attn
    return OmissionPlan(rate=0.5, layers={
        i: LayerPlan.build(channels=[0, 3, 4, 9, 31, 50, 51, 52, 79], groups=[1] if heads else None,
                           num_channels=cfg.intermediate_size, num_groups=cfg.num_key_value_heads,
                           heads_per_group=attn.num_key_value_groups, head_dim=attn.head_dim)
        for i in range(cfg.num_hidden_layers)})


@pytest.mark.parametrize("token_sparse", [False, True])
@pytest.mark.parametrize("model_type", list(OMISSION))
def test_omission_equals_reference(model_type, token_sparse, gen):
    """Sliced omission (alone, or inside the token-sparse step) against the dense model with omitted channels'
    activations and omitted heads' outputs multiplied by zero."""
    from centrifuge import neurons
    from centrifuge.neurons import reference_omission

    heads = OMISSION[model_type]
    model = family_model(model_type).train()
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    keep = torch.rand(2, 19, generator=gen) < 0.45
    plan = _omission_plan(model, heads)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=8, heads=heads)
    omitter.set_plan(plan)
    try:
        if token_sparse:
            _, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
        else:
            got = _dense_float64(model, ids)[1]
    finally:
        omitter.revert()
    with reference_omission(model, plan):
        ref = (run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)[1] if token_sparse
               else _dense_float64(model, ids)[1])
    assert max_rel_err(got, ref) < (1e-6 if model_type == "gemma2" and not token_sparse else TOL)
    assert torch.all(got["model.layers.0.mlp.up_proj.weight"][1] == 0)
    if heads:  # KV group 0 (query heads 0-2) omitted
        assert torch.all(got["model.layers.1.self_attn.o_proj.weight"][:, :36] == 0)


def test_omission_refusals():
    from centrifuge import neurons

    with pytest.raises(centrifuge.UnsupportedModelError, match="fused projections"):
        neurons.attach(family_model("phi3"), rate=0.5)
    with pytest.raises(centrifuge.UnsupportedModelError, match="heads=False"):
        neurons.attach(family_model("olmo2"), rate=0.5, heads=True)


def test_moe_settings_the_step_does_not_compute_are_refused():
    """Random router jitter and q/k/v clipping are refused with the reason; neuron omission is refused for
    mixture-of-experts families."""
    from centrifuge import neurons

    for model_type, setting in (("mixtral", {"router_jitter_noise": 0.1}), ("olmoe", {"clip_qkv": 2.0})):
        model = family_model(model_type, **setting)
        with pytest.raises(centrifuge.UnsupportedModelError, match=next(iter(setting))):
            centrifuge.apply(model)
    with pytest.raises(centrifuge.UnsupportedModelError, match="neuron omission"):
        neurons.attach(family_model("olmoe"), rate=0.5, heads=False)


def test_moe_router_and_expert_grads_come_from_kept_rows(gen):
    """Mixtral, float64: routing is decided in the forward over all rows (no grad); the router and the experts
    then run with autograd on the kept rows only (the backward's recompute: same inputs, same top-k choice), so
    their gradients are sums over kept rows — and equal the oracle's."""
    model = family_model("mixtral")
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    keep = torch.rand(2, 19, generator=gen) < 0.45
    calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].shape[1], torch.is_grad_enabled())))
    try:
        _, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    finally:
        hook.remove()
    assert calls == [(2 * 19, False), (int(keep.sum()), True)]  # all rows without grad, then kept rows only
    router = [n for n in got if "mlp.gate" in n]
    experts = [n for n in got if "mlp.experts" in n]
    assert router and experts and all(got[n].abs().sum() > 0 for n in router)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err({n: got[n] for n in router + experts}, {n: ref[n] for n in router + experts}) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_families_gpu_bf16(model_type, gen):
    """CUDA, bf16, default backends (auto attention, compiled element-wise ops): the fast path against the
    float64 reference, relative to bf16 noise (the bf16 reference against the same float64 one)."""
    model = family_model(model_type, head_dim=16, heads=4, kv_heads=2).cuda()
    ids = torch.randint(0, VOCAB, (2, 40), generator=gen).cuda()
    keep = (torch.rand(2, 40, generator=gen) < 0.43).cuda()
    _, ref64 = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    model = model.bfloat16()
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", compile=None, input_ids=ids, labels=ids, keep_mask=keep)
    noise = max_rel_err({n: g.double() for n, g in ref.items()}, ref64)
    assert max_rel_err({n: g.double() for n, g in got.items()}, ref64) < 4 * noise + 1e-2


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_activation_checkpointing(model_type, gen):
    """Checkpointed layers save only their input and attention output and recompute on kept rows what the
    backward reads (post-norm families: the MLP output too; MoE: the whole block)."""
    from centrifuge.models.checkpointing import enable_activation_checkpointing

    model = family_model(model_type)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 21), generator=gen)
    keep = torch.rand(2, 21, generator=gen) < 0.4
    _compare(model, input_ids=ids, labels=ids, keep_mask=keep)


MOE = ["qwen3_moe", "mixtral", "olmoe"]


@pytest.mark.parametrize("timing", ["before", "after"])
@pytest.mark.parametrize("model_type", MOE)
def test_moe_aux_loss_over_counted_tokens(model_type, timing, gen):
    """With output_router_logits, the load-balancing loss over the counted tokens is added (coef · aux) and its
    gradient reaches the router (and, through it, the layers below) on kept rows only — as in the oracle."""
    model = family_model(model_type, output_router_logits=True, router_aux_loss_coef=0.7)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    sel = {"keep_mask": torch.rand(B, T, generator=gen) < 0.43} if timing == "before" else {"select": _top_11}
    ref_out, _ = run_mode(model, "reference", input_ids=ids, labels=ids, **sel)
    out, got, ref = _compare(model, input_ids=ids, labels=ids, **sel)
    assert out.aux_loss is not None and abs(out.aux_loss.item() - ref_out.aux_loss.item()) < 1e-12
    assert torch.allclose(out.loss_sum / out.num_counted, out.loss, rtol=0, atol=1e-12)
    # the aux loss is really in the gradient: without it the router's gradient differs
    model.config.output_router_logits = False
    _, plain = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=out.keep_mask)
    router = [n for n in got if "mlp.gate" in n]
    assert max_rel_err({n: plain[n] for n in router}, {n: got[n] for n in router}) > 1e-3


@pytest.mark.parametrize("model_type", MOE)
def test_moe_aux_loss_keep_all_is_hf_aux_over_labelled_tokens(model_type, gen):
    """Every token kept: the loss is HF's CE + coef · HF's own load_balancing_loss_func with the labelled
    positions as its token mask (the last position predicts nothing, so it does not count)."""
    import importlib

    from centrifuge.models.registry import REGISTRY

    model = family_model(model_type, output_router_logits=True, router_aux_loss_coef=0.7)
    ids = torch.randint(0, VOCAB, (2, 19), generator=gen)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    logits = out.logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    labelled = torch.ones_like(ids, dtype=torch.float64)
    labelled[:, -1] = 0
    hf = importlib.import_module(REGISTRY[model_type].modeling_module)
    aux = hf.load_balancing_loss_func(out.router_logits, model.num_experts, model.config.num_experts_per_tok,
                                      labelled)
    (ce + 0.7 * aux).backward()
    dense = grads_of(model)
    fast_out, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=torch.ones_like(ids, dtype=torch.bool))
    assert abs(fast_out.aux_loss.item() - aux.item()) < 1e-12
    # HF's load_balancing_loss_func returns float32 even for float64 logits: float32-level agreement of the sum
    assert abs(fast_out.loss.item() - (ce + 0.7 * aux).item()) < 1e-6
    assert max_rel_err(got, dense) < 1e-6
