"""Token selectors on hand-checkable inputs, and Rho-1 selection through the patched model."""

from __future__ import annotations

import pytest
import torch
from token_models import VOCAB, grads_of, max_rel_err, tiny_model

import centrifuge
from centrifuge.tokens import selectors as S
from centrifuge.tokens.forward import EmptySelectionError
from centrifuge.tokens.reference import OnlineReference

T_ = True
F_ = False


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ keep_top


def test_keep_top_exact_counts_round_half_up_and_at_least_one():
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 3:] = False  # 3 labelled
    valid[2, 1:] = False  # 1 labelled
    scores = torch.arange(30, dtype=torch.float32).view(3, 10)
    keep = S.keep_top(scores, valid, 0.25)
    assert keep.sum(-1).tolist() == [3, 1, 1]  # round(2.5) = 3, round(0.75) = 1, at least 1
    assert keep[0].nonzero().flatten().tolist() == [7, 8, 9]  # highest scores
    assert not (keep & ~valid).any()


def test_keep_top_ties_go_to_the_earlier_position():
    scores = t([[1, 5, 5, 5, 0, 5]])
    keep = S.keep_top(scores, torch.ones_like(scores, dtype=torch.bool), 0.5)
    assert keep.tolist() == [[F_, T_, T_, T_, F_, F_]]
    # batch scope: ties across rows go to the earlier row
    scores = t([[0, 2, 0], [2, 0, 2]])
    keep = S.keep_top(scores, torch.ones(2, 3, dtype=torch.bool), 0.34, scope="batch")
    assert keep.tolist() == [[F_, T_, F_], [T_, F_, F_]]


def test_all_masked_rows_keep_nothing():
    scores = t([[9, 9, 9], [1, 2, 3]])
    valid = b([[F_, F_, F_], [T_, T_, T_]])
    for scope in S.SCOPES:
        keep = S.keep_top(scores, valid, 0.5, scope)
        assert not keep[0].any()
        assert keep[1].sum() >= 1
    assert not S.keep_top(scores, torch.zeros_like(valid), 0.5, "batch").any()


def test_per_sequence_vs_per_batch():
    scores = t([[10, 9, 8, 7], [1, 2, 3, 4]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    per_seq = S.keep_top(scores, valid, 0.5, "sequence")
    per_batch = S.keep_top(scores, valid, 0.5, "batch")
    assert per_seq.tolist() == [[T_, T_, F_, F_], [F_, F_, T_, T_]]
    assert per_batch.tolist() == [[T_, T_, T_, T_], [F_, F_, F_, F_]]


def test_invalid_scores_never_crowd_out_valid_ones():
    """A valid -inf score still ranks before unlabelled positions (which never count)."""
    scores = t([[float("-inf"), 0.0, 5.0]])
    valid = b([[T_, F_, T_]])
    assert S.keep_top(scores, valid, 1.0).tolist() == [[T_, F_, T_]]


# ------------------------------------------------------------------------------------------- excess_loss


def test_excess_loss_hand_checked_and_ignores_unlabelled():
    current = t([[3.0, 2.0, 2.5, 1.0, 50.0]])
    reference = t([[1.0, 0.5, 2.4, 1.5, 0.0]])  # excess: 2.0, 1.5, 0.1, -0.5, (50: unlabelled)
    valid = b([[T_, T_, T_, T_, F_]])
    sel = S.excess_loss(0.5)
    assert sel.needs_current_loss and sel.needs_reference
    keep = sel(scores=current, valid=valid, reference=reference)
    assert keep.tolist() == [[T_, T_, F_, F_, F_]]
    # self-loss would pick differently (the reference changes the ranking)
    assert S.self_loss(0.5)(scores=current, valid=valid).tolist() == [[T_, F_, T_, F_, F_]]


def test_excess_loss_batch_scope_counts_across_rows():
    current = t([[5, 5, 5], [1, 1, 1]])
    reference = t([[0, 0, 0], [0, 0, 0]])
    keep = S.excess_loss(0.5, scope="batch")(scores=current, valid=torch.ones(2, 3, dtype=torch.bool),
                                             reference=reference)
    assert keep.sum().item() == 3 and keep[0].all()


def test_excess_loss_errors():
    current, valid = t([[1, 2]]), b([[T_, T_]])
    with pytest.raises(ValueError, match="reference per-token losses"):
        S.excess_loss(0.5)(scores=current, valid=valid)
    with pytest.raises(ValueError, match="differ in shape"):
        S.excess_loss(0.5)(scores=current, valid=valid, reference=t([[1, 2, 3]]))
    with pytest.raises(ValueError, match="NaN"):
        S.excess_loss(0.5)(scores=current, valid=valid, reference=t([[float("nan"), 0]]))
    with pytest.raises(ValueError, match="current per-token loss"):
        S.excess_loss(0.5)(scores=None, valid=valid, reference=t([[1, 2]]))
    # NaN where there is no label does not matter
    keep = S.excess_loss(0.5)(scores=current, valid=b([[F_, T_]]), reference=t([[float("nan"), 0]]))
    assert keep.tolist() == [[F_, T_]]


def test_bind_carries_reference_and_flags():
    current, valid, reference = t([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool), t([[0, 0, 3, 4]])
    sel = S.excess_loss(0.5)
    bound = sel.bind(reference=reference)
    assert bound.needs_current_loss and bound.needs_reference
    assert torch.equal(bound(scores=current, valid=valid), sel(scores=current, valid=valid, reference=reference))
    assert bound(scores=current, valid=valid).tolist() == [[T_, T_, F_, F_]]
    with pytest.raises(ValueError, match="already bound"):
        bound(scores=current, valid=valid, reference=reference.clone())


# ---------------------------------------------------------------------------------------- reference_loss


def test_reference_loss_keeps_low_reference_loss_before_the_forward():
    reference = t([[0.5, 3.0, 0.1, 0.5, 9.0, 0.0]])
    valid = b([[T_, T_, T_, T_, T_, F_]])
    sel = S.reference_loss(0.4)
    assert not sel.needs_current_loss and sel.needs_reference
    keep = sel(scores=None, valid=valid, reference=reference)
    assert keep.tolist() == [[T_, F_, T_, F_, F_, F_]]  # 0.1 and the earlier of the two 0.5s
    high = S.reference_loss(0.4, prefer="high")(valid=valid, reference=reference)
    assert high.tolist() == [[F_, T_, F_, F_, T_, F_]]
    with pytest.raises(ValueError, match="prefer"):
        S.reference_loss(0.5, prefer="middle")


def test_select_before_forward_uses_shifted_labels():
    labels = torch.tensor([[5, 6, -100, 7, 8, 9]])  # prediction positions with a target: 0, 2, 3, 4
    reference = t([[1.0, 0.0, 0.0, 2.0, 3.0, 0.0]])  # at labelled positions: 1, 0, 2, 3
    keep = S.select_before_forward(S.reference_loss(0.5), labels=labels, reference=reference)
    assert keep.tolist() == [[T_, F_, T_, F_, F_, F_]]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    valid = S.labelled_positions(labels, mask)
    assert valid.tolist() == [[T_, F_, T_, T_, F_, F_]]
    with pytest.raises(ValueError, match="select=..."):
        S.select_before_forward(S.excess_loss(0.5), labels=labels, reference=reference)


# --------------------------------------------------------------------------------------------- threshold


def test_threshold_dynamic_ratio():
    current = t([[3.0, 1.0, 2.0, 5.0], [0.0, 0.0, 0.0, 9.0]])
    reference = t([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # excess row 0: 2, 0, 1, 4
    valid = b([[T_, T_, T_, T_], [T_, T_, T_, F_]])
    sel = S.threshold(1.0)
    keep = sel(scores=current, valid=valid, reference=reference)
    assert keep.tolist() == [[T_, F_, F_, T_], [F_, F_, F_, F_]]  # strictly above τ; 9.0 is unlabelled
    keep = S.threshold(-0.5)(scores=current, valid=valid, reference=reference)
    assert keep.sum(-1).tolist() == [4, 3]  # the ratio follows the data, never past the labels


def test_threshold_min_and_max_ratio():
    current = t([[3.0, 1.0, 2.0, 5.0], [0.5, 0.0, 0.2, 0.0]])
    reference = torch.zeros(2, 4)
    valid = torch.ones(2, 4, dtype=torch.bool)
    keep = S.threshold(1.0, min_ratio=0.25)(scores=current, valid=valid, reference=reference)
    assert keep.tolist() == [[T_, F_, T_, T_], [T_, F_, F_, F_]]  # row 1 filled to 1 by highest excess
    keep = S.threshold(0.0, max_ratio=0.5)(scores=current, valid=valid, reference=reference)
    assert keep.tolist() == [[T_, F_, F_, T_], [T_, F_, T_, F_]]
    keep = S.threshold(1.0, min_ratio=0.25, scope="batch")(scores=current, valid=valid, reference=reference)
    assert keep.sum().item() == 3 and not keep[1].any()  # 3 above τ ≥ round(0.25 × 8) = 2
    with pytest.raises(ValueError):
        S.threshold(0.0, min_ratio=0.8, max_ratio=0.5)
    with pytest.raises(ValueError):
        S.threshold(float("nan"))


# ---------------------------------------------------------------------------------- factory, determinism


def test_make_selector_builds_every_selector_and_reports_bad_params():
    built = {
        "random": S.make_selector("random", ratio=0.5, seed=3),
        "label_mask": S.make_selector("label_mask"),
        "self_loss": S.make_selector("self_loss", ratio=0.5),
        "excess_loss": S.make_selector("excess_loss", ratio=0.6, scope="batch"),
        "reference_loss": S.make_selector("reference_loss", ratio=0.6, prefer="high"),
        "threshold": S.make_selector("threshold", tau=0.0, min_ratio=0.1),
    }
    assert set(built) == set(S.SELECTORS)
    assert built["excess_loss"].scope == "batch" and built["reference_loss"].prefer == "high"
    with pytest.raises(ValueError, match="unknown token selector 'rho1'.*excess_loss"):
        S.make_selector("rho1")
    with pytest.raises(ValueError, match="unknown: keep"):
        S.make_selector("excess_loss", ratio=0.5, keep=0.5)
    with pytest.raises(ValueError, match="needs ratio"):
        S.make_selector("excess_loss")
    with pytest.raises(ValueError, match="keep ratio"):
        S.make_selector("excess_loss", ratio=1.5)
    sel = built["excess_loss"].with_ratio(0.3)
    assert sel.ratio == 0.3 and built["excess_loss"].ratio == 0.6 and sel.scope == "batch"


def test_selection_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    current = torch.rand(4, 64, generator=gen).round(decimals=1)  # many ties
    reference = torch.rand(4, 64, generator=gen).round(decimals=1)
    valid = torch.rand(4, 64, generator=gen) > 0.2
    for sel in (S.excess_loss(0.6), S.excess_loss(0.6, scope="batch"), S.threshold(0.1, min_ratio=0.2)):
        first = sel(scores=current, valid=valid, reference=reference)
        assert torch.equal(first, sel(scores=current.clone(), valid=valid.clone(), reference=reference.clone()))
    a = S.random(0.5, seed=7)(valid=valid, step=3)
    assert torch.equal(a, S.random(0.5, seed=7)(valid=valid, step=3))
    assert not torch.equal(a, S.random(0.5, seed=7)(valid=valid, step=4))
    assert not torch.equal(a, S.random(0.5, seed=8)(valid=valid, step=3))


# ------------------------------------------------------------------------- through the patched model


def test_excess_loss_selection_through_the_patched_model(gen):
    model = tiny_model("llama")
    ref_model = tiny_model("llama", seed=1)
    B, T = 3, 16
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    pos = torch.cat([torch.arange(9), torch.arange(7)]).expand(B, T)
    labels = ids.masked_fill(pos == 0, -100)
    inputs = dict(input_ids=ids, labels=labels, position_ids=pos)
    reference = OnlineReference(ref_model)(inputs)  # [B, T] under no_grad
    sel = S.excess_loss(0.5, scope="batch")
    centrifuge.apply(model)
    try:
        model.zero_grad(set_to_none=True)
        out = model(**inputs, select=sel.bind(reference=reference))
        out.loss.backward()
        after = grads_of(model)
        valid = S.labelled_positions(labels)
        expected = sel(scores=out.token_loss, valid=valid, reference=reference)
        assert torch.equal(out.keep_mask, expected)
        assert out.num_counted.item() == round(0.5 * valid.sum().item())
        assert not (out.keep_mask & ~valid).any()
        # the same keep set given before the forward gives the same gradients
        model.zero_grad(set_to_none=True)
        model(**inputs, keep_mask=out.keep_mask).loss.backward()
        assert max_rel_err(grads_of(model), after) < 1e-12
        # reference-only selection is known before the forward
        keep = S.select_before_forward(S.reference_loss(0.5), labels=labels, reference=reference)
        out2 = model(**inputs, keep_mask=keep)
        assert out2.num_counted.item() == keep.sum().item()
    finally:
        centrifuge.revert(model)


def test_threshold_that_keeps_nothing_is_refused(gen):
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
    centrifuge.apply(model)
    try:
        with pytest.raises(EmptySelectionError):
            model(input_ids=ids, labels=ids, select=S.threshold(1e6).bind(reference=torch.zeros(2, 8)))
        out = model(input_ids=ids, labels=ids, select=S.threshold(1e6, min_ratio=0.1).bind(
            reference=torch.zeros(2, 8)))
        assert out.num_counted.item() == 2  # round(0.1 × 7) = 1 per sequence
    finally:
        centrifuge.revert(model)
