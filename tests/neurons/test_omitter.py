"""Plans over training: schedules, statistics, determinism; optimizer masking of omitted rows."""

from __future__ import annotations

import pytest
import torch
from omission_helpers import batch, step_grads, tiny_model

from centrifuge import neurons, schedules


def test_ladder_schedule_drives_plans_and_the_average_rate():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, schedule="ladder", hold_fraction=0.5, rungs=2, metric="uniform",
                             multiple=16, total_steps=20)
    assert omitter.average_rate(20) == pytest.approx(schedules.average(schedules.Ladder(0.5, 0.5, 2), 20))
    assert omitter.average_rate(20) == pytest.approx((10 * 0.5 + 5 * 0.25) / 20)
    assert omitter.plan(0).layers[0].channels.numel() == 64
    assert omitter.plan(12).layers[0].channels.numel() == 96  # rate 0.25
    last = omitter.plan(19)
    assert last.rate == 0.0 and last.layers == {}
    with pytest.raises(ValueError, match="needs total_steps"):
        neurons.attach(tiny_model("llama"), rate=0.5, schedule="cosine").plan(0)


def test_plans_are_deterministic_per_seed_and_step():
    def plans(seed, steps):
        model = tiny_model("llama")
        omitter = neurons.attach(model, rate=0.5, metric="activation", select="sample", multiple=16, seed=seed)
        step_grads(model, batch(0))  # gathers the activation statistics
        return [omitter.plan(s).layers[1].channels for s in steps]

    a, b = plans(0, [3, 4]), plans(0, [3, 4])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(plans(1, [3])[0], a[0])


@pytest.mark.parametrize("metric", ["activation", "magnitude", "wanda"])
def test_statistics_come_from_training_forwards(metric):
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric=metric, select="topk", multiple=16)
    first = omitter.plan(0)
    assert first.layers == {} and first.dense_layers == (0, 1)  # nothing measured yet: dense
    captured = {}
    mlp = model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0].detach()))
    step_grads(model, batch(0))
    handle.remove()
    state = omitter.layer_state(0)
    x = captured["x"]
    if metric == "activation":
        a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        expected = a.pow(2).mean((0, 1)).sqrt()
    elif metric == "magnitude":
        expected = neurons.importance.mlp_magnitude(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    else:
        x_rms = x.pow(2).mean((0, 1)).sqrt()
        expected = (mlp.gate_proj.weight.abs() + mlp.up_proj.weight.abs()) @ x_rms
    assert torch.allclose(state.mlp_score.double(), expected.double(), rtol=1e-5)
    assert state.group_score is not None and state.group_score.shape == (2,)
    plan = omitter.plan(1)
    assert plan.dense_layers == ()
    assert torch.equal(plan.layers[0].channels, expected.topk(64).indices.sort().values)


def test_activation_statistics_of_omitted_units_stay_put():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="activation", select="topk", multiple=16, ema=0.5)
    step_grads(model, batch(0))
    before = omitter.layer_state(0).mlp_score.clone()
    plan = omitter.plan(1)
    step_grads(model, batch(1))
    after = omitter.layer_state(0).mlp_score
    kept, dropped = plan.layers[0].channels, plan.layers[0].dropped_channels
    assert torch.equal(after[dropped], before[dropped])
    assert not torch.equal(after[kept], before[kept])


def test_no_gradient_of_omitted_units_under_gradient_accumulation_with_one_plan():
    model = tiny_model("qwen2")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    plan = omitter.plan(0)
    model.zero_grad()
    for i in range(2):
        model(**batch(i)).loss.backward()
    g = model.model.layers[1].mlp.up_proj.weight.grad
    assert torch.all(g[plan.layers[1].dropped_channels] == 0)
    assert torch.all(model.model.layers[1].self_attn.q_proj.bias.grad[plan.layers[1].dropped_q_rows] == 0)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters() if opt.state[p]}
    return params, state


@pytest.mark.parametrize("warm", [True, False], ids=["with-state", "first-step"])
def test_optimizer_mask_keeps_omitted_rows_and_adamw_state(warm):
    model = tiny_model("qwen2")  # q / k / v biases too
    opt = _adamw(model)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    omitter.protect(opt)
    if warm:  # one dense step first, so every row has momentum and second moments
        omitter.clear()
        step_grads(model, batch(0))
        opt.step()
    plan = omitter.plan(1)
    step_grads(model, batch(1))
    params, state = _snapshot(model, opt)
    opt.step()
    lp = plan.layers[1]
    checks = [
        ("model.layers.1.mlp.gate_proj.weight", 0, lp.dropped_channels, lp.channels),
        ("model.layers.1.mlp.down_proj.weight", 1, lp.dropped_channels, lp.channels),
        ("model.layers.1.self_attn.q_proj.weight", 0, lp.dropped_q_rows, lp.q_rows),
        ("model.layers.1.self_attn.v_proj.bias", 0, lp.dropped_kv_rows, lp.kv_rows),
        ("model.layers.1.self_attn.o_proj.weight", 1, lp.dropped_q_rows, lp.q_rows),
    ]
    named = dict(model.named_parameters())
    for name, dim, dropped, kept in checks:
        p = named[name]
        assert torch.equal(p.detach().index_select(dim, dropped), params[name].index_select(dim, dropped)), name
        assert not torch.equal(p.detach().index_select(dim, kept), params[name].index_select(dim, kept)), name
        for key in ("exp_avg", "exp_avg_sq"):
            now = opt.state[p][key].index_select(dim, dropped)
            was = state[name][key].index_select(dim, dropped) if warm else torch.zeros_like(now)
            assert torch.equal(now, was), (name, key)
            assert not torch.equal(opt.state[p][key].index_select(dim, kept),
                                   state[name][key].index_select(dim, kept) if warm else torch.zeros_like(now))
    # parameters outside omission (norms, embeddings) move as usual
    assert not torch.equal(named["model.norm.weight"].detach(), params["model.norm.weight"])


def test_optimizer_mask_intersects_plans_of_micro_batches_and_can_be_removed():
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16, heads=False)
    mask = omitter.protect(opt)
    plans = [omitter.plan(s) for s in (0, 1)][::-1]
    model.zero_grad()
    for i, plan in enumerate(plans):
        omitter.set_plan(plan)
        model(**batch(i)).loss.backward()
    w = model.model.layers[0].mlp.gate_proj.weight
    before = w.detach().clone()
    opt.step()
    a, b = (p.layers[0].dropped_channels for p in plans)
    both = torch.tensor(sorted(set(a.tolist()) & set(b.tolist())))
    either = torch.tensor(sorted(set(a.tolist()) ^ set(b.tolist())))
    assert torch.equal(w.detach()[both], before[both])
    assert not torch.equal(w.detach()[either], before[either])
    mask.remove()
    omitter.plan(2)
    model.zero_grad()
    model(**batch(3)).loss.backward()
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w.detach()[omitter.current.layers[0].dropped_channels],
                           before[omitter.current.layers[0].dropped_channels])  # weight decay, unprotected


def test_statistics_round_trip_through_state_dict():
    model, other = tiny_model("llama"), tiny_model("llama")
    a = neurons.attach(model, rate=0.5, metric="wanda", multiple=16)
    b = neurons.attach(other, rate=0.5, metric="wanda", multiple=16)
    step_grads(model, batch(0))
    state = a.state_dict()
    assert set(state) == {f"{i}.{n}" for i in (0, 1) for n in ("mlp_score", "group_score", "mlp_x_ms", "attn_x_ms")}
    b.load_state_dict(state)
    pa, pb = a.plan(4), b.plan(4)
    assert all(torch.equal(pa.layers[i].channels, pb.layers[i].channels) for i in (0, 1))
    with pytest.raises(KeyError, match="unexpected omission statistic"):
        b.load_state_dict({"0.bogus": torch.zeros(1)})


def test_a_dense_forward_in_the_step_unprotects_everything():
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    omitter.protect(opt)
    plan = omitter.plan(0)
    omitter.clear()
    step_grads(model, batch(0))
    w = model.model.layers[0].mlp.gate_proj.weight
    before = w.detach().clone()
    opt.step()
    dropped = plan.layers[0].dropped_channels
    assert not torch.equal(w.detach()[dropped], before[dropped])


def _same_plan(a, b) -> bool:
    if (a.step, a.rate, a.dense_layers, sorted(a.layers)) != (b.step, b.rate, b.dense_layers, sorted(b.layers)):
        return False
    return all(torch.equal(getattr(a.layers[i], f), getattr(b.layers[i], f))
               for i in a.layers for f in ("channels", "groups", "dropped_channels", "dropped_groups"))


@pytest.mark.parametrize("metric", ["activation", "uniform"])
def test_a_protected_optimizer_step_prefetches_the_plan_that_plan_would_make(metric):
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric=metric, multiple=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    omitter.protect(opt)
    for step in range(3):
        omitter.plan(step)
        step_grads(model, batch(step))
        opt.step()
        key, prefetched = omitter._prefetched
        assert key[0] == step + 1
        assert _same_plan(prefetched, omitter._make_plan(step + 1, None))
    assert omitter.plan(3) is prefetched  # taken as is
    assert omitter._prefetched is None

    # statistics changed after the prefetch (another forward): plan() makes a fresh one, equal to a twin's
    step_grads(model, batch(3))
    opt.step()
    _, stale = omitter._prefetched
    step_grads(model, batch(4))
    fresh = omitter.plan(4)
    assert _same_plan(fresh, omitter._make_plan(4, None))
    if metric == "activation":
        assert fresh is not stale and not _same_plan(fresh, stale)
    else:  # no statistics: nothing changed, the prefetched plan holds
        assert fresh is stale
    # another step than the prefetched one: made afresh
    step_grads(model, batch(5))
    opt.step()
    assert omitter._prefetched[0][0] == 5
    assert omitter.plan(9).step == 9


def test_prefetch_past_the_schedule_end_leaves_the_error_to_plan():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16, schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    omitter.protect(opt)
    omitter.plan(3, 4)  # the last step
    step_grads(model, batch(0))
    opt.step()  # step 4 of 4 does not exist: no prefetch, no error here
    assert omitter._prefetched is None
    with pytest.raises(ValueError, match=r"step 4 outside \[0, 4\)"):
        omitter.plan(4, 4)
