"""The omission path's batched / one-pass shortcuts against the plain computations they replace."""

from __future__ import annotations

import pytest
import torch
from omission_helpers import batch, step_grads, tiny_model

from centrifuge import neurons
from centrifuge.neurons import LayerPlan, sliced_linear
from centrifuge.neurons.layers import _SlicedWeight
from centrifuge.neurons.plan import group_rows, keep_vector


def _random_ids(gen, rows: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(rows)])
    return order[:, :k].sort(1).values, order[:, k:].sort(1).values


def test_batched_group_rows_and_keep_vectors_equal_the_per_layer_ones():
    gen = torch.Generator().manual_seed(3)
    kept, dropped = _random_ids(gen, 5, 7, 3)
    for width in (1, 5, 12):
        rows = group_rows(kept, width)
        assert rows.shape == (5, 3 * width)
        for r in range(5):
            expected = torch.tensor([g * width + j for g in kept[r].tolist() for j in range(width)])
            assert torch.equal(rows[r], expected) and torch.equal(group_rows(kept[r], width), expected)
    keep = keep_vector(dropped, 7)
    for r in range(5):
        expected = torch.ones(7, dtype=torch.bool)
        expected[dropped[r]] = False
        assert torch.equal(keep[r], expected)


@pytest.mark.parametrize("metric", ["uniform", "activation"])
def test_plans_prefilled_by_the_omitter_equal_what_a_plan_computes_itself(metric):
    # odd sizes: 3 KV groups of 2 heads, head_dim 8, 200 channels kept in multiples of 8
    model = tiny_model("qwen2", heads=6, kv_heads=3, intermediate=200, layers=3)
    omitter = neurons.attach(model, rate=0.4, metric=metric, multiple=8)
    if metric == "activation":
        omitter.plan(0)  # dense: no statistics yet
        step_grads(model, batch(0))
    plan = omitter.plan(1)
    assert sorted(plan.layers) == [0, 1, 2]
    for i, lp in plan.layers.items():
        fresh = LayerPlan(channels=lp.channels, dropped_channels=lp.dropped_channels, groups=lp.groups,
                          dropped_groups=lp.dropped_groups, heads_per_group=2, head_dim=8)
        for name in ("q_rows", "kv_rows", "dropped_q_rows", "dropped_kv_rows"):
            assert torch.equal(getattr(lp, name), getattr(fresh, name)), (i, name)
        for name, n in (("keep_channels", 200), ("keep_q_rows", 3), ("keep_kv_rows", 3)):
            assert torch.equal(getattr(lp, name)(n), getattr(fresh, name)(n)), (i, name)
        for name in ("gate_proj", "down_proj", "q_proj", "k_proj", "o_proj"):
            kept = [t for t in lp.slices(name) if t is not None][0]
            dropped = [t for t in lp.dropped_slices(name) if t is not None][0]
            assert sorted(kept.tolist() + dropped.tolist()) == list(range(kept.numel() + dropped.numel()))


def test_omitted_units_carry_keep_vectors_for_one_plan_and_none_for_an_intersection():
    model = tiny_model("qwen2", layers=1)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    omitter.protect(torch.optim.SGD(model.parameters(), lr=0.1))  # plans of one step accumulate
    omitter.plan(0)
    units = omitter.omitted_units()
    assert len(units) == 3 + 3 + 3 + 1 + 0  # gate, up, down; q, k, v weights, their biases; o
    for param, dim, ids, keep in units:
        expected = torch.ones(param.shape[dim], dtype=torch.bool)
        expected[ids] = False
        assert keep is not None and torch.equal(keep, expected)
    assert [(p, d, i) for p, d, i, _ in units] == omitter.omitted_slices()
    omitter.plan(1)  # a second plan in the same step: the omitted set is the intersection
    assert all(keep is None for *_, keep in omitter.omitted_units())


@pytest.mark.parametrize("dim", [0, 1])
def test_sliced_weight_gradient_is_autograds_in_one_pass(dim):
    gen = torch.Generator().manual_seed(dim)
    weight = torch.randn(37, 53, dtype=torch.float64, generator=gen, requires_grad=True)
    n = weight.shape[dim]
    kept, dropped = (t[0] for t in _random_ids(gen, 1, n, 19))
    upstream = torch.randn([19 if d == dim else s for d, s in enumerate(weight.shape)], dtype=torch.float64,
                           generator=gen)
    (expected,) = torch.autograd.grad(weight.index_select(dim, kept), weight, upstream)
    out = _SlicedWeight.apply(weight, dim, kept, dropped)
    assert torch.equal(out, weight.index_select(dim, kept))
    (grad,) = torch.autograd.grad(out, weight, upstream)
    assert torch.equal(grad, expected)
    assert torch.all(grad.index_select(dim, dropped) == 0)


def test_sliced_linear_with_complements_equals_plain_autograd():
    gen = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(29, 41, dtype=torch.float64)
    x = torch.randn(3, 5, 29, dtype=torch.float64, generator=gen)
    rows, dropped_rows = (t[0] for t in _random_ids(gen, 1, 41, 17))
    cols, dropped_cols = (t[0] for t in _random_ids(gen, 1, 29, 13))
    for kw, x_in in ((dict(rows=rows), x), (dict(rows=rows, dropped_rows=dropped_rows), x),
                     (dict(cols=cols), x[..., cols]), (dict(cols=cols, dropped_cols=dropped_cols), x[..., cols]),
                     (dict(rows=rows, cols=cols, dropped_rows=dropped_rows, dropped_cols=dropped_cols), x[..., cols])):
        lin.zero_grad(set_to_none=True)
        y = sliced_linear(lin, x_in, **kw)
        y.square().sum().backward()
        weight = lin.weight
        if "rows" in kw:
            weight = weight.index_select(0, rows)
        if "cols" in kw:
            weight = weight.index_select(1, cols)
        bias = lin.bias.index_select(0, rows) if "rows" in kw else lin.bias
        ref = torch.nn.functional.linear(x_in, weight, bias)
        grads = torch.autograd.grad(ref.square().sum(), (lin.weight, lin.bias))
        assert torch.equal(y, ref), kw
        assert torch.equal(lin.weight.grad, grads[0]) and torch.equal(lin.bias.grad, grads[1]), kw
