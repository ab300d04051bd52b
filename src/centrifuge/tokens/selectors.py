"""Token selectors: which prediction positions to keep.

A selector is a callable ``selector(*, scores, valid, step=None, reference=None) -> keep`` over a [B, T]
batch of *prediction positions* (row t predicts ``labels[t + 1]``, as in ``centrifuge.tokens.forward``):

* ``scores`` [B, T] float: the current model's per-token loss when the selection runs after the forward
  (``model(..., select=fn)`` passes it); ``None`` before the forward;
* ``valid`` [B, T] bool: positions that have a label (and are not padding); nothing else is ever kept;
* ``step``: the training step, for selectors that draw random numbers (deterministic per seed and step);
* ``reference`` [B, T] float: a reference model's per-token loss at the same positions (online, or
  precomputed by ``centrifuge score-reference``), for the Rho-1 selectors. Values at positions that are
  not ``valid`` are ignored.

Every selector has ``needs_current_loss``: True when it must run *after* the forward (the scores depend
on the model being trained), False when the keep set is known before the forward — then the token-sparse
path also saves activations of kept rows only (``model(..., keep_mask=select_before_forward(...))``).

Selectors:

* ``random(ratio)``: uniform control; ``label_mask()``: every labelled position;
* ``self_loss(ratio)``: highest current loss (after the forward);
* ``excess_loss(ratio)``: Rho-1's selective language modelling: highest *excess loss*
  ``current − reference`` (after the forward). Tokens the reference finds easy but the model finds hard;
* ``reference_loss(ratio)``: rank by the reference loss alone, known before the forward. Keeps the
  *lowest* reference losses by default (``prefer="low"``): tokens a reference trained on good data can
  predict are learnable, the ones it finds hardest are mostly noise (the ``less_ref`` rule of Centrifuge's
  code and Rho-1's "H→H" tokens). ``prefer="high"`` keeps the hardest instead;
* ``threshold(tau)``: every token whose excess loss exceeds ``tau``: a dynamic ratio (optionally clamped to
  ``[min_ratio, max_ratio]`` of the labelled tokens).

A selector that needs reference losses reads them from the ``reference=`` keyword. The patched model's
``select=`` callback does not carry them, so bind them per batch: ``model(..., select=sel.bind(reference=r))``
(a ``BoundSelector``, cheap to build, leaves ``sel`` unchanged).

Top-k rule (``keep_top``): per sequence, each row keeps round(ratio × its labelled count) positions
(at least 1 when it has any); per batch, the batch keeps round(ratio × all labelled) positions, so
sequences keep different counts (Rho-1's batch-level selection). Ties go to the earlier position.
Selection is deterministic: no random numbers except in ``random`` (seeded by ``seed`` and ``step``).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable

import torch

from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels

SCOPES = ("sequence", "batch")


def _check_ratio(ratio: float, what: str = "keep ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not (
        0.0 < ratio <= 1.0
    ):
        raise ValueError(f"{what} must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return scope


def _keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """round(ratio × n), at least 1 where n > 0 (half rounds up, exactly)."""
    k = torch.floor(n.double() * ratio + 0.5).long()
    return torch.where(n > 0, k.clamp_min(1), torch.zeros_like(k))


def _check_shapes(scores: torch.Tensor, valid: torch.Tensor, name: str = "scores") -> None:
    if scores.shape != valid.shape:
        raise ValueError(f"{name} {tuple(scores.shape)} and valid {tuple(valid.shape)} differ in shape")


def _check_no_nan(valid: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """Refuse NaN at ``valid`` [B, T] positions in any of the given [B, T] tensors (None: not given), with one
    host read for all of them (a GPU synchronisation each; the selection runs every step)."""
    given = [(name, t) for name, t in named.items() if t is not None]
    if not given:
        return
    flags = torch.stack([(torch.isnan(t.to(valid.device)) & valid).any() for _, t in given])
    if bool(flags.any()):
        name = next(name for (name, _), bad in zip(given, flags.tolist(), strict=True) if bad)
        raise ValueError(f"{name} contain NaN at labelled positions")


def _top_k(
    scores: torch.Tensor, valid: torch.Tensor, scope: str, counts: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """[B, T] bool: per row of the scope, the ``counts(valid_rows)`` [R] highest ``valid`` scores.

    Rows are the sequences (scope "sequence", R = B) or the whole batch flattened (scope "batch", R = 1).
    Ranking: valid before invalid, then higher score first, then earlier position (two stable sorts)."""
    s = scores.double()
    v = valid
    if scope == "batch":
        s, v = s.reshape(1, -1), v.reshape(1, -1)
    by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices
    by_valid = torch.sort((~v).gather(1, by_score).to(torch.uint8), dim=-1, stable=True).indices
    order = by_score.gather(1, by_valid)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    k = counts(v).to(ranks.device)
    return ((ranks < k[:, None]) & v).view_as(valid)


def keep_top(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, scope: str = "sequence"
) -> torch.Tensor:
    """[B, T] bool: the top ``ratio`` of ``valid`` positions by ``scores`` [B, T] (highest first)."""
    ratio, scope = _check_ratio(ratio), _check_scope(scope)
    _check_shapes(scores, valid)
    _check_no_nan(valid, {"scores": scores})
    return _keep_top(scores, valid, ratio, scope)


def _keep_top(scores: torch.Tensor, valid: torch.Tensor, ratio: float, scope: str) -> torch.Tensor:
    """``keep_top`` without its checks (no host read)."""
    return _top_k(scores, valid, scope, lambda v: _keep_count(v.sum(-1), ratio))


def labelled_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool ``valid`` for a selector: prediction positions whose target ``labels[:, t + 1]`` exists.

    ``labels`` [B, T] follow the Hugging Face convention (aligned with ``input_ids``, -100 = no label);
    ``attention_mask`` [B, T] (1 = real token) removes padding. The same rule as the patched forward."""
    valid = shift_labels(labels) != IGNORE_INDEX
    if attention_mask is not None:
        valid &= attention_mask.bool()
    return valid


def _reference_for(reference: torch.Tensor | None, valid: torch.Tensor, who: str) -> torch.Tensor:
    if reference is None:
        raise ValueError(
            f"{who} needs reference per-token losses: call it with reference=[B, T] losses, or pass "
            f"selector.bind(reference=...) as select= (see centrifuge.tokens.reference)"
        )
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
        raise ValueError(f"{who}: reference must be a float tensor [B, T], got {type(reference).__name__}")
    _check_shapes(reference, valid, "reference losses")
    return reference.to(valid.device)


class Selector:
    """Base class: subclasses implement ``scores_for`` (or override ``__call__``).

    Attributes:
        needs_current_loss: the keep set depends on the current model's per-token loss (select after the
            forward, ``model(..., select=...)``); False: known before it (``keep_mask=``).
        needs_reference: the selector reads ``reference=`` per-token losses.
    """

    needs_current_loss = False
    needs_reference = False

    def __init__(self, ratio: float = 1.0, *, scope: str = "sequence"):
        self.ratio = _check_ratio(ratio)
        self.scope = _check_scope(scope)

    def __call__(
        self,
        *,
        scores: torch.Tensor | None = None,
        valid: torch.Tensor,
        step: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep [B, T] bool from ``scores`` / ``reference`` [B, T] float and ``valid`` [B, T] bool.

        The given inputs are checked for NaN at ``valid`` positions, with one host read (what the selector
        ranks by is made from them; a random selection is given neither, so it reads nothing back from the
        GPU)."""
        ranked = self.scores_for(scores=scores, valid=valid, step=step, reference=reference)
        _check_shapes(ranked, valid)
        _check_no_nan(valid, {"scores": scores, "reference losses": reference})
        return _keep_top(ranked, valid, self.ratio, self.scope)

    def scores_for(self, *, scores, valid, step, reference) -> torch.Tensor:  # pragma: no cover - abstract
        """[B, T] float: what this selector ranks by (higher = kept first)."""
        raise NotImplementedError

    def bind(self, *, reference: torch.Tensor) -> BoundSelector:
        """This selector with one batch's reference losses [B, T] attached (for ``model(..., select=)``)."""
        return BoundSelector(self, reference)

    def with_ratio(self, ratio: float) -> Selector:
        """A copy with another keep ratio (e.g. this step's value of a keep-ratio schedule)."""
        other = copy.copy(self)
        other.ratio = _check_ratio(ratio)
        return other

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, scope={self.scope!r})"


class BoundSelector:
    """A selector plus one batch's reference losses [B, T]; called like a selector without ``reference``."""

    def __init__(self, selector: Selector, reference: torch.Tensor):
        self.selector = selector
        self.reference = reference

    @property
    def needs_current_loss(self) -> bool:
        return self.selector.needs_current_loss

    @property
    def needs_reference(self) -> bool:
        return self.selector.needs_reference

    def __call__(
        self,
        *,
        scores: torch.Tensor | None = None,
        valid: torch.Tensor,
        step: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if reference is not None and reference is not self.reference:
            raise ValueError("this selector is already bound to reference losses; do not pass reference=")
        return self.selector(scores=scores, valid=valid, step=step, reference=self.reference)

    def __repr__(self) -> str:
        return f"{self.selector!r}.bind(reference={tuple(self.reference.shape)})"


class RandomSelector(Selector):
    """Uniformly random positions; deterministic for a (seed, step) pair."""

    def __init__(self, ratio: float, *, scope: str = "sequence", seed: int = 0):
        super().__init__(ratio, scope=scope)
        self.seed = seed
        self._calls = 0

    def scores_for(self, *, scores, valid, step, reference):
        if step is None:
            step, self._calls = self._calls, self._calls + 1
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + int(step))
        # drawn on the CPU (the same keep set on every device); non_blocking: no stream synchronisation
        return torch.rand(valid.shape, generator=gen).to(valid.device, non_blocking=True)


class LabelMaskSelector(Selector):
    """Every labelled position (the labels already say what to learn, e.g. completion-only SFT)."""

    def __init__(self):
        super().__init__(1.0)

    def __call__(self, *, scores=None, valid: torch.Tensor, step=None, reference=None):
        return valid.clone()


class SelfLossSelector(Selector):
    """Top ``ratio`` by the current model's own per-token loss (needs the forward first)."""

    needs_current_loss = True

    def scores_for(self, *, scores, valid, step, reference):
        if scores is None:
            raise ValueError("self_loss selection needs the current per-token loss")
        return scores


class ExcessLossSelector(Selector):
    """Rho-1: top ``ratio`` by excess loss = current loss − reference loss (needs the forward first)."""

    needs_current_loss = True
    needs_reference = True

    def scores_for(self, *, scores, valid, step, reference):
        if scores is None:
            raise ValueError("excess_loss selection needs the current per-token loss (use it as select=)")
        ref = _reference_for(reference, valid, "excess_loss")
        return scores.double() - ref.to(scores.device).double()


class ReferenceLossSelector(Selector):
    """Rank by the reference loss alone (known before the forward): ``prefer="low"`` keeps the lowest."""

    needs_reference = True

    def __init__(self, ratio: float, *, scope: str = "sequence", prefer: str = "low"):
        super().__init__(ratio, scope=scope)
        if prefer not in ("low", "high"):
            raise ValueError(f"prefer must be 'low' or 'high', got {prefer!r}")
        self.prefer = prefer

    def scores_for(self, *, scores, valid, step, reference):
        ref = _reference_for(reference, valid, "reference_loss").double()
        return -ref if self.prefer == "low" else ref

    def __repr__(self) -> str:
        return f"ReferenceLossSelector(ratio={self.ratio}, scope={self.scope!r}, prefer={self.prefer!r})"


class ThresholdSelector(Selector):
    """Every labelled token whose excess loss exceeds ``tau`` (a dynamic keep ratio).

    The count kept per scope (each sequence, or the whole batch) is clamped to
    ``[round(min_ratio × n), round(max_ratio × n)]`` of its ``n`` labelled tokens; when the clamp applies,
    the tokens with the highest excess loss fill (or stay in) the quota, ties to the earlier position.
    With ``min_ratio=0`` a batch with no token above ``tau`` keeps nothing, and the patched forward
    refuses the step (``EmptySelectionError``); set ``min_ratio`` > 0 to always train on something."""

    needs_current_loss = True
    needs_reference = True

    def __init__(self, tau: float, *, scope: str = "sequence", min_ratio: float = 0.0, max_ratio: float = 1.0):
        super().__init__(1.0, scope=scope)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"threshold tau must be a finite number, got {tau!r}")
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not (0.0 <= min_ratio <= 1.0):
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio!r}")
        max_ratio = _check_ratio(max_ratio, "max_ratio")
        if min_ratio > max_ratio:
            raise ValueError(f"min_ratio {min_ratio} is above max_ratio {max_ratio}")
        self.tau, self.min_ratio, self.max_ratio = float(tau), float(min_ratio), max_ratio

    def __call__(self, *, scores=None, valid: torch.Tensor, step=None, reference=None) -> torch.Tensor:
        if scores is None:
            raise ValueError("threshold selection needs the current per-token loss (use it as select=)")
        _check_shapes(scores, valid)
        ref = _reference_for(reference, valid, "threshold")
        _check_no_nan(valid, {"scores": scores, "reference losses": ref})
        excess = scores.double() - ref.to(scores.device).double()
        above = (excess > self.tau) & valid

        def counts(v: torch.Tensor) -> torch.Tensor:
            n = v.sum(-1)
            k = above.reshape(v.shape).sum(-1)
            low = _keep_count(n, self.min_ratio) if self.min_ratio > 0 else torch.zeros_like(n)
            high = torch.floor(n.double() * self.max_ratio + 0.5).long()
            return torch.maximum(torch.minimum(k, high), low)

        return _top_k(excess, valid, self.scope, counts)

    def __repr__(self) -> str:
        return (f"ThresholdSelector(tau={self.tau}, scope={self.scope!r}, min_ratio={self.min_ratio}, "
                f"max_ratio={self.max_ratio})")


def random(ratio: float, *, scope: str = "sequence", seed: int = 0) -> RandomSelector:
    """Uniformly random ``ratio`` of the labelled positions (the control every method must beat)."""
    return RandomSelector(ratio, scope=scope, seed=seed)


def label_mask() -> LabelMaskSelector:
    """Every labelled position (no filtering beyond the labels)."""
    return LabelMaskSelector()


def self_loss(ratio: float, *, scope: str = "sequence") -> SelfLossSelector:
    """Top ``ratio`` by the current model's per-token loss."""
    return SelfLossSelector(ratio, scope=scope)


def excess_loss(ratio: float, *, scope: str = "sequence") -> ExcessLossSelector:
    """Rho-1: top ``ratio`` by current loss − reference loss (``scope="batch"`` is the paper's ranking)."""
    return ExcessLossSelector(ratio, scope=scope)


def reference_loss(ratio: float, *, scope: str = "sequence", prefer: str = "low") -> ReferenceLossSelector:
    """``ratio`` of the tokens by reference loss alone, before the forward; ``prefer="low"`` keeps the
    tokens the reference predicts best (learnable), ``"high"`` the hardest."""
    return ReferenceLossSelector(ratio, scope=scope, prefer=prefer)


def threshold(
    tau: float, *, scope: str = "sequence", min_ratio: float = 0.0, max_ratio: float = 1.0
) -> ThresholdSelector:
    """Tokens with excess loss > ``tau`` (dynamic ratio, clamped to [min_ratio, max_ratio] per scope)."""
    return ThresholdSelector(tau, scope=scope, min_ratio=min_ratio, max_ratio=max_ratio)


SELECTORS: dict[str, Callable[..., Selector]] = {
    "random": random,
    "label_mask": label_mask,
    "self_loss": self_loss,
    "excess_loss": excess_loss,
    "reference_loss": reference_loss,
    "threshold": threshold,
}


def make_selector(name: str, **params) -> Selector:
    """Build a selector from config, e.g. ``make_selector("excess_loss", ratio=0.6, scope="batch")``.

    Raises ``ValueError`` naming the unknown selector, unknown parameters or missing required ones."""
    if name not in SELECTORS:
        raise ValueError(f"unknown token selector {name!r}; choose one of {', '.join(SELECTORS)}")
    factory = SELECTORS[name]
    signature = inspect.signature(factory)
    accepted = list(signature.parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no parameters"
        raise ValueError(f"selector {name!r} takes {takes}; unknown: {', '.join(unknown)}")
    missing = [p.name for p in signature.parameters.values() if p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"selector {name!r} needs {', '.join(missing)}")
    return factory(**params)


def select_before_forward(
    selector: Selector | BoundSelector,
    *,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    step: int | None = None,
) -> torch.Tensor:
    """keep_mask [B, T] bool for ``model(..., keep_mask=...)`` from a selector that does not need the
    current loss (``random``, ``label_mask``, ``reference_loss``); ``labels`` [B, T] HF convention."""
    if selector.needs_current_loss:
        raise ValueError(f"{selector!r} needs the current loss: pass it as model(..., select=...) instead")
    valid = labelled_positions(labels, attention_mask)
    kwargs = {} if reference is None else {"reference": reference}
    return selector(scores=None, valid=valid, step=step, **kwargs)
