"""Token selectors: which prediction positions to keep.

A selector is a callable ``selector(*, scores, valid, step=None) -> keep`` over a [B, T] batch:

* ``scores`` [B, T] float: what the selector ranks by (the current per-token loss for ``self_loss``,
  the excess loss for ``excess_loss``, precomputed reference losses for ``reference_loss``; unused by
  ``random`` and ``label_mask``);
* ``valid`` [B, T] bool: positions that have a label (and are not padding); nothing else is ever kept;
* ``step``: the training step, for selectors that draw random numbers (deterministic per seed and step).

Every selector has ``needs_current_loss``: True when it must run *after* the forward (the scores depend
on the model being trained), False when the keep set is known before the forward — then the token-sparse
path also saves activations of kept rows only.

Top-k rule (``keep_top``): per sequence, each row keeps round(ratio × its labelled count) positions
(at least 1 when it has any); per batch, the batch keeps round(ratio × all labelled) positions, so
sequences keep different counts (Rho-1's batch-level selection). Ties go to the earlier position.
"""

from __future__ import annotations

import math

import torch

SCOPES = ("sequence", "batch")


def _check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return scope


def _keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """round(ratio × n), at least 1 where n > 0 (half rounds up, exactly)."""
    k = torch.floor(n.double() * ratio + 0.5).long()
    return torch.where(n > 0, k.clamp_min(1), torch.zeros_like(k))


def keep_top(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, scope: str = "sequence"
) -> torch.Tensor:
    """[B, T] bool: the top ``ratio`` of ``valid`` positions by ``scores`` (highest first)."""
    ratio, scope = _check_ratio(ratio), _check_scope(scope)
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} differ in shape")
    if torch.isnan(scores[valid]).any():
        raise ValueError("scores contain NaN at labelled positions")
    s = scores.double().masked_fill(~valid, float("-inf"))
    if scope == "batch":
        flat = s.reshape(1, -1)
        order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
        k = _keep_count(valid.sum().reshape(1), ratio)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(flat.shape[1], device=s.device).expand_as(order))
        return ((ranks < k[:, None]) & valid.reshape(1, -1)).view_as(valid)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    k = _keep_count(valid.sum(-1), ratio)
    return (ranks < k[:, None]) & valid


class Selector:
    """Base class: subclasses implement ``scores_for`` (or override ``__call__``)."""

    needs_current_loss = False

    def __init__(self, ratio: float = 1.0, *, scope: str = "sequence"):
        self.ratio = _check_ratio(ratio)
        self.scope = _check_scope(scope)

    def __call__(self, *, scores: torch.Tensor | None, valid: torch.Tensor, step: int | None = None):
        return keep_top(self.scores_for(scores, valid, step), valid, self.ratio, self.scope)

    def scores_for(self, scores, valid, step):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, scope={self.scope!r})"


class RandomSelector(Selector):
    """Uniformly random positions; deterministic for a (seed, step) pair."""

    def __init__(self, ratio: float, *, scope: str = "sequence", seed: int = 0):
        super().__init__(ratio, scope=scope)
        self.seed = seed
        self._calls = 0

    def scores_for(self, scores, valid, step):
        if step is None:
            step, self._calls = self._calls, self._calls + 1
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + int(step))
        return torch.rand(valid.shape, generator=gen).to(valid.device)


class LabelMaskSelector(Selector):
    """Every labelled position (the labels already say what to learn, e.g. completion-only SFT)."""

    def __init__(self):
        super().__init__(1.0)

    def __call__(self, *, scores=None, valid: torch.Tensor, step=None):
        return valid.clone()


class SelfLossSelector(Selector):
    """Top ``ratio`` by the current model's own per-token loss (needs the forward first)."""

    needs_current_loss = True

    def scores_for(self, scores, valid, step):
        if scores is None:
            raise ValueError("self_loss selection needs the current per-token loss")
        return scores


def random(ratio: float, *, scope: str = "sequence", seed: int = 0) -> RandomSelector:
    return RandomSelector(ratio, scope=scope, seed=seed)


def label_mask() -> LabelMaskSelector:
    return LabelMaskSelector()


def self_loss(ratio: float, *, scope: str = "sequence") -> SelfLossSelector:
    return SelfLossSelector(ratio, scope=scope)
