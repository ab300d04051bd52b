"""Per-layer attention geometry: layers whose attention windows differ get their own window in the backward.

A regression test for a wrong-gradient bug: the forward used to rewrite one shared per-step layout for each
layer and every layer's backward read it afterwards, by then holding the *last* layer's window, so the
gradients of layers whose window differed from the last layer's were wrong (forward and loss were right).
The uniform-window tests elsewhere could not see it. Both orders of windows are tested (sliding first, full
first), with every CPU attention backend, both backward implementations, both mask timings and activation
checkpointing, against the float64 reference (filtered tokens' K/V detached in every layer).
"""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, max_rel_err, run_mode, tiny_model

from centrifuge.models.checkpointing import enable_activation_checkpointing

T = 40  # long enough that a window of 8 cuts most pairs: a wrong window changes gradients by O(1)
WINDOW = 8


def _mixed(order: str, model_type: str):
    """A 2-layer model whose layers use different windows, in ``order`` ("sliding_first" / "full_first")."""
    if model_type == "qwen3":
        types = ["sliding_attention", "full_attention"]
        if order == "full_first":
            types = types[::-1]
        return tiny_model("qwen3", heads=6, kv_heads=2, sliding_window=WINDOW, use_sliding_window=True,
                          layer_types=types)
    # Qwen2: layers >= max_window_layers slide. max_window_layers=1 → layer 0 full, layer 1 sliding.
    assert order == "full_first"
    return tiny_model("qwen2", heads=6, kv_heads=2, sliding_window=WINDOW, use_sliding_window=True,
                      max_window_layers=1)


def _window_of_layers(model) -> list:
    return [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]


def _top_13(*, scores, valid):
    """13 highest-loss positions of the whole batch (an odd count; rows get different counts)."""
    flat = scores.masked_fill(~valid, float("-inf")).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(13).indices] = True
    return keep.view_as(valid) & valid


CASES = [("qwen3", "sliding_first"), ("qwen3", "full_first"), ("qwen2", "full_first")]


@pytest.mark.parametrize(("model_type", "order"), CASES)
def test_mixed_windows_model_really_mixes(model_type, order):
    windows = _window_of_layers(_mixed(order, model_type))
    assert len(set(windows)) == 2 and WINDOW in windows and None in windows, windows


@pytest.mark.parametrize(("model_type", "order"), CASES)
@pytest.mark.parametrize(("attention", "backward", "timing"), [
    ("math", "auto", "before"), ("math", "replay", "before"), ("math", "auto", "after"),
    ("sdpa", "auto", "after"),
])
def test_mixed_windows_fast_equals_reference(model_type, order, attention, backward, timing, gen):
    model = _mixed(order, model_type)
    ids = torch.randint(0, VOCAB, (2, T), generator=gen)
    sel = {"keep_mask": torch.rand(2, T, generator=gen) < 0.37} if timing == "before" else {"select": _top_13}
    ref_out, ref = run_mode(model, "reference", input_ids=ids, labels=ids, **sel)
    out, got = run_mode(model, "fast", attention=attention, backward=backward, input_ids=ids, labels=ids, **sel)
    assert torch.equal(out.keep_mask, ref_out.keep_mask)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert max_rel_err(got, ref) < 1e-10
    # the windows matter: the same weights with every layer full-attention give other gradients
    full_model = tiny_model(model_type, heads=6, kv_heads=2)
    _, full = run_mode(full_model, "reference", input_ids=ids, labels=ids, keep_mask=out.keep_mask)
    assert full.keys() == ref.keys()
    assert max_rel_err(full, ref) > 1e-3


@pytest.mark.parametrize("order", ["sliding_first", "full_first"])
def test_mixed_windows_checkpointed(order, gen):
    model = _mixed(order, "qwen3")
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, T), generator=gen)
    keep = torch.rand(2, T, generator=gen) < 0.41
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err(got, ref) < 1e-10


def _head16(order: str):
    """The mixed-window qwen3 model with head_dim 16 (the Triton kernels' smallest)."""
    types = ["sliding_attention", "full_attention"]
    types = types if order == "sliding_first" else types[::-1]
    return tiny_model("qwen3", heads=4, kv_heads=2, hidden_size=32, head_dim=16, sliding_window=WINDOW,
                      use_sliding_window=True, layer_types=types)


@pytest.mark.parametrize("order", ["sliding_first", "full_first"])
def test_mixed_windows_triton_interpreted(order, gen, monkeypatch):
    """The Triton backend (its kernels take the window per call) under the interpreter, float64."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _head16(order)
    ids = torch.randint(0, VOCAB, (1, 33), generator=gen)
    keep = torch.rand(1, 33, generator=gen) < 0.43
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", attention="triton", input_ids=ids, labels=ids, keep_mask=keep)
    assert max_rel_err(got, ref) < 1e-10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["auto", "triton", "flash", "math"])
@pytest.mark.parametrize("order", ["sliding_first", "full_first"])
def test_mixed_windows_gpu_bf16(order, attention, gen):
    """Every CUDA backend, bf16: the fast path against the reference, relative to bf16 noise (the reference
    in bf16 against itself in float64)."""
    model = _head16(order).cuda()
    ids = torch.randint(0, VOCAB, (2, 40), generator=gen).cuda()
    keep = (torch.rand(2, 40, generator=gen) < 0.41).cuda()
    _, ref64 = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    model = model.bfloat16()
    _, ref = run_mode(model, "reference", input_ids=ids, labels=ids, keep_mask=keep)
    _, got = run_mode(model, "fast", attention=attention, input_ids=ids, labels=ids, keep_mask=keep)
    noise = max_rel_err({n: g.double() for n, g in ref.items()}, ref64)
    assert max_rel_err({n: g.double() for n, g in got.items()}, ref64) < 4 * noise + 1e-2


# ------------------------------------------------------------------------------------------------------
# Packed documents: the patched model attends as the unpatched model does on the same call
# ------------------------------------------------------------------------------------------------------


def _packed(gen, B=2, T=23):
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    pos = torch.cat([torch.arange(9), torch.arange(5), torch.arange(9)]).expand(B, T).clone()
    pos[1] = torch.cat([torch.arange(4), torch.arange(19)])
    return ids, pos


def _dense_token_loss(model, ids, pos, **call) -> torch.Tensor:
    """[B, T] per-token CE of the unpatched model (float64 logits), 0 on the last position (no target)."""
    logits = model(input_ids=ids, position_ids=pos, **call).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.nn.functional.pad(loss, (0, 1))


@pytest.mark.parametrize("call", [{}, {"use_cache": True}, {"use_cache": False}, "checkpointing"])
def test_packed_documents_follow_the_unpatched_model(call, gen, caplog):
    """Default call (cache on, no mask): documents see each other in HF's model and in the patched one;
    ``use_cache=False`` or checkpointing in training (cache off): kept apart in both."""
    model = tiny_model("llama")
    assert model.config.use_cache
    if call == "checkpointing":
        enable_activation_checkpointing(model)
        model.train()
        call = {}
    separated = call.get("use_cache") is False or model.model.gradient_checkpointing
    ids, pos = _packed(gen)
    keep = torch.rand(ids.shape, generator=gen) < 0.47
    dense = _dense_token_loss(model, ids, pos, **call).detach()  # grad on: HF's checkpointing rule needs it
    inputs = dict(input_ids=ids, position_ids=pos, labels=ids, keep_mask=keep, **call)
    ref_out, ref = run_mode(model, "reference", return_token_loss=True, **inputs)
    with caplog.at_level("WARNING", logger="centrifuge"):
        out, got = run_mode(model, "fast", return_token_loss=True, **inputs)
    assert torch.allclose(out.token_loss.double(), dense, rtol=0, atol=1e-6)  # token_loss is fp32
    assert torch.allclose(ref_out.token_loss.double(), dense, rtol=0, atol=1e-6)
    assert max_rel_err(got, ref) < 1e-10
    with torch.no_grad():  # the setting matters (no grad: HF's checkpointing does not turn the cache off)
        other = _dense_token_loss(model, ids, pos, use_cache=separated)
    assert (other - dense).abs().max() > 1e-4
    if not separated:
        import centrifuge.tokens.forward as fwd

        assert fwd._warned_packed_with_cache
