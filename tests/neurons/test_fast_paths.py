"""The omission path's batched / one-pass shortcuts against the plain computations they replace."""

from __future__ import annotations

import pytest
import torch
from omission_helpers import batch, step_grads, tiny_model

from centrifuge import neurons
from centrifuge.neurons import LayerPlan, importance
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
def test_plans_batched_by_the_omitter_equal_what_a_plan_computes_itself(metric):
    # odd sizes: 3 KV groups of 2 heads, head_dim 8, 200 channels kept in multiples of 8
    model = tiny_model("qwen2", heads=6, kv_heads=3, intermediate=200, layers=3)
    omitter = neurons.attach(model, rate=0.4, metric=metric, multiple=8)
    if metric == "activation":
        omitter.plan(0)  # dense: no statistics yet
        step_grads(model, batch(0))
    plan = omitter.plan(1)
    assert sorted(plan.layers) == [0, 1, 2]
    assert plan.layers[0].__dict__["_groups_batch"][0]._done == {}  # nothing derived before first use
    for i, lp in plan.layers.items():
        fresh = LayerPlan(channels=lp.channels, dropped_channels=lp.dropped_channels, groups=lp.groups,
                          dropped_groups=lp.dropped_groups, heads_per_group=2, head_dim=8)
        for name in ("q_rows", "kv_rows", "dropped_q_rows", "dropped_kv_rows"):
            assert torch.equal(getattr(lp, name), getattr(fresh, name)), (i, name)
        for name, n in (("keep_channels", 200), ("keep_q_rows", 3), ("keep_kv_rows", 3)):
            assert torch.equal(getattr(lp, name)(n), getattr(fresh, name)(n)), (i, name)


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


def test_group_activation_by_feature_norms_equals_the_direct_reduction():
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(3, 7, 6, 5, dtype=torch.float64, generator=gen)  # B, S, h = 3 groups × G = 2, D
    expected = (o.square().sum((0, 1, 3)) / (3 * 7 * 5)).sqrt().view(3, 2).sum(1)
    assert torch.allclose(importance.group_activation(o, 2).double(), expected, rtol=1e-6, atol=0)  # float32 out
    strided = o.transpose(0, 1)  # not contiguous: the direct reduction
    assert torch.allclose(importance.group_activation(strided, 2).double(), expected, rtol=1e-6, atol=0)
