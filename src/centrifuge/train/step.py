"""One optimizer step: the unit shared by the CLI loop, the benchmark and the Python API.

A step takes a list of micro-batches (gradient accumulation). A *loss function* turns one micro-batch into
a ``MicroLoss``: the **sum** of per-token cross-entropy over the tokens that count, plus the counts. The step
backpropagates each sum, adds up the counts, and only then divides every gradient by the **global** number
of counted tokens (all micro-batches, and all ranks when ``torch.distributed`` is initialized). So the
gradient is that of the mean loss over every counted token of the step, whatever the split into
micro-batches or ranks, and a loss function that drops tokens (token filtering) changes only which tokens
count, not how the mean is formed.

Plug-in points, so that token filtering and neuron omission attach in one place:

- ``loss_fn``: any ``LossFn`` (``dense_loss`` is plain Hugging Face training);
- ``StepHooks``: callables run at fixed points of the step (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels
from centrifuge.train import distributed
from centrifuge.train.errors import NoCountedTokensError, NonFiniteLossError

Batch = dict[str, Tensor]  # input_ids, labels, position_ids, attention_mask: int64 [B, T]


@dataclass
class MicroLoss:
    """What a loss function returns for one micro-batch."""

    loss_sum: Tensor  # scalar, differentiable: SUM of per-token CE over the tokens that count
    num_counted: Tensor  # int64 scalar: tokens that count (the kept tokens; = valid label tokens when dense)
    num_valid: Tensor  # int64 scalar: tokens that have a label
    stats: dict[str, float] = field(default_factory=dict)  # extra numbers for the progress bar / metrics
    # int64 scalar or None: the counted tokens of this micro-batch over *all ranks*, when the loss function knows
    # it without communicating (token filtering selects on the all-gathered global micro-batch, so the global
    # kept count is a sum over the global mask). When every micro-batch of a step has it, ``train_step`` scales
    # the gradients without waiting for its count all-reduce (launched async, waited for at the step's host sync).
    global_counted: Tensor | None = None


LossFn = Callable[[nn.Module, Batch], MicroLoss]


def dense_loss(model: nn.Module, batch: Batch) -> MicroLoss:
    """Plain Hugging Face forward + summed cross-entropy over every token that has a label.

    ``batch`` fields are [B, T]; logits are [B, T, V]; position t is scored against ``labels[:, t + 1]``.

    ``attention_mask`` is deliberately not passed to the model: padding only ever sits at the end of a row,
    so under a causal mask no real token can see it, and with ``attention_mask=None`` transformers derives a
    block-diagonal causal mask from the restarting ``position_ids``, which keeps packed documents apart
    (given a 2-D mask it would let every token see the previous documents of its row)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    targets = shift_labels(batch["labels"])  # [B, T]
    logits = out.logits.flatten(0, 1)  # [B*T, V]; CE in at least fp32 (bf16 under autocast, fp64 in tests)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    num_valid = (targets != IGNORE_INDEX).sum()
    return MicroLoss(loss_sum=loss_sum, num_counted=num_valid, num_valid=num_valid)


def fused_dense_loss(model: nn.Module, batch: Batch) -> MicroLoss:
    """``dense_loss`` through the model's own loss: with ``model.liger`` (a Liger-patched model in training
    mode) Liger's fused linear cross-entropy, which never materializes the [B, T, V] logits.

    ``num_items_in_batch=1`` asks for the summed loss (Hugging Face and Liger divide their sum by it), so
    the result is the same SUM over labelled tokens as ``dense_loss``'s, in fp32."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False, num_items_in_batch=1)
    num_valid = (shift_labels(batch["labels"]) != IGNORE_INDEX).sum()
    return MicroLoss(loss_sum=out.loss.float(), num_counted=num_valid, num_valid=num_valid)


StepHook = Callable[[int], None]  # called with the step number


@dataclass
class StepHooks:
    """Callables run at fixed points of ``train_step``, each with the step number.

    - ``before_forward``: once per step, before the first micro-batch (e.g. choose this step's kept neurons);
    - ``after_backward``: once per step, after every backward and the division by the global token count,
      before clipping (gradients are final here: e.g. record importance, zero omitted rows);
    - ``after_optimizer_step``: after ``optimizer.step()`` and the scheduler step, before grads are cleared
      (e.g. restore weights the optimizer must not move this step)."""

    before_forward: list[StepHook] = field(default_factory=list)
    after_backward: list[StepHook] = field(default_factory=list)
    after_optimizer_step: list[StepHook] = field(default_factory=list)


@dataclass
class StepStats:
    """What one step did. ``loss`` is the mean CE over counted tokens (global, like the gradient)."""

    step: int
    loss: float
    num_counted: int  # global (all micro-batches and ranks)
    num_valid: int
    num_tokens: int  # real input tokens (attention_mask == 1), global
    grad_norm: float  # before clipping
    lr: float  # learning rate used by this step (of the first param group)
    stats: dict[str, float] = field(default_factory=dict)  # MicroLoss.stats averaged over micro-batches

    @property
    def counted_fraction(self) -> float:
        """Share of labelled tokens that counted (the kept-token fraction under token filtering)."""
        return self.num_counted / max(self.num_valid, 1)


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    step: int,
    loss_fn: LossFn = dense_loss,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
    hooks: StepHooks | None = None,
    grads_averaged_over_ranks: bool | None = None,
) -> StepStats:
    """One optimizer step over ``micro_batches`` (gradient accumulation), in place on ``model``.

    For each micro-batch: forward under autocast (``autocast_dtype=None`` = no autocast) and
    ``loss_sum.backward()``. Then every gradient is divided by the global counted-token count, clipped to
    ``max_grad_norm`` (None or 0 = no clipping), and the optimizer and scheduler step; grads are cleared.

    Distributed (``torch.distributed`` initialized, several ranks; each rank passes its own share of the
    step's micro-batches): the counts are all-reduced (SUM) and every gradient ends as the global-token mean
    ``sum over ranks and micro-batches of d(loss_sum) / global_count``. How the ranks' gradients meet,
    ``grads_averaged_over_ranks``:

    - ``None`` (default): DDP and FSDP2 (``fully_shard``) models *average* them in their backward, so each
      rank scales by ``world_size / global_count``; all but the last micro-batch run without gradient sync
      (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``). Any other model is not synchronized
      by anyone: the step sums its gradients itself (one flat all-reduce per dtype after the last backward)
      and scales by ``1 / global_count``.
    - ``True`` / ``False``: the caller's wrapper averages / sums them; the step only scales.

    The global count without a blocking collective: when every micro-batch's ``MicroLoss.global_counted``
    is set (token filtering under ``centrifuge train`` selects on the all-gathered global micro-batch, so it
    knows the global kept count locally), the gradients are scaled by that device scalar at once and the
    one all-reduce of the step's sums (counts, tokens, loss, for reporting and checks) is launched with
    ``async_op=True``; it is waited for only after clipping, where the step reads the gradient norm anyway.
    Otherwise (dense training) the count's all-reduce must come before the scaling, but nothing is read on
    the host there either: on NCCL it is ordered on the streams, and the host waits once per step, for the
    counts, loss and gradient norm together, right before ``optimizer.step()``.

    Raises ``NoCountedTokensError`` if no token counts and ``NonFiniteLossError`` if the loss or the
    gradient norm is NaN/inf; in both cases the optimizer has not stepped and grads are cleared (the
    ``after_backward`` hooks have run: the check is made at the step's one host sync, after them)."""
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    hooks = hooks or StepHooks()
    device = next(model.parameters()).device
    model.train()
    for hook in hooks.before_forward:
        hook(step)

    loss_total = torch.zeros((), dtype=torch.float64, device=device)  # detached, for reporting
    counted = torch.zeros((), dtype=torch.int64, device=device)
    valid = torch.zeros((), dtype=torch.int64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    known_global: Tensor | None = torch.zeros((), dtype=torch.int64, device=device)  # None once one is unknown
    stats_sum: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # the division by the global count comes after the last backward, so syncing once commutes with it
        with distributed.gradient_sync(model, i == len(micro_batches) - 1):
            with _autocast(device, autocast_dtype):
                micro = loss_fn(model, batch)
            micro.loss_sum.backward()
        loss_total += micro.loss_sum.detach().double()
        counted += micro.num_counted.detach().to(device)
        valid += micro.num_valid.detach().to(device)
        if known_global is not None and micro.global_counted is not None:
            known_global += micro.global_counted.detach().to(device)
        else:
            known_global = None
        tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        for key, value in micro.stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + float(value)

    totals = torch.stack([counted.double(), valid.double(), tokens.double(), loss_total])
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    pending = None  # the async all-reduce of the sums, waited for at the host sync below
    if world_size > 1 and known_global is not None:  # the count needs no collective: the sums go async
        pending = dist.all_reduce(totals, async_op=True)
    elif world_size > 1:  # the scale needs the global count; stream-ordered on NCCL (no host sync here)
        dist.all_reduce(totals)
    global_count = known_global.double() if known_global is not None else totals[0]

    averaged = grads_averaged_over_ranks
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if world_size > 1 and averaged is None:
        averaged = distributed.averages_gradients(model)
        if not averaged:  # nobody synchronized them: sum over ranks here
            distributed.all_reduce_gradients(params)
    if params:  # a device scalar: no host read of the count before the gradients are scaled
        torch._foreach_mul_([_local(p.grad) for p in params], (world_size if averaged else 1) / global_count)
    for hook in hooks.after_backward:
        hook(step)

    # With max_norm=inf the clip coefficient is exactly 1: the call only measures the norm.
    norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf) if params
            else torch.zeros((), device=device))
    if pending is not None:
        pending.wait()
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # an FSDP2 (DTensor) norm
    host = torch.cat([totals, global_count.reshape(1), norm.detach().double().reshape(1).to(totals.device)])
    global_counted_sum, global_valid, global_tokens, global_loss, global_counted, grad_norm = \
        host.tolist()  # the step's one host sync
    if global_counted != global_counted_sum:  # a loss function whose global count disagrees with its local ones
        optimizer.zero_grad(set_to_none=True)
        raise RuntimeError(f"step {step}: the loss function's global counted tokens ({global_counted:.0f}) differ "
                           f"from the sum of the ranks' counts ({global_counted_sum:.0f})")

    if global_counted == 0:
        optimizer.zero_grad(set_to_none=True)
        raise NoCountedTokensError(step)
    loss = global_loss / global_counted
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step, "loss", loss)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step, "gradient norm", grad_norm)

    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    for hook in hooks.after_optimizer_step:
        hook(step)
    optimizer.zero_grad(set_to_none=True)

    n = len(micro_batches)
    return StepStats(
        step=step,
        loss=loss,
        num_counted=int(global_counted),
        num_valid=int(global_valid),
        num_tokens=int(global_tokens),
        grad_norm=grad_norm,
        lr=lr,
        stats={k: v / n for k, v in stats_sum.items()},
    )


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of an FSDP2 (DTensor) gradient, in place-writable; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    loss_fn: LossFn = dense_loss,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Mean CE over the counted tokens of ``batches``, and their count. Leaves the model in train mode."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _autocast(device, autocast_dtype):
                micro = loss_fn(model, batch)
            total += micro.loss_sum.double()
            count += micro.num_counted.to(device)
    finally:
        model.train()
    n = int(count)
    return (float(total) / n if n else float("nan")), n
