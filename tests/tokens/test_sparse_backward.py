"""The token-sparse backward equals its reference (filtered keys/values detached) on random inputs."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, grads_of, max_rel_err, patched_forward_saving, run_mode, tiny_model
from torch.utils.flop_counter import FlopCounterMode

import centrifuge
from centrifuge.tokens import selectors

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def random_batch(gen, B=3, T=13):
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    keep = torch.rand(B, T, generator=gen) < 0.45
    return ids, keep


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fast_equals_reference_float64(model_type, gen):
    model = tiny_model(model_type)
    ids, keep = random_batch(gen)
    ref_out, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    out, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert max_rel_err(got, ref) < 1e-10
    # the approximation is real: the exact masked-loss gradient differs
    _, exact = run_mode(model, "loss_only", input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err(exact, ref) > 1e-4


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_gqa_one_kv_head_and_mha(kv_heads, attention, gen):
    model = tiny_model("llama", heads=4, kv_heads=kv_heads)
    ids, keep = random_batch(gen, B=2, T=17)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", attention=attention, input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err(got, ref) < 1e-10


def test_mask_after_forward_batch_topk(gen):
    """Exact Rho-1 timing: selection on the current loss after the forward, variable counts per row."""
    model = tiny_model("qwen3")
    ids, _ = random_batch(gen, B=3, T=19)
    select = selectors.self_loss(0.37, scope="batch")
    ref_out, ref = run_mode(model, "reference", input_ids=ids, labels=ids, select=select)
    out, got = run_mode(model, "fast", input_ids=ids, labels=ids, select=select)
    assert torch.equal(out.keep_mask, ref_out.keep_mask)
    per_row = out.keep_mask.sum(-1)
    assert per_row.unique().numel() > 1  # batch-level top-k: rows keep different counts
    assert out.num_counted.item() == round(0.37 * 3 * 18)
    assert max_rel_err(got, ref) < 1e-10
    _, got_sdpa = run_mode(model, "fast", attention="sdpa", input_ids=ids, labels=ids, select=select)
    assert max_rel_err(got_sdpa, ref) < 1e-10


def test_both_timings_give_the_same_gradients(gen):
    model = tiny_model("llama")
    ids, _ = random_batch(gen, B=2, T=15)
    select = selectors.self_loss(0.5)
    out_a, after = run_mode(model, "fast", input_ids=ids, labels=ids, select=select)
    _, before = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=out_a.keep_mask)
    assert max_rel_err(before, after) < 1e-12


def test_packed_documents_with_restarting_positions(gen):
    model = tiny_model("mistral")
    B, T = 2, 16
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    pos = torch.cat([torch.arange(7), torch.arange(5), torch.arange(4)]).expand(B, T).clone()
    pos[1] = torch.cat([torch.arange(3), torch.arange(13)])
    labels = ids.clone()
    labels[pos == 0] = -100  # no prediction across a document boundary
    keep = torch.rand(B, T, generator=gen) < 0.5
    # use_cache=False: HF keeps packed documents apart only without a KV cache (the patched model follows it)
    inputs = dict(input_ids=ids, position_ids=pos, labels=labels, keep_mask=keep, use_cache=False)
    _, ref = run_mode(model, "reference", **inputs)
    _, got = run_mode(model, "fast", **inputs)
    assert max_rel_err(got, ref) < 1e-10
    _, got_sdpa = run_mode(model, "fast", attention="sdpa", **inputs)  # SDPA with an explicit mask
    assert max_rel_err(got_sdpa, ref) < 1e-10
    # documents really are separated: gradients change when the positions do not restart
    _, unpacked = run_mode(model, "reference", **{**inputs, "position_ids": None})
    assert max_rel_err(unpacked, ref) > 1e-6


def test_right_padding_never_kept(gen):
    model = tiny_model("qwen2")
    B, T = 3, 11
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, 7:] = 0
    am[2, 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    keep = torch.ones(B, T, dtype=torch.bool)  # asks for everything, padding included
    inputs = dict(input_ids=ids, attention_mask=am, labels=labels, keep_mask=keep)
    ref_out, ref = run_mode(model, "reference", **inputs)
    out, got = run_mode(model, "fast", **inputs)
    assert not out.keep_mask[am == 0].any()
    assert max_rel_err(got, ref) < 1e-10


def test_keep_all_equals_ordinary_dense_training(gen):
    model = tiny_model("llama")
    ids, _ = random_batch(gen, B=2, T=14)
    model.zero_grad(set_to_none=True)
    dense_loss = model(input_ids=ids, labels=ids).loss
    dense_loss.backward()
    dense = grads_of(model)
    keep_all = torch.ones_like(ids, dtype=torch.bool)
    out, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep_all)
    # HF computes its loss from float32 logits, hence float32-level agreement here
    assert abs(out.loss.item() - dense_loss.item()) < 1e-6
    assert max_rel_err(got, dense) < 1e-5


def test_tiny_ratio_and_a_row_with_nothing_kept(gen):
    model = tiny_model("llama")
    ids, _ = random_batch(gen, B=3, T=9)
    keep = torch.zeros(3, 9, dtype=torch.bool)
    keep[1, 4] = True  # one token in the whole batch; rows 0 and 2 keep nothing
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    out, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    assert out.num_counted.item() == 1
    assert max_rel_err(got, ref) < 1e-10


def test_nothing_kept_is_an_error_and_changes_nothing(gen):
    model = tiny_model("llama")
    ids, _ = random_batch(gen, B=2, T=9)
    centrifuge.apply(model)
    labels = ids.clone()
    labels[:, 1:5] = -100
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[:, 0:4] = True  # kept, but none of these positions has a label
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(centrifuge.EmptySelectionError):
        model(input_ids=ids, labels=labels, keep_mask=keep)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)]
)
def test_lower_precision_tolerances(dtype, tol, gen):
    model = tiny_model("qwen3", dtype=dtype)
    ids, keep = random_batch(gen, B=2, T=21)
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert max_rel_err(got, ref) < tol


def test_bf16_autocast_with_fp32_weights(gen):
    """Mixed precision as `centrifuge train` runs it on GPUs: fp32 weights, bf16 autocast."""
    model = tiny_model("llama", dtype=torch.float32)
    ids, keep = random_batch(gen, B=2, T=21)
    grads = {}
    for mode in ("reference", "fast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads[mode] = run_mode(model, mode, input_ids=ids, labels=ids, keep_mask=keep)
    assert all(torch.isfinite(g).all() for g in grads["fast"].values())
    assert max_rel_err(grads["fast"], grads["reference"]) < 6e-2


@pytest.mark.parametrize("select", [False, True], ids=["keep_mask", "select"])
def test_lm_head_runs_in_the_autocast_dtype(gen, monkeypatch, select):
    """Under autocast the kept rows' LM head + CE gets bf16 operands, as autocast's lm_head linear does in the
    dense model: its backward runs outside autocast, and with fp32 master weights its GEMMs would otherwise run
    in fp32 (measured on an H200: ~30% of a token-sparse step). Scores for ``select`` likewise."""
    import centrifuge.ops.cross_entropy as ce

    seen = []
    real = ce._ChunkedLinearCrossEntropy.apply

    def spy(hidden, weight, *rest):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *rest)

    monkeypatch.setattr(ce._ChunkedLinearCrossEntropy, "apply", spy)
    model = tiny_model("llama", dtype=torch.float32)
    ids, keep = random_batch(gen, B=2, T=21)
    kwargs = {"select": lambda *, scores, valid: keep & valid} if select else {"keep_mask": keep}
    centrifuge.apply(model)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, **kwargs)
        out.loss.backward()
    finally:
        centrifuge.revert(model)
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)
    assert len(seen) == (2 if select else 1)  # scores of every row, then the kept rows' loss
    assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()


def test_loss_normalized_by_global_count_across_accumulation(gen):
    """Two micro-batches with num_items_in_batch = the global kept count give one big batch's gradient."""
    model = tiny_model("llama")
    ids, keep = random_batch(gen, B=4, T=12)
    _, whole = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    counted = (keep[:, :-1]).sum()  # last position has no next token
    centrifuge.apply(model)
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        out = model(input_ids=ids[half], labels=ids[half], keep_mask=keep[half], num_items_in_batch=counted)
        out.loss.backward()
    centrifuge.revert(model)
    assert max_rel_err(grads_of(model), whole) < 1e-10


def test_mask_before_forward_saves_only_kept_rows(gen):
    """Known-before-forward keeps saved activations for kept rows only (plus full-row K/V)."""
    model = tiny_model("llama", layers=3)
    ids, _ = random_batch(gen, B=2, T=64)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[:, ::4] = True

    _, after = patched_forward_saving(model, input_ids=ids, labels=ids, select=lambda *, scores, valid: keep & valid)
    _, before = patched_forward_saving(model, input_ids=ids, labels=ids, keep_mask=keep)
    assert before < 0.45 * after


def backward_flops(model, mode: str, **inputs) -> int:
    centrifuge.apply(model, mode=mode)
    try:
        out = model(**inputs)
        with FlopCounterMode(display=False) as counter:
            out.loss.backward()
    finally:
        centrifuge.revert(model)
    return counter.get_total_flops()


def test_backward_flops_fall_with_keep_ratio(gen):
    model = tiny_model("llama", layers=2, hidden_size=64, intermediate_size=172, head_dim=16)
    B, T = 2, 96
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    model.zero_grad(set_to_none=True)
    # eager attention so that the counter sees the dense attention matmuls too (CPU SDPA is not counted)
    model.config._attn_implementation = "eager"
    loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    dense = counter.get_total_flops()
    flops = {}
    for ratio in (0.25, 0.5):
        keep = selectors.random(ratio)(scores=None, valid=torch.ones(B, T, dtype=torch.bool))
        flops[ratio] = backward_flops(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    loss_only = backward_flops(model, "loss_only", input_ids=ids, labels=ids, keep_mask=keep)
    model.config._attn_implementation = "sdpa"
    assert flops[0.5] <= 0.55 * dense, (flops, dense)
    assert flops[0.25] < flops[0.5]
    assert loss_only > 0.95 * dense  # masking the loss alone saves nothing


def test_apply_revert_and_errors(gen):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_model("llama")
    ids, keep = random_batch(gen, B=2, T=8)
    plain = model(input_ids=ids).logits
    assert centrifuge.apply(model) is model
    assert centrifuge.patch_mode(model) == "fast"
    assert torch.equal(model(input_ids=ids).logits, plain)  # no selection: the original forward
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=ids, labels=ids, keep_mask=keep[:, :5])
    with pytest.raises(ValueError, match="bool"):
        model(input_ids=ids, labels=ids, keep_mask=keep.long())
    assert all("forward" in vars(layer) for layer in model.model.layers)  # layers dispatch (FSDP2 hooks)
    centrifuge.revert(model)
    assert "forward" not in vars(model) and centrifuge.patch_mode(model) is None
    assert not any("forward" in vars(layer) or "_centrifuge_layer_dispatch" in vars(layer)
                   for layer in model.model.layers)
    assert torch.equal(model(input_ids=ids).logits, plain)
    with pytest.raises(ValueError, match="mode"):
        centrifuge.apply(model, mode="fastest")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(centrifuge.UnsupportedModelError, match="'gpt2'") as err:
        centrifuge.apply(gpt2)
    assert all(family in str(err.value) for family in centrifuge.REGISTRY)  # names every supported family


def test_patched_forward_keeps_the_original_signature():
    """Tools that read inputs from the forward's signature (HF Trainer drops unnamed columns) still see them."""
    import inspect

    model = tiny_model("llama")
    before = inspect.signature(model.forward).parameters
    centrifuge.apply(model)
    after = inspect.signature(model.forward).parameters
    assert list(after)[: len(before) - 1] == [p for p in before if before[p].kind is not inspect.Parameter.VAR_KEYWORD]
    assert {"keep_mask", "select", "num_items_in_batch"} <= set(after)
    centrifuge.revert(model)
    assert inspect.signature(model.forward).parameters == before


def test_a_layer_forward_replaced_after_apply_is_detected(gen):
    """Another library patching a decoder layer's forward after apply: the token-sparse step refuses to run the
    replacement (it would lose the kept-rows backward), and revert leaves the replacement alone."""
    model = tiny_model("llama")
    ids, keep = random_batch(gen, B=2, T=8)
    centrifuge.apply(model)
    layer = model.model.layers[1]
    replacement = layer.forward
    layer.forward = lambda *args, **kwargs: replacement(*args, **kwargs)
    with pytest.raises(RuntimeError, match="replaced after centrifuge.apply"):
        model(input_ids=ids, labels=ids, keep_mask=keep)
    mine = layer.forward
    centrifuge.revert(model)
    assert layer.forward is mine and "_centrifuge_layer_dispatch" not in vars(layer)
    assert "forward" not in vars(model.model.layers[0])
