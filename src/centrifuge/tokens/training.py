"""Token filtering inside the training step: a loss function for ``centrifuge.train.step.train_step``.

``TokenFilterLoss`` turns one micro-batch into a ``MicroLoss`` through a Centrifuge-patched model:

* selectors that need the current model's loss (``self_loss``, ``excess_loss``) run *after* the forward
  (``select=``), all others *before* it (``keep_mask=``), which also saves activation memory;
* the keep ratio follows a schedule over training (constant by default);
* a keep ratio of 1.0 is ordinary dense training (the same ``dense_loss`` as without Centrifuge).

The step sums ``loss_sum`` over micro-batches and divides by the global kept count, so the loss is
normalized exactly as the reference semantics require.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels
from centrifuge.schedules import Constant
from centrifuge.tokens.selectors import Selector

Schedule = Callable[[int, int], float]


@dataclasses.dataclass
class TokenFilterLoss:
    """A ``LossFn`` with token filtering.

    Attributes:
        selector: which tokens to keep (``centrifuge.tokens.selectors``).
        dense_loss: the step's plain loss, used when the scheduled keep ratio is 1.0.
        schedule: keep ratio as a function of (step, total_steps); defaults to the selector's ratio.
        total_steps: length of the run (for the schedule).
        step: the current optimizer step; the training loop sets it (``set_step``) before each step.
        reference: batch → reference per-token losses [B, T] (offline scores looked up by the batch's
            ``sequence_index``, or an online reference model); needed by ``excess_loss`` and friends.
        ratio_driven: the selector keeps a fixed share (False for ``label_mask`` and ``threshold``); only
            then does the schedule apply and a ratio of 1.0 mean dense training.
        across_ranks: under ``torch.distributed``, every micro-batch is one rank's equal share of a global
            micro-batch (``centrifuge train``): the selector then runs on the global micro-batch (scores,
            labels and reference losses all-gathered, [world × B, T]) and each rank keeps its rows, so the
            selection — a batch-scope top-k, random draws — is the one of a one-process run.
    """

    selector: Selector
    dense_loss: Callable
    schedule: Schedule | None = None
    total_steps: int = 1
    step: int = 0
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    ratio_driven: bool = True
    across_ranks: bool = False
    _global_counted: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = Constant(getattr(self.selector, "ratio", 1.0))

    def set_step(self, step: int) -> None:
        self.step = step
        ratio = float(self.schedule(min(step, self.total_steps - 1), self.total_steps))
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio schedule gave {ratio} at step {step}; it must be in (0, 1]")
        self.selector.ratio = ratio

    def _reference_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Reference per-token losses [B, T] of this micro-batch, if the selector uses them."""
        if not getattr(self.selector, "needs_reference", False):
            return None
        if self.reference is None:
            raise ValueError(f"selector {self.selector!r} needs reference losses: set tokens.reference_scores "
                             "(from `centrifuge score-reference`) or tokens.reference_model")
        return self.reference(batch).to(batch["input_ids"].device)

    def _select(self, *, scores, valid, step, reference) -> torch.Tensor:
        """The selector on this micro-batch, or on the global one (``across_ranks``) cut to this rank's rows."""
        if not (self.across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.selector(scores=scores, valid=valid, step=step, reference=reference)
        from centrifuge.train.distributed import all_gather_rows

        def gather(t):
            return None if t is None else all_gather_rows(t)

        every_valid = gather(valid)
        keep = self.selector(scores=gather(scores), valid=every_valid, step=step, reference=gather(reference))
        # counted = kept and labelled (the model's ``num_counted``), over the global micro-batch: the step's
        # global count without a collective (``MicroLoss.global_counted``)
        self._global_counted = (keep.bool() & every_valid.bool()).sum()
        rows = valid.shape[0]
        return keep[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]

    @property
    def keep_ratio(self) -> float:
        return self.selector.ratio

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from centrifuge.train.step import MicroLoss

        if self.ratio_driven and self.keep_ratio >= 1.0:
            return self.dense_loss(model, batch)
        # attention_mask is not passed: padding sits at row ends, and without a 2-D mask and without a KV cache
        # the model keeps packed documents apart through the restarting position_ids (as dense_loss does).
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"],
                  "position_ids": batch.get("position_ids"), "use_cache": False}
        reference = self._reference_for(batch)
        self._global_counted = None  # set by _select when it runs on the global micro-batch
        if self.selector.needs_current_loss:
            step = self.step

            def select(*, scores, valid):
                return self._select(scores=scores, valid=valid, step=step, reference=reference)

            out = model(**inputs, select=select)
        else:
            labelled = shift_labels(batch["labels"]) != IGNORE_INDEX
            keep = self._select(scores=None, valid=labelled, step=self.step, reference=reference)
            out = model(**inputs, keep_mask=keep)
        return MicroLoss(loss_sum=out.loss_sum, num_counted=out.num_counted, num_valid=out.num_labelled,
                         global_counted=self._global_counted)


def _reference_source(tokens, context) -> Callable[[dict[str, torch.Tensor]], torch.Tensor] | None:
    """batch → reference losses [B, T]: offline scores by ``sequence_index``, or an online model."""
    from centrifuge.tokens.reference import OnlineReference, ReferenceScores

    if tokens.reference_scores:
        scores = ReferenceScores(tokens.reference_scores, dataset=context.data.train, tokenizer=context.tokenizer)
        scores.check_all()  # every shard now, before the run writes anything (not at its first batch)
        return lambda batch: scores.for_batch(batch["sequence_index"].tolist())
    if tokens.reference_model:
        dtype = next(context.model.parameters()).dtype
        online = OnlineReference.load(tokens.reference_model, device=context.device, dtype=dtype)
        return online
    return None


def _check_schedule_range(schedule: Schedule, total: int, tokens) -> None:
    """Refuse, at set-up, a keep-ratio schedule that leaves (0, 1] at some step (``ConfigError``); the
    step would otherwise fail there, after the run directory and earlier checkpoints were written. Every
    step is evaluated (a few microseconds each), or 10,001 evenly spaced ones in very long runs."""
    from centrifuge.train.errors import ConfigError

    stride = max(1, total // 10_000)
    for step in [*range(0, total, stride), total - 1]:
        ratio = float(schedule(step, total))
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"tokens.schedule_params: the {tokens.schedule} schedule gives keep ratio {ratio:g} at "
                              f"step {step + 1} of {total}; keep tokens.keep_ratio and the schedule's values in (0, 1]")


def _check_attention_backend(name: str, device: torch.device) -> None:
    """Refuse, at set-up, an attention backend the run's device cannot run (``ConfigError``).

    The backends check their inputs only when the first layer runs, which is after the run directory has
    been written; the device alone decides it for the CUDA-only ones, so check that here."""
    import os

    from centrifuge.train.errors import ConfigError

    if device.type == "cuda" or name in ("auto", "math", "sdpa"):
        return
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return  # Triton's interpreter runs the kernels on the CPU (tests)
    raise ConfigError(f"tokens.attention={name!r} needs a CUDA device and this run is on {device.type}; "
                      "use --set tokens.attention=auto")


def token_filter_plugin(context) -> None:
    """``centrifuge train`` plug-in for the ``tokens`` config section (see ``centrifuge.train.loop``).

    Patches the model with ``centrifuge.apply`` and makes the step's loss a ``TokenFilterLoss``; with
    ``keep_ratio: 1.0`` (and a ratio-based selector, constant schedule) it leaves dense training alone."""
    import centrifuge
    from centrifuge.schedules import make_schedule
    from centrifuge.tokens.reference import ReferenceScoresError
    from centrifuge.tokens.selectors import make_selector
    from centrifuge.train.errors import ConfigError

    tokens = context.config.tokens
    if tokens.keep_ratio >= 1.0 and tokens.selector != "label_mask" and tokens.schedule == "constant":
        context.say("token filtering: off (tokens.keep_ratio = 1.0): ordinary dense training")
        return
    params = dict(tokens.selector_params)
    if tokens.selector not in ("label_mask", "threshold"):
        params.setdefault("ratio", tokens.keep_ratio)
    if tokens.selector != "label_mask":
        params.setdefault("scope", tokens.scope)
    # Each error names the key that fixes it (selector_params, schedule_params, the reference's key).
    try:
        selector = make_selector(tokens.selector, **params)
    except ValueError as err:
        raise ConfigError(f"tokens.selector_params: {err}") from None
    try:
        schedule_params = dict(tokens.schedule_params)
        if tokens.schedule == "constant":
            schedule_params.setdefault("value", tokens.keep_ratio)
        else:
            schedule_params.setdefault("start", tokens.keep_ratio)
        schedule = make_schedule(tokens.schedule, **schedule_params)
    except ValueError as err:
        raise ConfigError(f"tokens.schedule_params: {err}") from None
    _check_schedule_range(schedule, context.config.train.steps, tokens)
    try:
        reference = _reference_source(tokens, context)
    except (ValueError, OSError, ReferenceScoresError) as err:
        key = "reference_scores" if tokens.reference_scores else "reference_model"
        raise ConfigError(f"tokens.{key}: {err}".replace("\n", " ")) from None
    _check_attention_backend(tokens.attention, context.device)
    ratio_driven = tokens.selector not in ("label_mask", "threshold")
    loss = TokenFilterLoss(
        selector=selector, dense_loss=context.loss_fn, schedule=schedule if ratio_driven else None,
        total_steps=context.config.train.steps, reference=reference, ratio_driven=ratio_driven, across_ranks=True,
    )
    try:
        centrifuge.apply(context.model, mode=tokens.mode, attention=tokens.attention, compile=tokens.compile)
    except centrifuge.UnsupportedModelError as err:
        raise ConfigError(f"token filtering cannot patch this model: {err}; train it densely with "
                          "--set tokens.keep_ratio=1.0, or pick a supported model with model.path / model.preset") \
            from None
    context.loss_fn = loss
    if ratio_driven:
        context.hooks.before_forward.append(lambda step: loss.set_step(step - 1))  # train_step counts from 1
    timing = "after the forward (current loss)" if selector.needs_current_loss else "before the forward"
    context.say(
        f"token filtering: on — {tokens.selector} selection, keep ratio {tokens.keep_ratio:g} "
        f"({tokens.schedule} schedule, {tokens.scope} scope), mode {tokens.mode}, mask known {timing}; "
        "set tokens.keep_ratio=1.0 for ordinary dense training"
    )
