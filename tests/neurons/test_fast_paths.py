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


@pytest.mark.parametrize("dim", [0, 1])
def test_gather_backward_copies_what_index_select_backward_adds(dim):
    from centrifuge.neurons.layers import gather

    torch.manual_seed(dim)
    source = torch.randn(37, 29, dtype=torch.float64, requires_grad=True)
    index = torch.randperm(source.shape[dim])[:13]  # distinct, unsorted, not a round count
    upstream = torch.randn(source.index_select(dim, index).shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(source.index_select(dim, index), source, upstream)
    out = gather(source, dim, index)
    assert torch.equal(out, source.index_select(dim, index))
    (got,) = torch.autograd.grad(out, source, upstream)
    assert torch.equal(got, expected)
    omitted = torch.ones(source.shape[dim], dtype=torch.bool)
    omitted[index] = False
    assert got.index_select(dim, omitted.nonzero().squeeze(1)).abs().sum() == 0
    assert torch.equal(got.index_select(dim, index), upstream)
    with torch.no_grad():
        assert not gather(source, dim, index).requires_grad


def test_sliced_linear_gradients_equal_the_index_select_linear():
    from centrifuge.neurons.layers import sliced_linear

    torch.manual_seed(1)
    module = torch.nn.Linear(23, 31, bias=True, dtype=torch.float64)
    x = torch.randn(5, 3, 23, dtype=torch.float64)
    rows, cols = torch.randperm(31)[:11], torch.randperm(23)[:9]
    for r, c in ((rows, None), (None, cols), (rows, cols)):
        x_in = x if c is None else x[..., c]
        w = module.weight if r is None else module.weight.index_select(0, r)
        w = w if c is None else w.index_select(1, c)
        b = module.bias if r is None else module.bias.index_select(0, r)
        upstream = torch.randn(5, 3, w.shape[0], dtype=torch.float64)
        expected = torch.autograd.grad(torch.nn.functional.linear(x_in, w, b), (module.weight, module.bias), upstream)
        got = torch.autograd.grad(sliced_linear(module, x_in, rows=r, cols=c), (module.weight, module.bias), upstream)
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_statistics_read_an_even_stride_of_at_most_max_rows_tokens():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, 11, dtype=torch.float64, generator=gen) + 0.5  # 21 tokens
    assert importance.token_sample(x.reshape(21, 11), 10).shape[0] == 7  # stride 3
    assert importance.token_sample(x.reshape(21, 11), 21).shape[0] == 21
    sampled = x.reshape(21, 11)[::3]
    expected = sampled.square().mean(0).sqrt()
    assert torch.allclose(importance.feature_rms(x, 10).double(), expected, rtol=1e-6, atol=0)
    assert torch.allclose(importance.feature_rms(x, 0).double(), x.reshape(21, 11).square().mean(0).sqrt(),
                          rtol=1e-6, atol=0)
    o = torch.randn(3, 7, 6, 5, dtype=torch.float64, generator=gen)  # h = 3 groups × G = 2
    for tensor in (o, o.transpose(0, 1)):  # contiguous and not
        rows = tensor.reshape(21, 6, 5)[::3]
        expected = (rows.square().sum((0, 2)) / (7 * 5)).sqrt().view(3, 2).sum(1)
        got = importance.group_activation(tensor, 2, max_rows=10).double()
        assert torch.allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("stat_tokens", [0, 9])
def test_activation_scores_come_from_the_sampled_tokens(stat_tokens):
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="activation", multiple=16, stat_tokens=stat_tokens)
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(**batch(0, b=2, s=16))  # the first step runs dense and gathers statistics of every channel
    hook.remove()
    a = seen[0].reshape(32, -1)
    rows = a if stat_tokens == 0 else a[::4]  # 32 tokens, at most 9: stride 4 → 8 tokens
    expected = rows.square().mean(0).sqrt()
    torch.testing.assert_close(omitter.layer_state(1).mlp_score.double(), expected, rtol=1e-6, atol=0)
