"""The reference mode's attention: SDPA with the keys and values of filtered tokens detached (the oracle of the
token-sparse backward), registered with transformers under ``REFERENCE_ATTENTION``.

Part of the patching that ``models/`` owns: ``centrifuge.apply(model, mode="reference")`` selects it (for as
long as the model is patched, so activation checkpointing's recompute in the backward runs it too) and
``revert`` restores the model's own attention implementation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
    if kwargs.get("softcap") is not None:  # SDPA has no score soft-capping (Gemma 2)
        return _eager_softcapped(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_softcapped(module, query, key, value, attention_mask, *, scaling: float, softcap: float,
                      dropout: float = 0.0, **_ignored):
    """Attention with soft-capped scores ``c · tanh(s / c)`` (Gemma 2's eager attention, which SDPA cannot
    do), under the SDPA mask rules (boolean mask, True = visible; None = plain causal). q [B, H, T, D], k / v
    [B, Hkv, T, D] → [B, T, H, D]. The softmax runs in float32 for 16-bit inputs and in the inputs' dtype
    otherwise (HF's eager path always uses float32, which would cap a float64 oracle at float32 precision)."""
    if dropout:
        raise ValueError("the reference attention runs without dropout; set attention_dropout to 0")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = softcap * torch.tanh(query @ key.transpose(-1, -2) * (scaling / softcap))
    T_q, T_k = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(T_q, T_k, dtype=torch.bool, device=query.device).tril(T_k - T_q)
    # the dtype's minimum, not -inf: a query with no visible key (padding) then gets finite garbage, not NaN
    scores = scores.masked_fill(~attention_mask.bool(), torch.finfo(scores.dtype).min)
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)
AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)
