"""Whole-model forwards of the three token-filtering modes.

Every mode computes the same loss — the sum of next-token cross-entropy over *counted* tokens (kept and
labelled), divided by ``num_items_in_batch`` when given (the global count across micro-batches and ranks)
or by the local count — and differs only in the backward:

* ``reference``: plain autograd through the Hugging Face model, with the keys and values of filtered
  tokens detached in every attention layer. The oracle of the token-sparse backward.
* ``loss_only``: plain autograd, nothing detached (Rho-1's loss masking: the exact gradient of the
  masked loss, at full backward cost).
* ``fast``: the token-sparse backward (``centrifuge.tokens.layer``): every backward GEMM runs on kept rows.

The keep set arrives one of two ways: ``keep_mask`` [B, T] before the forward, or ``select``, a callable
``select(scores=token_loss [B, T] fp32, valid=[B, T] bool) -> keep [B, T] bool`` called after the
forward on the current model's per-token loss (exact Rho-1 scoring).

Conventions: positions are *prediction positions*: row t predicts ``labels[t + 1]`` (HF's shift), so
``keep_mask[b, t]`` keeps the prediction made at t. Padding is never kept; tokens without a label may be
kept (their keys and values then stay trainable) but never count in the loss. Selectors keep only labelled
tokens.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import ModelOutput

from centrifuge.models.registry import ArchSpec
from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels, token_loss, token_loss_no_grad
from centrifuge.ops.elementwise import rms_norm
from centrifuge.ops.liger import is_liger_rms_norm, liger_ce_sum, liger_kernels_usable
from centrifuge.tokens import dense_route
from centrifuge.tokens.layer import DensifyGrad, GatherRows, StepState, token_sparse_layer
from centrifuge.tokens.layout import TokenLayout

Selector = Callable[..., torch.Tensor]
MODES = ("fast", "reference", "loss_only")


class EmptySelectionError(ValueError):
    """No token of the batch is kept: refusing to run a step that would train on nothing."""


@dataclasses.dataclass
class TokenFilterOutput(ModelOutput):
    """Output of a token-filtering forward.

    Attributes:
        loss: scalar, sum of counted tokens' CE / (num_items_in_batch or num_counted).
        loss_sum: scalar, the un-normalized sum (what gradient accumulation adds up).
        num_counted: int64 scalar, kept tokens that have a label.
        num_labelled: int64 scalar, tokens that have a label (kept or not).
        keep_mask: [B, T] bool, the rows kept for the backward.
        token_loss: [B, T] fp32 per-token loss of every position (0 where unlabelled), without grad;
            present when the selection needed it or ``return_token_loss`` was set.
    """

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_counted: torch.Tensor | None = None
    num_labelled: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------


def _lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.lm_head
    return head.weight, head.bias


def _score_rows(model: nn.Module, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE [R] (fp32), no gradient, of rows already through the final norm (fused on CUDA if liger
    is installed, chunked otherwise)."""
    weight, bias = _lm_head(model)
    return token_loss_no_grad(normed, weight, targets, bias)


def _normed_token_loss(model: nn.Module, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE [R] (fp32, differentiable) of rows already through the final norm."""
    weight, bias = _lm_head(model)
    return token_loss(normed, weight, targets, bias)


def _final_norm(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The model's final norm on rows h [R, d]; a Liger RMSNorm off CUDA runs its formula in torch (Liger's
    Triton kernels need a GPU)."""
    norm = model.model.norm
    if not h.is_cuda and is_liger_rms_norm(norm):
        return rms_norm(h, norm.weight, norm.variance_epsilon)
    return norm(h)


def _check_selection(keep: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor) or keep.shape != shape:
        got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {got}")
    if keep.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {keep.dtype}")
    return keep


@dataclasses.dataclass
class _Batch:
    """Flattened view of one micro-batch: N = B × T prediction rows."""

    B: int
    T: int
    targets: torch.Tensor  # [N] next-token ids or IGNORE_INDEX
    labelled: torch.Tensor  # [N] bool
    valid: torch.Tensor  # [N] bool, not padding
    position_ids: torch.Tensor  # [B, T]

    @classmethod
    def make(cls, input_ids, attention_mask, position_ids, labels) -> _Batch:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0,
                                                                                  IGNORE_INDEX)
        if labels.shape != (B, T):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {(B, T)}")
        targets = shift_labels(labels).reshape(-1)
        valid = (torch.ones(B * T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                 else attention_mask.reshape(-1).bool())
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        return cls(B, T, targets, (targets != IGNORE_INDEX) & valid, valid, position_ids.expand(B, T))


def _resolve_keep(batch: _Batch, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final keep rows (sorted [M]) and counted mask [N]; refuses an empty selection."""
    keep = keep.reshape(-1) & batch.valid
    counted = keep & batch.labelled
    if not bool(counted.any()):
        raise EmptySelectionError(
            "no token of this batch is kept (all filtered, padded or unlabelled); refusing to run a step "
            "that would train on nothing"
        )
    return torch.nonzero(keep).flatten(), counted


def _select(select: Selector, batch: _Batch, token_loss_flat: torch.Tensor) -> torch.Tensor:
    scores = token_loss_flat.view(batch.B, batch.T)
    keep = select(scores=scores, valid=batch.labelled.view(batch.B, batch.T))
    return _check_selection(keep, "the selector's result", (batch.B, batch.T))


def _finish(loss_sum, counted, keep_rows, batch: _Batch, num_items_in_batch, token_loss_flat):
    num_counted = counted.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_counted
    keep_mask = torch.zeros(batch.B * batch.T, dtype=torch.bool, device=counted.device)
    keep_mask.index_fill_(0, keep_rows, True)  # (not ``[rows] = True``: that copies a host scalar, a sync)
    return TokenFilterOutput(
        loss=loss_sum / denom, loss_sum=loss_sum, num_counted=num_counted,
        num_labelled=batch.labelled.sum(), keep_mask=keep_mask.view(batch.B, batch.T),
        token_loss=None if token_loss_flat is None else token_loss_flat.view(batch.B, batch.T),
    )


# --------------------------------------------------------------------------------------------------------
# fast
# --------------------------------------------------------------------------------------------------------

LAYER_CALL_KW = "_centrifuge_step"  # private keyword of a decoder layer's dispatching forward
_DISPATCH_ATTR = "_centrifuge_layer_dispatch"  # on a layer: (had an instance forward, that forward)


@dataclasses.dataclass
class LayerCall:
    """What a decoder layer needs to run its token-sparse step (passed as ``layer(h, _centrifuge_step=...)``)."""

    spec: ArchSpec
    step: StepState
    layer_idx: int


def install_layer_dispatch(layer: nn.Module) -> None:
    """Give decoder ``layer`` an instance-level forward that runs ``token_sparse_layer`` when called with
    ``_centrifuge_step=LayerCall(...)`` and the layer's own forward otherwise.

    Why through the layer's ``__call__``: wrappers hook modules, not functions. FSDP2 (``fully_shard`` per
    decoder layer) all-gathers a layer's weights in its forward pre-hook, frees them in its post-hook, and
    registers the pre-/post-backward hooks that re-gather them for the backward and reduce-scatter their
    gradients. Calling the layer's submodules directly would skip all of that. ``remove_layer_dispatch``
    restores the layer exactly."""
    if _DISPATCH_ATTR in vars(layer):
        return
    had_instance_forward = "forward" in vars(layer)
    own = vars(layer).get("forward")

    def forward(self, *args, _centrifuge_step: LayerCall | None = None, **kwargs):
        if _centrifuge_step is None:
            # The class's forward looked up now (not bound at install time), so a class swap after
            # ``apply`` — FSDP2 makes each sharded layer an ``FSDP<Layer>`` subclass — still runs it.
            return own(*args, **kwargs) if had_instance_forward else type(self).forward(self, *args, **kwargs)
        (h,) = args
        call = _centrifuge_step
        if not isinstance(call, LayerCall):  # the all-kept dense route's layer (tokens.dense_route.DenseCall)
            return call(self, h)
        return token_sparse_layer(h, self, call.spec, call.step, call.layer_idx)

    setattr(layer, _DISPATCH_ATTR, (had_instance_forward, own))
    layer.forward = types.MethodType(forward, layer)


def remove_layer_dispatch(layer: nn.Module) -> None:
    """Undo ``install_layer_dispatch`` (a no-op for a layer without it)."""
    saved = vars(layer).get(_DISPATCH_ATTR)
    if saved is None:
        return
    had_instance_forward, own = saved
    if had_instance_forward:
        layer.forward = own
    else:
        del layer.forward
    delattr(layer, _DISPATCH_ATTR)


def call_layer(layer: nn.Module, h: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Run one token-sparse decoder layer on h [N, d] through the layer's module call (hooks included).

    ``nn.Module.__call__`` rather than ``layer(...)``: transformers versions whose
    ``GradientCheckpointingLayer`` overrides ``__call__`` would wrap the whole token-sparse layer in
    ``torch.utils.checkpoint``; the token-sparse layer does its own, kept-rows-only, checkpointing."""
    if _DISPATCH_ATTR not in vars(layer):
        raise RuntimeError("this decoder layer was not patched by centrifuge.apply (was the layer replaced after "
                           "apply?); call centrifuge.apply(model) again")
    return nn.Module.__call__(layer, h, **{LAYER_CALL_KW: call})



def fast_forward(
    model: nn.Module, spec: ArchSpec, *, input_ids, attention_mask=None, position_ids=None, labels=None,
    keep_mask=None, select: Selector | None = None, num_items_in_batch=None, attention: str = "auto",
    elementwise: str = "eager", backward: str = "auto", return_token_loss: bool = False,
) -> TokenFilterOutput:
    """The token-sparse forward (see the module docstring for the arguments; ``elementwise``: "eager",
    "compiled", or "auto" = compiled on CUDA; ``backward``: "auto" or "replay", see ``centrifuge.apply``)."""
    batch = _Batch.make(input_ids, attention_mask, position_ids, labels)
    if elementwise == "auto":
        elementwise = "compiled" if input_ids.is_cuda else "eager"
    if keep_mask is not None:
        _check_selection(keep_mask, "keep_mask", (batch.B, batch.T))
        routed = _dense_route(model, spec, batch, input_ids, attention_mask, position_ids, keep_mask, select,
                              return_token_loss, num_items_in_batch)
        if routed is not None:
            return routed
    inner = model.model
    B, T = batch.B, batch.T
    embeds = inner.embed_tokens(input_ids)  # [B, T, d]
    cos, sin = inner.rotary_emb(embeds, position_ids=batch.position_ids)  # [B, T, D]
    layout = TokenLayout.build(
        batch=B, seqlen=T, device=input_ids.device, attention_mask=attention_mask,
        position_ids=None if attention_mask is not None else position_ids,
        sliding_window=spec.sliding_window(model.config, 0),
    )
    keep_rows, counted = (None, None) if keep_mask is None else _resolve_keep(batch, keep_mask)
    step = StepState(layout=layout, cos=cos.reshape(B * T, -1), sin=sin.reshape(B * T, -1), keep=keep_rows,
                     attention=attention, elementwise=elementwise, backward=backward)
    h = embeds.reshape(B * T, -1)
    if not h.requires_grad:  # frozen embeddings (e.g. LoRA): still drive the layers' backward
        h = h.detach().requires_grad_(True)
    h = DensifyGrad.apply(h)
    for idx, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        window = spec.sliding_window(model.config, idx)
        if window != step.layout.sliding_window:
            step.layout = dataclasses.replace(step.layout, sliding_window=window)
        h = call_layer(layer, h, LayerCall(spec, step, idx))

    all_loss = None
    if select is not None or return_token_loss:  # every row's loss for selection: fused on CUDA if liger is there
        with torch.no_grad():
            all_loss = _score_rows(model, _final_norm(model, h), batch.targets)
    if select is not None:
        keep_rows, counted = _resolve_keep(batch, _select(select, batch, all_loss))
        step.keep = keep_rows
    h_kept = GatherRows.apply(h, keep_rows)
    kept_targets = batch.targets.masked_fill(~counted, IGNORE_INDEX).index_select(0, keep_rows)
    normed = _final_norm(model, h_kept)
    weight, bias = _lm_head(model)
    if (liger_kernels_usable(normed.device) and normed.dtype == weight.dtype
            and not torch.is_autocast_enabled(normed.device.type)):  # fused linear CE: no logits recompute
        loss_sum = liger_ce_sum(normed, weight, kept_targets, bias)
    else:
        loss_sum = _normed_token_loss(model, normed, kept_targets).sum()
    return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, all_loss)


def _dense_route(model, spec, batch: _Batch, input_ids, attention_mask, position_ids, keep_mask, select,
                 return_token_loss, num_items_in_batch) -> TokenFilterOutput | None:
    """An all-kept step as the plain dense step (``centrifuge.tokens.dense_route``), or None when not taken."""
    ops = dense_route.route_ops(input_ids.device)
    if ops is None or not dense_route.eligible(model, spec, attention_mask=attention_mask, position_ids=position_ids,
                                               select=select, return_token_loss=return_token_loss):
        return None
    if not dense_route.covers_all(keep_mask, batch.valid.view(batch.B, batch.T)):
        return None
    keep_rows, counted = _resolve_keep(batch, keep_mask)
    targets = batch.targets.masked_fill(~counted, IGNORE_INDEX)
    loss_sum = dense_route.dense_loss_sum(model, input_ids, targets, ops, call_layer)
    return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, None)


# --------------------------------------------------------------------------------------------------------
# reference and loss_only: plain autograd through the HF model
# --------------------------------------------------------------------------------------------------------

REFERENCE_ATTENTION = "centrifuge_reference"


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the keys / values of filtered tokens detached (``centrifuge_keep`` [B, T] bool; plain SDPA
    without it). ``apply(mode="reference")`` selects it for the whole time the model is patched — not just
    during the forward — so that activation checkpointing's recompute in the backward runs it too."""
    keep = kwargs.pop("centrifuge_keep", None)
    if keep is not None:
        k_mask = keep[:, None, :, None]
        key = torch.where(k_mask, key, key.detach())
        value = torch.where(k_mask, value, value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)
AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)


def _hf_hidden(model, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    """Final hidden states [N, d] after the final norm, through the HF model's own forward."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, **kwargs)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])


def reference_forward(
    model: nn.Module, spec: ArchSpec, *, input_ids, attention_mask=None, position_ids=None, labels=None,
    keep_mask=None, select: Selector | None = None, num_items_in_batch=None, detach_filtered_kv: bool = True,
    return_token_loss: bool = False, **_ignored,
) -> TokenFilterOutput:
    """``reference`` (``detach_filtered_kv=True``) and ``loss_only`` (False) modes."""
    batch = _Batch.make(input_ids, attention_mask, position_ids, labels)
    if keep_mask is not None:
        _check_selection(keep_mask, "keep_mask", (batch.B, batch.T))
    all_loss = None
    if select is not None or return_token_loss:
        # Selection needs the current model's loss on every token; the reference spends a separate
        # no-grad forward on it (it is an oracle, not a fast path).
        with torch.no_grad():
            normed = _hf_hidden(model, input_ids, attention_mask, position_ids)
            all_loss = _score_rows(model, normed, batch.targets)
    if select is not None:
        keep_mask = _select(select, batch, all_loss)
    if keep_mask is None:
        raise ValueError("pass keep_mask or select")
    keep_rows, counted = _resolve_keep(batch, keep_mask)
    kwargs = {}
    if detach_filtered_kv:
        keep_bt = torch.zeros_like(batch.valid)
        keep_bt[keep_rows] = True
        kwargs["centrifuge_keep"] = keep_bt.view(batch.B, batch.T)
    if detach_filtered_kv and model.config._attn_implementation != REFERENCE_ATTENTION:
        raise RuntimeError("the reference mode needs centrifuge.apply(model, mode='reference'), which selects the "
                           f"{REFERENCE_ATTENTION!r} attention for as long as the model is patched")
    normed = _hf_hidden(model, input_ids, attention_mask, position_ids, **kwargs)
    targets = batch.targets.masked_fill(~counted, IGNORE_INDEX)
    loss_sum = _normed_token_loss(model, normed, targets).sum()
    return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, all_loss)
