"""Importance statistics gathered in training forwards: EMAs, with the activation metric's updates deferred
and applied to every layer at once.

The ``activation`` metric needs one reduction per layer and forward (the feature norms of the MLP's gated
activation, of the attention output: ``importance.feature_norms`` / ``head_feature_norms``). Turning them
into scores — root-mean-square, per-group sums, the EMA at the kept units — is about ten tiny kernels per
layer, ~2 ms of GPU time and as much host time in a TinyLlama step on an H100. So a layer keeps its norms as
``Pending`` and the ``Omitter`` applies every layer's with ``flush`` before the next selection: the same
arithmetic on [L, ·] stacks, ~16 kernels for the whole model. Reading a layer's score applies its own pending
update first, and a second forward before a flush applies the first one, so the values are those of updating
at once (up to the order of float32 sums).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from centrifuge.neurons import importance

KINDS = ("mlp", "group")


def ema(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    """EMA of ``old`` with ``new`` (same shape); the first value (``old`` None) is taken as is."""
    return new if old is None else old.mul(decay).add_(new, alpha=1.0 - decay)


def ema_at(old: torch.Tensor, new: torch.Tensor, decay: float, at: torch.Tensor) -> torch.Tensor:
    """EMA of ``old`` [..., n] with ``new`` [..., k] at indices ``at`` [..., k] (last dim); the rest stays."""
    return old.scatter(-1, at, old.gather(-1, at).mul_(decay).add_(new, alpha=1.0 - decay))


@dataclasses.dataclass(frozen=True)
class Pending:
    """One forward's activation statistic of a layer, not yet turned into scores.

    Attributes:
        norms: float32 [k] L2 norms of the kept channels' gated activations ("mlp"), or [h·D] of the kept
            heads' output features ("group"), over ``tokens`` tokens.
        kept: [k] / [g] int64 ids of the units those belong to, or None = all units.
        tokens: how many tokens the norms were taken over.
    """

    norms: torch.Tensor
    kept: torch.Tensor | None
    tokens: int


def flush(states: Sequence, kind: str) -> None:
    """Apply the pending ``kind`` ("mlp" / "group") statistics of ``states`` (``LayerOmission`` objects),
    batched over the layers whose shapes, device and decay agree."""
    if kind not in KINDS:
        raise ValueError(f"statistics kind must be one of {KINDS}, got {kind!r}")
    batches: dict[tuple, list] = {}
    for om in states:
        pending = om.pending.pop(kind, None)
        if pending is None:
            continue
        old = om.scores[kind]
        key = (pending.norms.device, tuple(pending.norms.shape), pending.kept is None, pending.tokens,
               old is None, om.ema)
        batches.setdefault(key, []).append((om, pending, old))
    for (_, _, every_unit, tokens, first, decay), members in batches.items():
        norms = torch.stack([p.norms for _, p, _ in members])
        head = members[0][0]
        if kind == "mlp":
            new, total = importance.rms_from_norms(norms, tokens), head.num_channels
        else:
            new = importance.groups_from_feature_norms(norms, tokens, head_dim=head.head_dim,
                                                       heads_per_group=head.heads_per_group)
            total = head.num_groups
        if every_unit:
            scores = ema(None if first else torch.stack([old for *_, old in members]), new, decay)
        else:
            old = new.new_zeros(len(members), total) if first else torch.stack([old for *_, old in members])
            scores = ema_at(old, new, decay, torch.stack([p.kept for _, p, _ in members]))
        for row, (om, _, _) in enumerate(members):
            om.scores[kind] = scores[row]
