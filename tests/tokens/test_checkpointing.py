"""Activation checkpointing (HF ``gradient_checkpointing_enable``) with the token-sparse backward: the same
gradients as the reference in both mask timings, fewer saved activations, and a recompute on kept rows only."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, max_rel_err, patched_forward_saving, run_mode, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from centrifuge.models.checkpointing import enable_activation_checkpointing


def _checkpointed(model):
    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    return model.train()


def _top5(*, scores, valid):
    top = scores.masked_fill(~valid, -1).topk(5, dim=1).indices
    return torch.zeros_like(valid).scatter_(1, top, True) & valid


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("timing", ["before", "after"])
def test_checkpointed_fast_path_equals_reference(model_type, timing, gen):
    model = _checkpointed(tiny_model(model_type))
    ids = torch.randint(0, VOCAB, (3, 17), generator=gen)
    sel = {"keep_mask": torch.rand(3, 17, generator=gen) < 0.4} if timing == "before" else {"select": _top5}
    out, grads = run_mode(model, "fast", input_ids=ids, labels=ids, **sel)
    ref_out, ref = run_mode(model, "reference", input_ids=ids, labels=ids, **sel)
    assert torch.allclose(out.loss, ref_out.loss, rtol=0, atol=1e-12)
    assert max_rel_err(grads, ref) < 1e-10


def _saved_and_backward_flops(model, ids, keep) -> tuple[int, int]:
    out, saved = patched_forward_saving(model, input_ids=ids, labels=ids, keep_mask=keep)
    with FlopCounterMode(display=False) as counter:
        out.loss.backward()  # the replay needs no patch: the graph holds its Functions
    return saved, counter.get_total_flops()


def test_checkpointing_saves_less_and_recomputes_kept_rows_only(gen):
    model = tiny_model("llama", layers=3, hidden_size=64, intermediate_size=192, head_dim=16)
    ids = torch.randint(0, VOCAB, (2, 96), generator=gen)
    keep = torch.zeros(2, 96, dtype=torch.bool)
    keep[:, 1::4] = True  # κ = 0.25
    saved, bwd = _saved_and_backward_flops(model, ids, keep)
    saved_ckpt, bwd_ckpt = _saved_and_backward_flops(_checkpointed(model), ids, keep)
    assert saved_ckpt < 0.6 * saved
    # the recompute (o_proj, gate_proj, up_proj on the kept rows) is ≈ κ × their full-row forward
    d, m, n_layers, rows = 64, 192, 3, 2 * 96
    full_value_gemms = n_layers * 2 * rows * (d * d + 2 * d * m)
    extra = bwd_ckpt - bwd
    assert 0.2 * full_value_gemms <= extra <= 0.3 * full_value_gemms
