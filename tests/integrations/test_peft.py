"""PEFT LoRA with the token-sparse backward: ``centrifuge.apply(peft_model)`` in one line; the adapters'
gradients equal the reference mode's (float64), frozen base weights get none."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import VOCAB, PackedRows, Recorder, max_rel_err, replay, tiny_model, training_args
from peft import LoraConfig, get_peft_model
from transformers import Trainer

import centrifuge
from centrifuge.integrations import enable_neuron_omission, enable_token_filtering
from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.tokens import selectors
from centrifuge.tokens.training import TokenFilterLoss
from centrifuge.train.step import StepHooks, dense_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model_type: str, seed: int = 0, **lora):
    """A tiny causal LM with LoRA adapters on every projection; random B (PEFT's default B = 0 would give
    lora_A a zero gradient and make half the comparison vacuous)."""
    fields = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                  init_lora_weights=False)
    config = LoraConfig(**{**fields, **lora})
    torch.manual_seed(seed + 1)
    return get_peft_model(tiny_model(model_type, seed=seed), config)


def lora_grads(model, mode: str, **inputs) -> dict[str, torch.Tensor]:
    centrifuge.apply(model, mode=mode)
    try:
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen, frozen
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        centrifuge.revert(model)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("kept", [13, 27])  # not multiples of 8
def test_lora_fast_equals_reference(model_type, kept):
    model = lora_model(model_type)
    gen = torch.Generator().manual_seed(kept)
    B, T = 3, 17
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    labels = ids.clone()
    labels[1, :6] = IGNORE_INDEX  # a prompt
    positions = torch.arange(T).repeat(B, 1)
    positions[2, 9:] = torch.arange(T - 9)  # a packed document boundary
    labels[2, 9] = IGNORE_INDEX
    labelled = torch.cat([labels[:, 1:] != IGNORE_INDEX, torch.zeros(B, 1, dtype=torch.bool)], 1)
    scores = torch.rand(B, T, generator=gen).masked_fill(~labelled, -1.0)
    keep = torch.zeros(B * T, dtype=torch.bool)
    keep[scores.flatten().topk(kept).indices] = True
    keep = keep.view(B, T)
    inputs = dict(input_ids=ids, labels=labels, position_ids=positions, keep_mask=keep)

    fast = lora_grads(model, "fast", **inputs)
    ref = lora_grads(model, "reference", **inputs)
    assert fast and all("lora_" in name for name in fast), sorted(fast)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(fast)
    assert all(bool(g.abs().sum() > 0) for g in fast.values())
    assert max_rel_err(fast, ref) < 1e-10
    # the fast path is not the plain masked-loss gradient (filtered tokens' keys and values are constants)
    assert max_rel_err(lora_grads(model, "loss_only", **inputs), ref) > 1e-6
    assert centrifuge.patch_mode(model) is None and "forward" not in vars(model.get_base_model())


def test_lora_in_trainer_equals_train_step(tmp_path):
    """enable_token_filtering on a Trainer whose model is a PeftModel: only adapters move, as in train_step."""
    model = lora_model("qwen2")
    recorder = Recorder()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=PackedRows(8, seed=6),
                      callbacks=[recorder])
    enable_token_filtering(trainer, selector="self_loss", keep_ratio=0.4)
    recorder.wrap(trainer)
    trainer.train()

    ref = lora_model("qwen2")
    centrifuge.apply(ref)
    loss = TokenFilterLoss(selector=selectors.self_loss(0.4), dense_loss=dense_loss, total_steps=2)
    hooks = StepHooks(before_forward=[lambda step: loss.set_step(step - 1)])
    grads, params = replay(ref, recorder.batches, loss, lr=0.5, hooks=hooks)
    for step in range(2):
        assert all("lora_" in name for name in recorder.grads[step])
        assert max_rel_err(recorder.grads[step], grads[step]) < 1e-12
        assert max_rel_err(recorder.params[step], params[step]) < 1e-12


def test_lora_dropout_is_refused_by_the_trainer_integration(tmp_path):
    """The fast backward recomputes adapters on kept rows: a second dropout draw would not match the forward's."""
    model = lora_model("llama", lora_dropout=0.1)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=PackedRows(4))
    with pytest.raises(ValueError, match="lora_dropout"):
        enable_token_filtering(trainer)
    assert centrifuge.patch_mode(model) is None
    enable_token_filtering(trainer, mode="loss_only")  # plain autograd: dropout is fine


def test_neuron_omission_refuses_adapters(tmp_path):
    model = lora_model("llama")
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=PackedRows(4))
    with pytest.raises(ValueError, match="does not support PEFT adapters"):
        enable_neuron_omission(trainer, rate=0.5)
    assert len(trainer.callback_handler.callbacks) == 2  # the Trainer's defaults only
