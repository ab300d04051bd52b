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

Packed documents (``position_ids`` that restart, no ``attention_mask``) follow one rule: **the patched model
attends exactly as the unpatched model does on the same call** (``separate_documents``). Hugging Face keeps
packed documents apart only when no KV cache is in use — ``use_cache=False`` passed, or ``config.use_cache``
off, or activation checkpointing in training (which turns the cache off); with the cache on (the default of a
plain ``model(input_ids=..., position_ids=...)`` call) its mask is plain causal over the whole row and the
documents see each other. Centrifuge then does the same, and logs a warning once, since it is rarely wanted:
pass ``use_cache=False`` (or a 2-D ``attention_mask`` per document row) to keep documents apart.

Conventions: positions are *prediction positions*: row t predicts ``labels[t + 1]`` (HF's shift), so
``keep_mask[b, t]`` keeps the prediction made at t. Padding is never kept; tokens without a label may be
kept (their keys and values then stay trainable) but never count in the loss. Selectors keep only labelled
tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from centrifuge.models.dispatch import LayerCall, call_layer
from centrifuge.models.reference_attention import REFERENCE_ATTENTION
from centrifuge.models.registry import ArchSpec
from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels, token_loss, token_loss_no_grad
from centrifuge.ops.elementwise import rms_norm
from centrifuge.ops.liger import is_liger_rms_norm, liger_ce_sum, liger_kernels_usable
from centrifuge.tokens import dense_route
from centrifuge.tokens.layer import DensifyGrad, GatherRows, StepState
from centrifuge.tokens.layout import TokenLayout

log = logging.getLogger("centrifuge")
Selector = Callable[..., torch.Tensor]
MODES = ("fast", "reference", "loss_only")


class EmptySelectionError(ValueError):
    """No token of the batch is kept: refusing to run a step that would train on nothing."""


@dataclasses.dataclass
class TokenFilterOutput(ModelOutput):
    """Output of a token-filtering forward.

    Attributes:
        loss: scalar, sum of counted tokens' CE / (num_items_in_batch or num_counted), plus
            ``router_aux_loss_coef · aux_loss`` for a mixture of experts with ``output_router_logits``.
        loss_sum: scalar, the un-normalized sum (what gradient accumulation adds up): ``loss · denominator``.
        aux_loss: scalar, the load-balancing loss over the counted tokens (mixture of experts with
            ``output_router_logits``), else None.
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
    aux_loss: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------


def _head_operands(model: nn.Module, spec: ArchSpec, normed: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """(rows [R, d], weight [V, d], bias [V] or None, final-logit soft-cap or None) for the LM head + CE.

    A logit divisor (Granite's ``logits_scaling``: logits / s) is applied to the rows instead of the logits —
    the same product, and the fused / chunked losses stay plain linear + CE. Under autocast the operands are
    cast to the autocast dtype, as autocast's ``lm_head`` linear computes in the dense model: the losses are
    autograd Functions whose backward runs outside autocast, so without the cast its GEMMs (3 per chunk of
    rows) would run in fp32 with fp32 master weights (measured: ~32 ms of a 107 ms step on an H200)."""
    divisor = spec.scalar(model.config, spec.logits_divisor)
    if divisor is not None and divisor != 1:
        normed = normed / divisor
    weight, bias = model.lm_head.weight, model.lm_head.bias
    if torch.is_autocast_enabled(normed.device.type):
        dtype = torch.get_autocast_dtype(normed.device.type)
        normed, weight = normed.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return normed, weight, bias, spec.scalar(model.config, spec.final_softcap)


def _score_rows(model: nn.Module, spec: ArchSpec, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE [R] (fp32), no gradient, of rows already through the final norm (fused on CUDA if liger
    is installed, chunked otherwise)."""
    rows, weight, bias, softcap = _head_operands(model, spec, normed)
    with torch.autocast(rows.device.type, enabled=False):  # the operands are already in the compute dtype
        return token_loss_no_grad(rows, weight, targets, bias, softcap=softcap)


def _normed_token_loss(model: nn.Module, spec: ArchSpec, normed: torch.Tensor, targets: torch.Tensor
                       ) -> torch.Tensor:
    """Per-row CE [R] (fp32, differentiable) of rows already through the final norm."""
    rows, weight, bias, softcap = _head_operands(model, spec, normed)
    with torch.autocast(rows.device.type, enabled=False):
        return token_loss(rows, weight, targets, bias, softcap=softcap)


def _kept_loss_sum(model: nn.Module, spec: ArchSpec, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of CE (fp32, differentiable) of the kept rows normed [M, d] (through the final norm): Liger's fused
    linear cross-entropy on CUDA where it applies (no soft-cap, matching dtypes), else the chunked loss;
    neither holds [M, vocab] fp32 logits at once."""
    rows, weight, bias, softcap = _head_operands(model, spec, normed)
    with torch.autocast(rows.device.type, enabled=False):
        if softcap is None and liger_kernels_usable(rows.device) and rows.dtype == weight.dtype:
            return liger_ce_sum(rows, weight, targets, bias)
        return token_loss(rows, weight, targets, bias, softcap=softcap).sum()


def _wants_router_logits(model: nn.Module, spec: ArchSpec) -> bool:
    """Whether the step adds the mixture of experts' load-balancing loss (``config.output_router_logits``)."""
    return spec.moe and bool(getattr(model.config, "output_router_logits", False))


def _rope_tables(inner: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] of the model's rotary embedding; per layer type for families whose local and global
    layers use different tables (Gemma 3: ``rotary_emb(x, pos, layer_type)``; older transformers kept a
    separate ``rotary_emb_local`` module)."""
    if layer_type is None:
        return inner.rotary_emb(embeds, position_ids=position_ids)
    if hasattr(inner, "rotary_emb_local"):
        rotary = inner.rotary_emb_local if layer_type == "sliding_attention" else inner.rotary_emb
        return rotary(embeds, position_ids)
    return inner.rotary_emb(embeds, position_ids, layer_type)


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


def separate_documents(model: nn.Module, *, attention_mask, position_ids, use_cache: bool | None) -> bool:
    """Whether restarting ``position_ids`` start new attention segments on this call — exactly when the
    unpatched HF model's mask would do it: no 2-D ``attention_mask`` and no KV cache. The cache is on when
    ``use_cache`` is True, or None with ``config.use_cache`` on, unless activation checkpointing turns it off
    (training with grad enabled), as HF's forward does.

    Warns once when documents are packed but, as in the unpatched model, attend to each other."""
    if attention_mask is not None or position_ids is None:
        return False  # nothing to detect: one segment per row (the 2-D mask's padding rules apply)
    cache = use_cache if use_cache is not None else bool(getattr(model.config, "use_cache", False))
    inner = model.model
    if cache and getattr(inner, "gradient_checkpointing", False) and inner.training and torch.is_grad_enabled():
        cache = False
    if not cache:
        return True
    if not _warned_packed_with_cache and bool((torch.diff(position_ids, dim=-1) != 1).any()):
        _warn_packed_with_cache()
    return False


_warned_packed_with_cache = False


def _warn_packed_with_cache() -> None:
    global _warned_packed_with_cache
    _warned_packed_with_cache = True
    log.warning(
        "centrifuge: position_ids restart (packed documents) but the KV cache is on (use_cache=None/True, no "
        "attention_mask): the documents attend to each other, as in the unpatched Hugging Face model on the same "
        "call. Pass use_cache=False to keep them apart.")


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


def _resolve_keep(batch: _Batch, keep: torch.Tensor, *, uncovered: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(final keep rows, sorted [M]; counted mask [N]; whether ``uncovered`` [N] bool is all False) — refuses an
    empty selection.

    One host read for all three (the step is host-bound on a GPU, each read a synchronisation): the kept and
    counted totals and the number of ``uncovered`` rows come back together, and the kept rows are gathered
    with a size known by then (``nonzero_static``, no second read)."""
    keep = keep.reshape(-1) & batch.valid
    counted = keep & batch.labelled
    totals = [keep.sum(), counted.sum()] + ([] if uncovered is None else [uncovered.sum()])
    num_kept, num_counted, *rest = torch.stack(totals).tolist()
    if num_counted == 0:
        raise EmptySelectionError(
            "no token of this batch is kept (all filtered, padded or unlabelled); refusing to run a step "
            "that would train on nothing"
        )
    rows = torch.nonzero_static(keep, size=num_kept).flatten()
    return rows, counted, bool(rest) and rest[0] == 0


def _select(select: Selector, batch: _Batch, token_loss_flat: torch.Tensor) -> torch.Tensor:
    scores = token_loss_flat.view(batch.B, batch.T)
    keep = select(scores=scores, valid=batch.labelled.view(batch.B, batch.T))
    return _check_selection(keep, "the selector's result", (batch.B, batch.T))


def _aux_loss(model: nn.Module, spec: ArchSpec, router_logits: list[torch.Tensor], counted: torch.Tensor,
              batch: _Batch) -> torch.Tensor | None:
    """The mixture of experts' load-balancing loss over the *counted* tokens (kept and labelled), or None.

    The family's own ``load_balancing_loss_func`` (Switch-Transformer style: E · Σ_e f_e · P_e pooled over
    the MoE layers, f_e the share of top-k assignments to expert e, P_e its mean router probability) with the
    counted tokens as its token mask: Hugging Face weights by ``attention_mask`` (every real token); here the
    tokens that count in the loss, so filtered tokens get no gradient from it either, as from the CE."""
    if not router_logits:
        return None
    module = importlib.import_module(spec.modeling_module)
    num_experts = getattr(model, "num_experts", None) or getattr(model.config, "num_experts", None) \
        or model.config.num_local_experts
    mask = counted.view(batch.B, batch.T).to(router_logits[0].dtype)
    return module.load_balancing_loss_func(tuple(router_logits), num_experts, model.config.num_experts_per_tok,
                                           mask)


def _finish(loss_sum, counted, keep_rows, batch: _Batch, num_items_in_batch, token_loss_flat, model=None,
            aux: torch.Tensor | None = None):
    num_counted = counted.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_counted
    keep_mask = torch.zeros(batch.B * batch.T, dtype=torch.bool, device=counted.device)
    keep_mask.index_fill_(0, keep_rows, True)  # (not ``[rows] = True``: that copies a host scalar, a sync)
    if aux is not None:  # as HF adds it: coef · aux on top of the normalized CE (loss_sum scaled to match)
        loss_sum = loss_sum + model.config.router_aux_loss_coef * aux.to(loss_sum.dtype) * denom
    return TokenFilterOutput(
        loss=loss_sum / denom, loss_sum=loss_sum, num_counted=num_counted, aux_loss=aux,
        num_labelled=batch.labelled.sum(), keep_mask=keep_mask.view(batch.B, batch.T),
        token_loss=None if token_loss_flat is None else token_loss_flat.view(batch.B, batch.T),
    )


# --------------------------------------------------------------------------------------------------------
# fast
# --------------------------------------------------------------------------------------------------------

def fast_forward(
    model: nn.Module, spec: ArchSpec, *, input_ids, attention_mask=None, position_ids=None, labels=None,
    keep_mask=None, select: Selector | None = None, num_items_in_batch=None, attention: str = "auto",
    elementwise: str = "eager", backward: str = "auto", return_token_loss: bool = False,
    use_cache: bool | None = None,
) -> TokenFilterOutput:
    """The token-sparse forward (see the module docstring for the arguments; ``elementwise``: "eager",
    "compiled", or "auto" = compiled on CUDA; ``backward``: "auto" or "replay", see ``centrifuge.apply``;
    ``use_cache``: only decides whether packed documents are kept apart, ``separate_documents``)."""
    batch = _Batch.make(input_ids, attention_mask, position_ids, labels)
    if elementwise == "auto":
        elementwise = "compiled" if input_ids.is_cuda else "eager"
    keep_rows = counted = None
    if keep_mask is not None:  # (one host read: the counts, and whether the step is all-kept)
        _check_selection(keep_mask, "keep_mask", (batch.B, batch.T))
        ops = dense_route.route_ops(input_ids.device)
        if ops is not None and not dense_route.eligible(model, spec, attention_mask=attention_mask,
                                                        position_ids=position_ids, select=select,
                                                        return_token_loss=return_token_loss):
            ops = None
        uncovered = None if ops is None else dense_route.uncovered(keep_mask, batch.valid.view(batch.B, batch.T))
        keep_rows, counted, all_kept = _resolve_keep(batch, keep_mask, uncovered=uncovered)
        if all_kept:
            targets = batch.targets.masked_fill(~counted, IGNORE_INDEX)
            loss_sum = dense_route.dense_loss_sum(model, input_ids, targets, ops, call_layer)
            return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, None)
    inner = model.model
    B, T = batch.B, batch.T
    embeds = inner.embed_tokens(input_ids)  # [B, T, d] (scaled inside the module where the family does: Gemma)
    multiplier = spec.scalar(model.config, spec.embedding_multiplier)  # Granite
    if multiplier is not None:
        embeds = embeds * multiplier
    base = TokenLayout.build(
        batch=B, seqlen=T, device=input_ids.device, attention_mask=attention_mask,
        position_ids=position_ids if separate_documents(model, attention_mask=attention_mask, position_ids=position_ids,
                                                        use_cache=use_cache) else None,
    )
    # One layout per distinct (window, score soft-cap) and one rotary table per layer type, each handed to its
    # layers and saved by their autograd contexts (a shared layout rewritten per layer gave earlier layers'
    # backward the last layer's window).
    softcap = spec.scalar(model.config, spec.attn_softcap)
    layouts: dict[tuple, TokenLayout] = {(None, None): base}
    ropes: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    router_logits = _wants_router_logits(model, spec)
    step = StepState(keep=keep_rows, attention=attention, elementwise=elementwise, backward=backward,
                     router_logits=router_logits)
    routers: list[torch.Tensor] = []  # MoE layers' router logits [N, E] (with the aux loss's gradient path)
    h = embeds.reshape(B * T, -1)
    if not h.requires_grad:  # frozen embeddings (e.g. LoRA): still drive the layers' backward
        h = h.detach().requires_grad_(True)
    h = DensifyGrad.apply(h)
    for idx, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        geometry = (spec.sliding_window(model.config, idx), softcap)
        if geometry not in layouts:
            layouts[geometry] = dataclasses.replace(base, sliding_window=geometry[0], softcap=geometry[1])
        layer_type = spec.layer_type(model.config, idx)
        if layer_type not in ropes:
            cos, sin = _rope_tables(inner, embeds, batch.position_ids, layer_type)
            ropes[layer_type] = (cos.reshape(B * T, -1), sin.reshape(B * T, -1))
        h = call_layer(layer, h, LayerCall(spec, step, layouts[geometry], ropes[layer_type]))
        if isinstance(h, tuple):
            h, logits = h
            routers.append(logits)

    all_loss = None
    if select is not None or return_token_loss:  # every row's loss for selection: fused on CUDA if liger is there
        with torch.no_grad():
            all_loss = _score_rows(model, spec, _final_norm(model, h), batch.targets)
    if select is not None:
        # made once, here; it reaches the layers' backward as the row indices of the gradient (GatherRows)
        keep_rows, counted = _resolve_keep(batch, _select(select, batch, all_loss))[:2]
    h_kept = GatherRows.apply(h, keep_rows)
    kept_targets = batch.targets.masked_fill(~counted, IGNORE_INDEX).index_select(0, keep_rows)
    loss_sum = _kept_loss_sum(model, spec, _final_norm(model, h_kept), kept_targets)
    aux = _aux_loss(model, spec, routers, counted, batch) if router_logits else None
    return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, all_loss, model, aux)


# --------------------------------------------------------------------------------------------------------
# reference and loss_only: plain autograd through the HF model
# --------------------------------------------------------------------------------------------------------



def _hf_hidden(model, input_ids, attention_mask, position_ids, use_cache=None, **kwargs):
    """(final hidden states [N, d] after the final norm, router logits per MoE layer [N, E] or None) through
    the HF model's own forward (its own masking rules: ``use_cache`` decides packed-document separation as in
    the unpatched model; a cache it builds is dropped)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **kwargs)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]), getattr(out, "router_logits", None)


def reference_forward(
    model: nn.Module, spec: ArchSpec, *, input_ids, attention_mask=None, position_ids=None, labels=None,
    keep_mask=None, select: Selector | None = None, num_items_in_batch=None, detach_filtered_kv: bool = True,
    return_token_loss: bool = False, use_cache: bool | None = None, **_ignored,
) -> TokenFilterOutput:
    """``reference`` (``detach_filtered_kv=True``) and ``loss_only`` (False) modes."""
    batch = _Batch.make(input_ids, attention_mask, position_ids, labels)
    if keep_mask is not None:
        _check_selection(keep_mask, "keep_mask", (batch.B, batch.T))
    # Decided once, here (grad on): HF's own rule depends on grad mode, and the no-grad scoring pass below must
    # see the same masks as the graded pass. A cache only where documents must not be separated.
    use_cache = not separate_documents(model, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=use_cache)
    use_cache = use_cache and attention_mask is None and position_ids is not None
    all_loss = None
    if select is not None or return_token_loss:
        # Selection needs the current model's loss on every token; the reference spends a separate
        # no-grad forward on it (it is an oracle, not a fast path).
        with torch.no_grad():
            normed = _hf_hidden(model, input_ids, attention_mask, position_ids, use_cache)[0]
            all_loss = _score_rows(model, spec, normed, batch.targets)
    if select is not None:
        keep_mask = _select(select, batch, all_loss)
    if keep_mask is None:
        raise ValueError("pass keep_mask or select")
    keep_rows, counted = _resolve_keep(batch, keep_mask)[:2]
    kwargs = {}
    if detach_filtered_kv:
        keep_bt = torch.zeros_like(batch.valid)
        keep_bt[keep_rows] = True
        kwargs["centrifuge_keep"] = keep_bt.view(batch.B, batch.T)
    if detach_filtered_kv and model.config._attn_implementation != REFERENCE_ATTENTION:
        raise RuntimeError("the reference mode needs centrifuge.apply(model, mode='reference'), which selects the "
                           f"{REFERENCE_ATTENTION!r} attention for as long as the model is patched")
    if _wants_router_logits(model, spec):
        kwargs["output_router_logits"] = True
    normed, router_logits = _hf_hidden(model, input_ids, attention_mask, position_ids, use_cache, **kwargs)
    targets = batch.targets.masked_fill(~counted, IGNORE_INDEX)
    loss_sum = _normed_token_loss(model, spec, normed, targets).sum()
    aux = _aux_loss(model, spec, list(router_logits or ()), counted, batch) if _wants_router_logits(model, spec) \
        else None
    return _finish(loss_sum, counted, keep_rows, batch, num_items_in_batch, all_loss, model, aux)
