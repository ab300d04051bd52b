"""enable_token_filtering / enable_neuron_omission in a real HF Trainer and TRL SFTTrainer: the updates equal
the library's own train_step (global kept-count normalization over the accumulation micro-batches)."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import (
    PackedRows,
    Recorder,
    max_rel_err,
    prompt_completion_data,
    replay,
    sft_config,
    tiny_model,
    training_args,
    word_tokenizer,
)
from transformers import Trainer, TrainerCallback

import centrifuge
from centrifuge import neurons
from centrifuge.integrations import enable_neuron_omission, enable_token_filtering, token_filtering_of
from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels
from centrifuge.schedules import make_schedule
from centrifuge.tokens import selectors
from centrifuge.tokens.training import TokenFilterLoss
from centrifuge.train.step import StepHooks, dense_loss

EXACT = 1e-12  # float64 model with float64 norms: two summation orders of the same numbers
# The Trainer's dense step is the model's own HF loss, which casts the logits to float32; train_step's
# dense_loss keeps float64. A wrong normalization or a wrong mask errs by > 1e-2.
HF_FP32_LOSS = 1e-6


def reference_run(batches, *, selector, schedule=None, total_steps, reference=None, lr=0.5, model_type="llama",
                  model=None, hooks=None, optimizer=None):
    """The library's own steps (``train_step`` + ``TokenFilterLoss``, which selects on its own) over the
    micro-batches the Trainer saw."""
    model = model if model is not None else tiny_model(model_type)
    centrifuge.apply(model)
    loss = TokenFilterLoss(selector=selector, dense_loss=dense_loss, schedule=schedule, total_steps=total_steps,
                           reference=reference)
    hooks = hooks or StepHooks()
    hooks.before_forward.insert(0, lambda step: loss.set_step(step - 1))  # train_step counts from 1
    return replay(model, batches, loss, lr=lr, hooks=hooks, optimizer=optimizer)


def fake_reference(batch) -> torch.Tensor:
    """Deterministic per-token 'reference losses' [B, T] from the token ids (any function of the batch)."""
    return (batch["input_ids"].double() * 0.37).sin() + 1.5


@pytest.mark.parametrize("selector, checkpointing", [("random", False), ("self_loss", False),
                                                     ("reference_loss", False), ("excess_loss", False),
                                                     ("random", True), ("self_loss", True)])
def test_trainer_equals_train_step_with_schedule(tmp_path, selector, checkpointing):
    """Three steps of 2 micro-batches; keep ratio 0.5 → 0.75 → 1.0 (linear): the last step is dense. With the
    Trainer's gradient checkpointing too (the reference runs without: the gradient must not change)."""
    model = tiny_model()
    recorder = Recorder()
    args = training_args(tmp_path, max_steps=3, gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=PackedRows(12, seed=1), callbacks=[recorder])
    reference = fake_reference if selector in ("reference_loss", "excess_loss") else None
    handle = enable_token_filtering(trainer, selector=selector, keep_ratio=0.5, scope="batch", schedule="linear",
                                    schedule_params={"end": 1.0}, reference=reference)
    recorder.handle = handle
    recorder.wrap(trainer)
    trainer.train()
    assert bool(getattr(model.model.layers[0], "gradient_checkpointing", False)) == checkpointing

    # the schedule moved per optimizer step: round(ratio × labelled) kept, per micro-batch (scope "batch")
    for step, ratio in enumerate((0.5, 0.75, 1.0)):
        counted, labelled, kept = recorder.counts[step]
        per_batch = [int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in recorder.batches[step]]
        assert labelled == sum(per_batch)
        assert counted == sum(int(n * ratio + 0.5) for n in per_batch), (step, counted, per_batch)
        if ratio < 1.0:
            assert kept == [int(n * ratio + 0.5) for n in per_batch]
    # the micro-batches keep different counts, so a per-micro-batch mean would differ from the global one
    assert len(set(recorder.counts[0][2])) > 1

    sel = selectors.make_selector(selector, ratio=0.5, scope="batch")
    grads, params = reference_run(recorder.batches, selector=sel, total_steps=3, reference=reference,
                                  schedule=make_schedule("linear", start=0.5, end=1.0))
    for step in range(3):
        tol = EXACT if step < 2 else HF_FP32_LOSS
        assert max_rel_err(recorder.grads[step], grads[step]) < tol, step
        assert max_rel_err(recorder.params[step], params[step]) < tol, step
    # and the filtered step is not the dense one: the updates are far apart
    dense_grads, _ = replay(centrifuge.revert(tiny_model()), recorder.batches[:1], dense_loss, lr=0.5)
    assert max_rel_err(recorder.grads[0], dense_grads[0]) > 1e-2


def test_sft_trainer_completion_only(tmp_path):
    """TRL SFTTrainer on prompt/completion pairs: prompt tokens (-100) are never kept, right padding neither,
    and the update equals train_step's."""
    from trl import SFTTrainer

    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = tiny_model(**special)
    recorder = Recorder()
    args = sft_config(tmp_path, max_length=32, bf16=False, completion_only_loss=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prompt_completion_data(8, seed=3),
                         processing_class=word_tokenizer(), callbacks=[recorder])
    handle = enable_token_filtering(trainer, selector="self_loss", keep_ratio=0.6)
    recorder.handle = handle
    recorder.wrap(trainer)
    trainer.train()

    first = recorder.batches[0][0]
    assert "attention_mask" in first and bool((first["attention_mask"] == 0).any())  # padded rows
    assert bool((first["labels"][first["attention_mask"] == 1] == IGNORE_INDEX).any())  # prompts unlabelled
    for counted, labelled, _ in recorder.counts:
        assert 0 < counted < labelled
    for mask, batch in zip(handle.keep_masks, recorder.batches[-1], strict=True):
        labelled = shift_labels(batch["labels"]) != IGNORE_INDEX
        assert mask.any() and not bool((mask & ~labelled).any())  # never a prompt or padding position

    grads, params = reference_run(recorder.batches, selector=selectors.self_loss(0.6), total_steps=2,
                                  model=tiny_model(**special))
    for step in range(2):
        assert max_rel_err(recorder.grads[step], grads[step]) < EXACT, step
        assert max_rel_err(recorder.params[step], params[step]) < EXACT, step


OMISSION = dict(rate=0.5, metric="uniform", select="sample", multiple=8)


def test_neuron_option_equals_train_step(tmp_path):
    """Token filtering and neuron omission together; the plan of each step is made at its begin."""
    model = tiny_model()
    recorder = Recorder()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=PackedRows(8, seed=2),
                      callbacks=[recorder])
    enable_token_filtering(trainer, selector="random", keep_ratio=0.5)
    omitter = enable_neuron_omission(trainer, **OMISSION, schedule="linear", end=0.0)
    recorder.wrap(trainer)
    trainer.train()
    assert omitter.total_steps == 2
    # step 0 omitted channels (rate 0.5): those rows of gate_proj have exactly zero gradient
    gate = recorder.grads[0]["model.layers.0.mlp.gate_proj.weight"]
    zero_rows = int((gate.abs().sum(1) == 0).sum())
    assert zero_rows == gate.shape[0] - neurons.kept_count(gate.shape[0], 0.5, 8)
    assert int((recorder.grads[1]["model.layers.0.mlp.gate_proj.weight"].abs().sum(1) == 0).sum()) == 0  # rate 0

    ref = tiny_model()
    ref_omitter = neurons.attach(ref, total_steps=2, **OMISSION, schedule="linear", end=0.0)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_omitter.protect(optimizer)
    hooks = StepHooks(before_forward=[lambda step: ref_omitter.plan(step - 1)])
    grads, params = reference_run(recorder.batches, selector=selectors.random(0.5), total_steps=2, model=ref,
                                  hooks=hooks, optimizer=optimizer)
    for step in range(2):
        assert max_rel_err(recorder.grads[step], grads[step]) < EXACT, step
        assert max_rel_err(recorder.params[step], params[step]) < EXACT, step


class _Slices(TrainerCallback):
    """Omitted weight slices of each step and the parameters before / after the optimizer step."""

    def __init__(self, omitter):
        self.omitter, self.steps = omitter, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append([(p, dim, ids, p.detach().clone()) for p, dim, ids in self.omitter.omitted_slices()])

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1] = [(before, p.detach().clone(), dim, ids) for p, dim, ids, before in self.steps[-1]]


@pytest.mark.parametrize("tokens", [True, False], ids=["with-token-filtering", "alone"])
def test_neuron_option_protects_adamw(tmp_path, tokens):
    """Under AdamW with weight decay, omitted rows do not move; the other rows do."""
    model = tiny_model()
    args = training_args(tmp_path, optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=PackedRows(8, seed=4))
    if tokens:
        enable_token_filtering(trainer, selector="random", keep_ratio=0.5)
    omitter = enable_neuron_omission(trainer, **OMISSION)
    slices = _Slices(omitter)
    trainer.add_callback(slices)
    trainer.train()
    assert len(slices.steps) == 2 and all(slices.steps)
    for step in slices.steps:
        for before, after, dim, ids in step:
            assert torch.equal(before.index_select(dim, ids), after.index_select(dim, ids))
            kept = torch.ones(before.shape[dim], dtype=torch.bool)
            kept[ids] = False
            assert not torch.equal(before.index_select(dim, kept.nonzero().flatten()),
                                   after.index_select(dim, kept.nonzero().flatten()))


def test_evaluation_stays_dense(tmp_path):
    """trainer.evaluate() goes through the trainer's own loss: the dense eval loss of the same weights."""
    data = PackedRows(4, seed=5)
    plain = Trainer(model=tiny_model(), args=training_args(tmp_path / "a"), eval_dataset=data)
    filtered = Trainer(model=tiny_model(), args=training_args(tmp_path / "b"), eval_dataset=data)
    enable_token_filtering(filtered, selector="random", keep_ratio=0.3)
    assert filtered.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(selector="nope"), "unknown token selector 'nope'"),
    (dict(keep_ratio=0.0), r"keep ratio must be in \(0, 1\]"),
    (dict(keep_ratio=1.5), r"keep ratio must be in \(0, 1\]"),
    (dict(schedule="linear", schedule_params={"end": 1.5}), r"gives 1.5 at the end; every value must be in \(0, 1\]"),
    (dict(schedule="zigzag"), "unknown schedule 'zigzag'"),
    (dict(mode="sparse"), "unknown mode 'sparse'"),
    (dict(selector="threshold"), "selector 'threshold' is not supported under Trainer"),
    (dict(selector="excess_loss"), "needs reference losses"),
    (dict(selector="label_mask", schedule="linear"), "takes no keep-ratio schedule"),
    (dict(ddp_find_unused_parameters=True), "ddp_find_unused_parameters=True does not work with mode='fast'"),
])
def test_bad_input_changes_nothing(tmp_path, kwargs, match):
    model = tiny_model()
    args = training_args(tmp_path, ddp_find_unused_parameters=kwargs.pop("ddp_find_unused_parameters", None))
    trainer = Trainer(model=model, args=args, train_dataset=PackedRows(4))
    with pytest.raises(ValueError, match=match):
        enable_token_filtering(trainer, **kwargs)
    assert token_filtering_of(trainer) is None and centrifuge.patch_mode(model) is None
    assert "compute_loss" not in vars(trainer) and "get_batch_samples" not in vars(trainer)
    with pytest.raises(neurons.OmissionRateError):
        enable_neuron_omission(trainer, rate=1.0)
    assert neurons.omitter_of(model) is None and len(trainer.callback_handler.callbacks) == 2  # default ones


def test_revert_restores_the_trainer(tmp_path):
    model = tiny_model()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=PackedRows(4))
    flags = (trainer.model_accepts_loss_kwargs, trainer.loss_is_scaled_for_ga)
    assert trainer.accelerator.ddp_handler.find_unused_parameters  # the Trainer's default without checkpointing
    handle = enable_token_filtering(trainer)
    assert centrifuge.patch_mode(model) == "fast" and token_filtering_of(trainer) is handle
    assert not trainer.accelerator.ddp_handler.find_unused_parameters  # see test_distributed.py
    with pytest.raises(ValueError, match="already enabled"):
        enable_token_filtering(trainer)
    handle.revert()
    assert centrifuge.patch_mode(model) is None and token_filtering_of(trainer) is None
    assert "compute_loss" not in vars(trainer) and "get_batch_samples" not in vars(trainer)
    assert (trainer.model_accepts_loss_kwargs, trainer.loss_is_scaled_for_ga) == flags
    assert trainer.accelerator.ddp_handler.find_unused_parameters


def test_batches_without_labels_are_refused(tmp_path):
    rows = [{"input_ids": r["input_ids"]} for r in PackedRows(4)]
    trainer = Trainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=rows)
    enable_token_filtering(trainer)
    with pytest.raises(ValueError, match="token filtering needs labels"):
        trainer.train()
