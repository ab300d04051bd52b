"""Token filtering inside a Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``): one line after building it.

    from centrifuge.integrations import enable_token_filtering
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)   # or SFTTrainer
    enable_token_filtering(trainer, selector="random", keep_ratio=0.5)
    trainer.train()

**Why a function that patches one trainer instance** (rather than a mixin or a ``Trainer`` subclass): it
works unchanged with ``Trainer``, ``SFTTrainer`` and any user subclass of either (no class to combine, no
method-resolution order to get right), it is one line added to an existing script, and it can be undone
(``TokenFiltering.revert()``). It replaces two methods *on the instance*: ``get_batch_samples`` (which the
training loop calls once per optimizer step with all its micro-batches) and ``compute_loss``. Evaluation
and prediction go through the trainer's own ``compute_loss`` untouched (the dense loss).

**Per optimizer step** (``trainer.state.global_step`` = steps done, 0-based like the CLI's schedule):
the keep ratio comes from ``schedule(global_step, max_steps)`` and the selector runs with ``step=global_step``,
as ``centrifuge.tokens.training.TokenFilterLoss`` does in ``centrifuge train``.

**Loss normalization under gradient accumulation** equals ``centrifuge.train.step.train_step``: the step's
gradient is that of (sum of CE over every counted token of all micro-batches) / (their global count). The
Trainer divides each micro-batch's loss by the ``num_items_in_batch`` that ``get_batch_samples`` returns and
does not divide by the accumulation steps again (``loss_is_scaled_for_ga``), so that count must be the
global *kept* count, known before the first micro-batch's forward:

* selectors known before the forward (``random``, ``label_mask``, ``reference_loss``): the keep masks of all
  micro-batches of the step are drawn up front in ``get_batch_samples`` and the count is their labelled sum;
* selectors that rank the current loss after the forward (``self_loss``, ``excess_loss``): *which* tokens
  are kept is known only after each forward, but *how many* is not data dependent: top-k keeps
  round(ratio × labelled) per sequence (scope "sequence") or per micro-batch (scope "batch"), a function
  of the labels alone. The count is computed up front from the labels, and each forward checks that its
  selection kept exactly the announced number. So the normalization is exact in both cases.
* ``threshold`` keeps a data-dependent number of tokens, which no up-front count can match: it is refused.

With ``average_tokens_across_devices`` (the default) and several processes, the count is summed over ranks
and the loss multiplied by the number of processes (DDP averages gradients), as ``Trainer.compute_loss``
does (tested with two gloo processes: equal to one ``train_step`` over both ranks' micro-batches). In
``mode="fast"`` DDP's ``find_unused_parameters`` is switched off: the decoder layers run inside an
``autograd.Function`` whose backward replays them, so DDP's search of the forward graph would not see
their parameters. A scheduled keep ratio of 1.0 (ratio-based selectors) is ordinary dense training through
the trainer's own loss, like the CLI (there the HF loss casts logits to float32). The Trainer's gradient
checkpointing works (the fast path honours the layers' flag). TRL's per-token metrics (entropy, token
accuracy) are not logged for filtered steps: the token-sparse forward builds no logits.

Inputs: each micro-batch is a dict of [B, T] tensors ``input_ids``, ``labels`` (-100 = no label: padding,
prompt tokens of completion-only SFT — never kept), optional ``attention_mask`` and ``position_ids``.
``keep_mask[b, t]`` keeps the prediction made at t (of ``labels[b, t + 1]``).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable

import torch
import torch.nn as nn

from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels
from centrifuge.schedules import make_schedule
from centrifuge.tokens.selectors import (
    LabelMaskSelector,
    Selector,
    ThresholdSelector,
    labelled_positions,
    make_selector,
)

_ATTR = "_centrifuge_token_filtering"
_THRESHOLD_REFUSED = ("selector 'threshold' is not supported under Trainer: its kept count depends on the current "
                      "loss, so the gradient-accumulation normalization cannot be known before the forward")
_PLAN_KEY = "centrifuge_plan"  # the micro-batch's _MicroPlan rides in its input dict (a non-tensor: not moved)

Reference = Callable[[dict], torch.Tensor]


@dataclasses.dataclass
class _MicroPlan:
    """What one micro-batch of the current step does; made in ``get_batch_samples``, used in ``compute_loss``.

    Attributes:
        index: position of the micro-batch in its step.
        step: the optimizer step (``global_step``) the micro-batch belongs to.
        dense: keep ratio 1.0 this step: the trainer's own loss.
        keep_mask: [B, T] bool chosen before the forward, or None (selected after it).
        selector: this step's selector (keep ratio set), for selection after the forward.
        expected: int, tokens this micro-batch counts (kept and labelled).
        reference: [B, T] reference losses for the selector, or None.
    """

    index: int
    step: int
    dense: bool
    keep_mask: torch.Tensor | None
    selector: Selector | None
    expected: int
    reference: torch.Tensor | None = None


class TokenFiltering:
    """The token filtering installed on one trainer by ``enable_token_filtering``.

    Attributes:
        selector: the configured selector (its ratio is the schedule's value at the current step).
        schedule: keep ratio as ``f(step, total_steps)``; None for selectors without a ratio (``label_mask``).
        mode: the ``centrifuge.apply`` mode.
        keep_ratio: this step's keep ratio (1.0 = dense step).
        num_counted: global tokens counted in the last step (kept and labelled, all micro-batches and ranks).
        num_labelled: global labelled tokens of the last step.
        keep_masks: [B, T] bool per micro-batch of the last step (after each forward for ``self_loss``).
    """

    def __init__(self, trainer, *, selector: Selector, schedule, mode: str, attention: str,
                 reference: Reference | None):
        self.trainer = trainer
        self.selector = selector
        self.schedule = schedule
        self.mode = mode
        self.attention = attention
        self.reference = reference
        self.keep_ratio = float(getattr(selector, "ratio", 1.0))
        self.num_counted = 0
        self.num_labelled = 0
        self.keep_masks: list[torch.Tensor | None] = []
        self._saved_attrs: dict[str, object] = {}
        self._saved_ddp = None  # the DDP kwargs handler whose find_unused_parameters was switched off
        self._liger_applied = False  # Liger-Kernel applied here for Trainer(use_liger_kernel=True)

    # ------------------------------------------------------------------------------------------ install

    def _install(self) -> None:
        import centrifuge

        trainer = self.trainer
        for name in ("get_batch_samples", "compute_loss", "model_accepts_loss_kwargs", "loss_is_scaled_for_ga"):
            self._saved_attrs[name] = vars(trainer).get(name, _MISSING)
        if hasattr(trainer, "_set_signature_columns_if_needed"):
            # The Trainer drops dataset columns the model's forward does not name; it must read the original
            # forward's signature, not the patched (*args, keep_mask=..., **kwargs) one.
            trainer._set_signature_columns_if_needed()
        if getattr(trainer.args, "use_liger_kernel", False):
            # Trainer.train() would apply Liger-Kernel when training starts, rebinding the model's forward over
            # Centrifuge's (token filtering silently off). Apply it now, under Centrifuge's patch, and tell the
            # trainer it is done; revert() gives the flag back (Liger's kernels stay, as train() leaves them).
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
            trainer.args.use_liger_kernel = False
            self._liger_applied = True
        centrifuge.apply(trainer.model, mode=self.mode, attention=self.attention)
        handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
        if self.mode == "fast" and handler is not None and handler.find_unused_parameters:
            # The fast path runs each decoder layer inside an autograd.Function whose backward replays it, so
            # the layers' parameters are not in the forward graph DDP searches: it would mark them unused (ready)
            # at the forward and again when the replay produces their gradients. Every parameter does get one.
            self._saved_ddp = handler
            handler.find_unused_parameters = False
        original_batches, original_loss = trainer.get_batch_samples, trainer.compute_loss
        self._original_compute_loss = original_loss

        def get_batch_samples(_self, epoch_iterator, num_batches, device):
            samples, num_items = original_batches(epoch_iterator, num_batches, device)
            return samples, self._plan_step(samples, device, num_items)

        def compute_loss(_self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plan = inputs.pop(_PLAN_KEY, None) if hasattr(inputs, "pop") else None
            if plan is None or plan.dense or not model.training:
                # evaluation, prediction, and dense steps (keep ratio 1.0): the trainer's own loss, with the
                # step's labelled count as num_items_in_batch — exactly what it does without Centrifuge
                return original_loss(model, inputs, return_outputs=return_outputs,
                                     num_items_in_batch=num_items_in_batch)
            return self._compute_loss(model, inputs, plan, num_items_in_batch, return_outputs)

        trainer.get_batch_samples = types.MethodType(get_batch_samples, trainer)
        trainer.compute_loss = types.MethodType(compute_loss, trainer)
        # The loss we return is already divided by the step's global count: the Trainer must pass that count
        # and must not divide by the accumulation steps again (older transformers decide from the first flag,
        # newer ones from the second).
        trainer.model_accepts_loss_kwargs = True
        trainer.loss_is_scaled_for_ga = True
        setattr(trainer, _ATTR, self)

    def revert(self) -> None:
        """Undo ``enable_token_filtering``: the trainer's own methods and the unpatched model again."""
        import centrifuge

        trainer = self.trainer
        for name, value in self._saved_attrs.items():
            if value is _MISSING:
                vars(trainer).pop(name, None)
            else:
                setattr(trainer, name, value)
        centrifuge.revert(trainer.model)
        if self._liger_applied:
            trainer.args.use_liger_kernel = True
        if self._saved_ddp is not None:
            self._saved_ddp.find_unused_parameters = True
        if getattr(trainer, _ATTR, None) is self:
            delattr(trainer, _ATTR)

    # ------------------------------------------------------------------------------------------ per step

    def _ratio_at(self, step: int, total: int) -> float:
        if self.schedule is None:
            return 1.0
        total = max(int(total), 1)
        ratio = float(self.schedule(min(step, total - 1), total))
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio schedule gave {ratio} at step {step}; it must be in (0, 1]")
        return ratio

    def _plan_step(self, samples: list, device, hf_num_items):
        """Attach a ``_MicroPlan`` to every micro-batch of this optimizer step; return the global count."""
        trainer = self.trainer
        step = int(trainer.state.global_step)
        ratio = self._ratio_at(step, trainer.state.max_steps)
        self.keep_ratio = ratio
        dense = self.schedule is not None and ratio >= 1.0
        selector = self.selector if self.schedule is None else self.selector.with_ratio(ratio)
        counted = labelled = 0
        self.keep_masks = []
        for index, batch in enumerate(samples):
            labels = batch.get("labels")
            if labels is None:
                raise ValueError("token filtering needs labels [B, T] in every batch (-100 = no label), e.g. from "
                                 "DataCollatorForLanguageModeling(tokenizer, mlm=False)")
            valid = labelled_positions(labels, batch.get("attention_mask"))
            n_labelled = int(valid.sum())
            labelled += n_labelled
            if dense:
                # the model's own loss counts every label (the HF rule: labels[:, 1:] != -100)
                plan = _MicroPlan(index, step, True, None, None, int((shift_labels(labels) != IGNORE_INDEX).sum()))
                self.keep_masks.append(None)
            else:
                reference = self._reference_of(batch)
                if selector.needs_current_loss:
                    # top-k counts depend on the labels only: probe with constant scores
                    probe = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
                    kept = selector(scores=probe, valid=valid, step=step,
                                    reference=None if reference is None else probe)
                    plan = _MicroPlan(index, step, False, None, selector, int(kept.sum()), reference)
                    self.keep_masks.append(None)
                else:
                    keep = selector(scores=None, valid=valid, step=step, reference=reference) & valid
                    plan = _MicroPlan(index, step, False, keep, None, int(keep.sum()), reference)
                    self.keep_masks.append(keep)
            counted += plan.expected
            batch[_PLAN_KEY] = plan
        total = torch.tensor([counted, labelled], dtype=torch.int64)
        if self._across_ranks():
            total = trainer.accelerator.gather(total.to(device)[None]).sum(0).cpu()
        self.num_counted, self.num_labelled = int(total[0]), int(total[1])
        if self.num_counted == 0:
            # every micro-batch would raise EmptySelectionError; say it once, for the whole step
            from centrifuge.tokens.forward import EmptySelectionError

            raise EmptySelectionError(f"step {step}: no token of any micro-batch is labelled and kept")
        return torch.tensor(self.num_counted, dtype=torch.int64, device=device)

    def _across_ranks(self) -> bool:
        args = self.trainer.args
        return bool(args.average_tokens_across_devices) and args.world_size > 1

    def _reference_of(self, batch) -> torch.Tensor | None:
        if not getattr(self.selector, "needs_reference", False):
            return None
        ref = self.reference(batch)
        if not isinstance(ref, torch.Tensor) or ref.shape != batch["labels"].shape:
            got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"reference(batch) must return [B, T] = {tuple(batch['labels'].shape)} losses, got {got}")
        return ref

    # ------------------------------------------------------------------------------------------ the loss

    def _compute_loss(self, model: nn.Module, inputs: dict, plan: _MicroPlan, num_items_in_batch, return_outputs):
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
        device = inputs["input_ids"].device
        if plan.keep_mask is not None:
            out = model(**inputs, keep_mask=plan.keep_mask.to(device), num_items_in_batch=num_items_in_batch)
        else:
            reference = None if plan.reference is None else plan.reference.to(device)

            def select(*, scores, valid):
                return plan.selector(scores=scores, valid=valid, step=plan.step, reference=reference)

            out = model(**inputs, select=select, num_items_in_batch=num_items_in_batch)
            if int(out.num_counted) != plan.expected:
                raise RuntimeError(f"selection after the forward counted {int(out.num_counted)} tokens, "
                                   f"{plan.expected} were announced for the loss normalization")
            if plan.index < len(self.keep_masks):
                self.keep_masks[plan.index] = out.keep_mask.detach()
        loss = out.loss
        if self._across_ranks():
            loss = loss * self.trainer.accelerator.num_processes  # DDP averages the gradients over ranks
        return (loss, out) if return_outputs else loss


_MISSING = object()


def _check_ratio_schedule(schedule) -> None:
    """Refuse a schedule that leaves (0, 1] (linear, cosine and ladder are monotone: the ends suffice)."""
    for step in (0, 1):
        value = float(schedule(step, 2))
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"keep ratio schedule gives {value} at {'the start' if step == 0 else 'the end'}; "
                             "every value must be in (0, 1]")


def _check_no_adapter_dropout(model: nn.Module) -> None:
    """Refuse LoRA dropout: the fast backward recomputes adapters on the kept rows, which would draw a second
    dropout mask, not the one the forward used (the gradient would belong to another loss)."""
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for drop in dropouts.values():
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    raise ValueError(f"{name}: lora_dropout={drop.p} is not supported by mode='fast' (its backward "
                                     "recomputes adapters on kept rows with a new dropout draw); set lora_dropout=0 "
                                     "or use mode='loss_only'")


def enable_token_filtering(
    trainer,
    *,
    selector: str | Selector = "random",
    keep_ratio: float = 0.5,
    scope: str = "sequence",
    schedule: str | Callable[[int, int], float] = "constant",
    schedule_params: dict | None = None,
    selector_params: dict | None = None,
    mode: str = "fast",
    attention: str = "auto",
    reference: Reference | None = None,
) -> TokenFiltering:
    """Train ``trainer.model`` (an HF Llama / Mistral / Qwen2 / Qwen3 causal LM, or a PEFT model of one) with
    token filtering; returns the ``TokenFiltering`` handle (``.revert()`` undoes it).

    Args:
        trainer: a ``transformers.Trainer`` or subclass (TRL ``SFTTrainer``), before ``train()``.
        selector: a name of ``centrifuge.tokens.selectors.SELECTORS`` (``random``, ``label_mask``,
            ``self_loss``, ``excess_loss``, ``reference_loss``) or a ``Selector`` instance.
        keep_ratio: share of labelled tokens kept, in (0, 1]; a schedule's start value.
        scope: "sequence" (each sequence keeps its share) or "batch" (the micro-batch does).
        schedule: "constant", "linear", "cosine", "ladder" (``schedule_params`` e.g. ``{"end": 1.0}``) or a
            callable ``(step, total_steps) -> ratio``; evaluated at ``trainer.state.global_step``.
        selector_params: extra selector arguments (e.g. ``{"seed": 1}`` for random, ``{"prefer": "high"}``).
        mode: "fast" (token-sparse backward), "reference" or "loss_only" (see ``centrifuge.apply``).
        attention: the fast path's attention backend (see ``centrifuge.apply``).
        reference: ``batch -> [B, T]`` reference per-token losses at prediction positions, for ``excess_loss`` /
            ``reference_loss``; called once per micro-batch with the dict the Trainer's data loader yields.

    Bad arguments raise one ``ValueError`` (unsupported models ``UnsupportedModelError``) before anything
    is changed; so do ``threshold`` (data-dependent count), ``lora_dropout`` > 0 and an explicit
    ``ddp_find_unused_parameters=True`` with ``mode="fast"``.
    """
    from centrifuge.models.patch import _is_peft
    from centrifuge.models.registry import spec_for
    from centrifuge.ops.attention import BACKENDS
    from centrifuge.tokens.forward import MODES

    # ---- validate everything first: a bad argument leaves trainer and model untouched
    for name in ("get_batch_samples", "compute_loss", "state", "args", "model"):
        if not hasattr(trainer, name):
            raise TypeError(f"enable_token_filtering needs a transformers Trainer, got {type(trainer).__name__}")
    if getattr(trainer, _ATTR, None) is not None:
        raise ValueError("token filtering is already enabled on this trainer (call .revert() on its handle first)")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if attention != "auto" and attention not in BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r}; choose auto, {', '.join(BACKENDS)}")
    if mode == "fast" and getattr(trainer.args, "ddp_find_unused_parameters", None):
        raise ValueError("ddp_find_unused_parameters=True does not work with mode='fast' (its layers' parameters "
                         "get their gradients from a replay in the backward, invisible to DDP's search); leave it "
                         "unset or set it to False")
    if getattr(trainer.args, "n_gpu", 1) > 1:
        raise ValueError("token filtering does not support torch.nn.DataParallel (n_gpu > 1); launch one process "
                         "per GPU (torchrun / accelerate launch) instead")
    base = trainer.model.get_base_model() if _is_peft(trainer.model) else trainer.model
    spec_for(base)
    if mode == "fast":
        _check_no_adapter_dropout(base)
    params = dict(selector_params or {})
    if isinstance(selector, str):
        if selector == "threshold":
            raise ValueError(_THRESHOLD_REFUSED)
        if selector != "label_mask":
            params.setdefault("ratio", keep_ratio)
            params.setdefault("scope", scope)
        chosen = make_selector(selector, **params)
    elif isinstance(selector, Selector):
        if params:
            raise ValueError("selector_params apply to a selector given by name, not to a Selector instance")
        chosen = selector
    else:
        raise ValueError(f"selector must be a name or a centrifuge Selector, got {type(selector).__name__}")
    if isinstance(chosen, ThresholdSelector):
        raise ValueError(_THRESHOLD_REFUSED)
    ratio_driven = not isinstance(chosen, LabelMaskSelector)
    if getattr(chosen, "needs_reference", False) and reference is None:
        raise ValueError(f"selector {chosen!r} needs reference losses: pass reference=fn(batch) -> [B, T] losses")
    sched = None
    if ratio_driven:
        start = float(getattr(chosen, "ratio", keep_ratio))
        if callable(schedule):
            if schedule_params:
                raise ValueError("schedule_params apply to a schedule given by name, not to a callable")
            sched = schedule
        else:
            sp = dict(schedule_params or {})
            sp.setdefault("value" if schedule == "constant" else "start", start)
            sched = make_schedule(schedule, **sp)
        _check_ratio_schedule(sched)
    elif schedule != "constant" or schedule_params:
        raise ValueError(f"selector {chosen!r} keeps every labelled token: it takes no keep-ratio schedule")

    handle = TokenFiltering(trainer, selector=chosen, schedule=sched, mode=mode, attention=attention,
                            reference=reference)
    handle._install()
    return handle


def token_filtering_of(trainer) -> TokenFiltering | None:
    """The ``TokenFiltering`` installed on ``trainer``, or None."""
    return getattr(trainer, _ATTR, None)
