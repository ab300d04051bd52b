"""Deferred, batched activation statistics (``centrifuge.neurons.statistics``) against the per-layer formulas."""

from __future__ import annotations

import types

import pytest
import torch
from omission_helpers import batch, step_grads, tiny_model

from centrifuge import neurons
from centrifuge.neurons import importance, statistics


def _layer(decay=0.7, channels=11, groups=3, head_dim=2, heads_per_group=2, old_mlp=None, old_group=None):
    return types.SimpleNamespace(ema=decay, num_channels=channels, num_groups=groups, head_dim=head_dim,
                                 heads_per_group=heads_per_group, pending={},
                                 scores={"mlp": old_mlp, "group": old_group})


def _expected_mlp(old, norms, kept, tokens, decay, total):
    rms = norms / tokens ** 0.5
    if kept is None:
        return rms if old is None else old * decay + rms * (1 - decay)
    old = torch.zeros(total) if old is None else old.clone()
    old[kept] = old[kept] * decay + rms * (1 - decay)
    return old


def test_flush_applies_each_layers_mlp_update_batched_by_shape():
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=gen) + 0.1  # noqa: E731
    cases = [  # (old score, kept ids, norms length)
        (None, None, 11), (rand(11), None, 11),  # every channel: first value as is, then the EMA
        (None, torch.tensor([7, 1, 4]), 3), (rand(11), torch.tensor([0, 9, 5]), 3),  # kept subsets
        (rand(11), torch.tensor([2, 3, 8, 10, 6]), 5),  # another kept count: its own batch
    ]
    layers, expected = [], []
    for old, kept, n in cases * 2:  # twice: batches of two
        om = _layer(old_mlp=old)
        norms = rand(n)
        om.pending["mlp"] = statistics.Pending(norms, kept, 13)
        layers.append(om)
        expected.append(_expected_mlp(old, norms, kept, 13, 0.7, 11))
    statistics.flush(layers, "mlp")
    for om, want in zip(layers, expected, strict=True):
        assert not om.pending
        torch.testing.assert_close(om.scores["mlp"], want, rtol=1e-6, atol=0)


def test_flush_of_groups_equals_group_activation_and_its_ema():
    gen = torch.Generator().manual_seed(1)
    layers, expected = [], []
    for old, kept in ((None, torch.tensor([2, 0])), (torch.rand(3, generator=gen), torch.tensor([1, 2])),
                      (torch.rand(3, generator=gen), None)):
        om = _layer(old_group=old)
        heads = 3 * 2 if kept is None else 2 * 2  # kept groups × G heads
        o = torch.randn(2, 5, heads, 2, generator=gen)
        om.pending["group"] = statistics.Pending(*importance.head_feature_norms(o)[:1], kept, 10)
        act = importance.group_activation(o, 2)
        if kept is None:
            want = old * 0.7 + act * 0.3
        else:
            want = torch.zeros(3) if old is None else old.clone()
            want[kept] = want[kept] * 0.7 + act * 0.3
        layers.append(om)
        expected.append(want)
    statistics.flush(layers, "group")
    for om, want in zip(layers, expected, strict=True):
        torch.testing.assert_close(om.scores["group"], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="statistics kind"):
        statistics.flush(layers, "heads")


def test_deferred_scores_equal_scores_updated_at_once_over_steps():
    """One omitter flushes every layer at plan time (batched); a twin reads each score after every forward
    (its own pending update applied at once, per layer). Same plans, same scores."""
    runs = []
    for eager in (False, True):
        model = tiny_model("qwen2")
        omitter = neurons.attach(model, rate=0.5, metric="activation", select="topk", multiple=16, ema=0.6)
        plans = []
        for step in range(4):
            plans.append(omitter.plan(step))
            step_grads(model, batch(step))
            if eager:
                for i in omitter.layer_indices:
                    state = omitter.layer_state(i)
                    assert state.mlp_score is not None and state.group_score is not None
                    assert not state.pending
            else:
                assert all(omitter.layer_state(i).pending for i in omitter.layer_indices)
        runs.append((plans, {k: v.clone() for k, v in omitter.state_dict().items()}))
    (plans_a, state_a), (plans_b, state_b) = runs
    for a, b in zip(plans_a, plans_b, strict=True):
        assert all(torch.equal(a.layers[i].channels, b.layers[i].channels) for i in a.layers)
        assert all(torch.equal(a.layers[i].groups, b.layers[i].groups) for i in a.layers)
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-6, atol=0)


def test_two_forwards_before_a_flush_apply_in_order():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="activation", select="topk", multiple=16, ema=0.5)
    state = omitter.layer_state(0)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    for i in range(2):  # no plan in between: dense, every channel, two pending updates
        model(**batch(i))
    hook.remove()
    first, second = (importance.feature_rms(a) for a in seen)
    torch.testing.assert_close(state.mlp_score, first * 0.5 + second * 0.5, rtol=1e-6, atol=0)
