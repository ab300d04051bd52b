"""Misuse of the library API gets Centrifuge's own error, not a crash deep in the step or silent dense training:
``keep_mask=`` with ``select=``, a mask on another device, selection arguments after ``revert``."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, tiny_model

import centrifuge
from centrifuge.tokens import selectors


def _batch(gen, B=2, T=10):
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # unlabelled positions: a mask that keeps them crashed the backward with select=
    return ids, labels


@pytest.mark.parametrize("mode", ["fast", "reference", "loss_only"])
def test_keep_mask_and_select_together_are_refused(gen, mode):
    model = centrifuge.apply(tiny_model("llama"), mode=mode)
    ids, labels = _batch(gen)
    keep = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_mask= .* or select= .*not both"):
        model(input_ids=ids, labels=labels, keep_mask=keep, select=selectors.self_loss(0.5))


def test_keep_mask_on_another_device_is_refused(gen):
    model = centrifuge.apply(tiny_model("llama"))
    ids, labels = _batch(gen)
    keep = torch.ones_like(ids, dtype=torch.bool, device="meta")  # any device other than the inputs'
    with pytest.raises(ValueError, match=r"keep_mask is on meta but input_ids on cpu; pass keep_mask.to"):
        model(input_ids=ids, labels=labels, keep_mask=keep)


def test_selection_after_revert_is_refused_and_apply_again_works(gen):
    model = tiny_model("llama")
    ids, labels = _batch(gen)
    keep = torch.rand(ids.shape, generator=gen) < 0.5
    keep[:, 5] = True
    centrifuge.revert(centrifuge.apply(model))
    with pytest.raises(TypeError, match="centrifuge.revert un-patched"):
        model(input_ids=ids, labels=labels, keep_mask=keep)
    with pytest.raises(TypeError, match="centrifuge.revert un-patched"):
        model(input_ids=ids, labels=labels, select=selectors.self_loss(0.5))
    dense = model(input_ids=ids, labels=labels)  # the original forward still runs without them
    assert torch.isfinite(dense.loss)
    centrifuge.apply(model)
    out = model(input_ids=ids, labels=labels, keep_mask=keep)
    assert int(out.num_counted) == int((keep[:, :-1] & (labels[:, 1:] != -100)).sum())


def test_selection_after_revert_is_refused_through_a_peft_wrapper(gen):
    """PeftModelForCausalLM reaches the causal LM through ``.forward`` (no module call): the guard sits on
    the wrapper too, else a reverted LoRA model would train densely on a keep_mask without a word."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                     target_modules=["q_proj", "v_proj"]))
    ids, labels = _batch(gen)
    keep = torch.rand(ids.shape, generator=gen) < 0.5
    keep[:, 5] = True
    centrifuge.revert(centrifuge.apply(model))
    with pytest.raises(TypeError, match="centrifuge.revert un-patched"):
        model(input_ids=ids, labels=labels, keep_mask=keep)
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)
    centrifuge.apply(model)
    out = model(input_ids=ids, labels=labels, keep_mask=keep)
    assert int(out.num_counted) == int((keep[:, :-1] & (labels[:, 1:] != -100)).sum())
