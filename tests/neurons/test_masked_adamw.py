"""Masked AdamW: the op (Triton kernel against a float64 reference, and the reference against torch's own
AdamW / Adam) and its use as ``OptimizerMask``'s fast path (equal to the save / restore path, fallbacks, state
that the stock optimizer takes over).

Without CUDA the Triton kernel runs under the interpreter: the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` for the test only (the kernel is decorated at its first use in that mode, and it calls
no Triton library function that was decorated when Triton was imported); with CUDA it runs compiled.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from omission_helpers import batch, step_grads, tiny_model

from centrifuge import neurons
from centrifuge.neurons import optim as neuron_optim
from centrifuge.ops import masked_adamw as ops

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
HP = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    if not _CUDA and "TRITON_INTERPRET" not in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _keeps(case: str, shape, gen):
    """Irregular keep patterns: runs, isolated holes, the first and last index omitted."""
    def irregular(n):
        keep = torch.rand(n, generator=gen) > 0.45
        keep[0], keep[-1] = False, True
        keep[n // 3: n // 3 + 5] = False
        return keep.to(DEVICE)
    rows = irregular(shape[0]) if case in ("rows", "both", "bias") else None
    cols = irregular(shape[1]) if case in ("cols", "both") else None
    if case == "both":
        cols = cols.to(torch.uint8)
    return rows, cols


def _kept_mask(shape, rows, cols):
    keep = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    if rows is not None:
        keep &= rows.bool()[:, None] if len(shape) == 2 else rows.bool()
    if cols is not None:
        keep &= cols.bool()[None, :]
    return keep


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
@pytest.mark.parametrize("case,shape,block", [
    ("rows", (37, 53), None), ("rows", (37, 53), (8, 16)), ("cols", (37, 53), (4, 32)), ("both", (37, 53), None),
    ("bias", (41,), (16, 1)),
])
def test_triton_equals_the_float64_reference_and_leaves_omitted_elements(interpret, case, shape, block, decoupled):
    gen = torch.Generator().manual_seed(7)
    rows, cols = _keeps(case, shape, gen)
    keep = _kept_mask(shape, rows, cols)
    p = torch.randn(shape, generator=gen).to(DEVICE)
    m = (0.1 * torch.randn(shape, generator=gen)).to(DEVICE)
    v = (0.01 * torch.rand(shape, generator=gen)).to(DEVICE)
    state32 = [p.clone(), m.clone(), v.clone()]
    state64 = [t.double() for t in state32]
    step_on_device = torch.zeros((), device=DEVICE)
    for step in range(1, 4):
        g = torch.randn(shape, generator=gen).to(DEVICE)
        before = [t.clone() for t in state32]
        step_on_device += 1
        # step 1 from the host, later steps read in the kernel (fused / capturable AdamW keep it on device)
        ops.masked_adamw_triton_(state32[0], g, state32[1], state32[2], keep_rows=rows, keep_cols=cols,
                                 step=step if step == 1 else step_on_device, weight_decay=0.1, decoupled=decoupled,
                                 block=block, **HP)
        ops.masked_adamw_reference_(state64[0], g.double(), state64[1], state64[2], keep_rows=rows, keep_cols=cols,
                                    step=step, weight_decay=0.1, decoupled=decoupled, **HP)
        for name, got, ref, was in zip(("param", "exp_avg", "exp_avg_sq"), state32, state64, before, strict=True):
            assert torch.equal(got[~keep], was[~keep]), (name, step)  # bit-for-bit untouched
            assert not torch.equal(got[keep], was[keep]), (name, step)
            err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err < 1e-6, (name, step, err)


def test_multi_tensor_triton_equals_the_float64_reference(interpret):
    """One launch per shape group: mixed shapes, 1-D rows, row / column / both / no keeps, a strided parameter,
    steps on the device (float32 and float64 counts: separate groups) and on the host."""
    gen = torch.Generator().manual_seed(3)
    cases = [("rows", (37, 53)), ("cols", (37, 53)), ("both", (37, 53)), ("none", (37, 53)), ("bias", (41,)),
             ("rows", (20, 53)), ("rows", (37, 53))]
    keeps = [_keeps(case, shape, gen) if case != "none" else (None, None) for case, shape in cases]
    state32 = [[torch.randn(s, generator=gen).to(DEVICE), (0.1 * torch.randn(s, generator=gen)).to(DEVICE),
                (0.01 * torch.rand(s, generator=gen)).to(DEVICE)] for _, s in cases]
    state32[5][0] = state32[5][0].t().contiguous().t()  # a strided parameter: a group of its own
    state64 = [[t.double() for t in st] for st in state32]
    steps = [torch.zeros((), device=DEVICE) for _ in range(5)] + [0, torch.zeros((), dtype=torch.float64,
                                                                                   device=DEVICE)]
    for step in range(1, 3):
        grads = [torch.randn(s, generator=gen).to(DEVICE) for _, s in cases]
        steps = [t + 1 for t in steps]
        before = [[t.clone() for t in st] for st in state32]
        launches = ops.masked_adamw_multi_triton_(
            [st[0] for st in state32], grads, [st[1] for st in state32], [st[2] for st in state32],
            keep_rows=[k[0] for k in keeps], keep_cols=[k[1] for k in keeps], steps=steps, weight_decay=0.1, **HP)
        assert launches == 4  # (37, 53) × float32 steps, [41] → [1, 41], strided (20, 53) host, float64 steps
        for st, g, (rows, cols) in zip(state64, grads, keeps, strict=True):
            ops.masked_adamw_reference_(st[0], g.double(), st[1], st[2], keep_rows=rows, keep_cols=cols, step=step,
                                        weight_decay=0.1, **HP)
        for (case, shape), got, ref, was, (rows, cols) in zip(cases, state32, state64, before, keeps, strict=True):
            keep = _kept_mask(shape, rows, cols)
            for t32, t64, t0 in zip(got, ref, was, strict=True):
                assert torch.equal(t32[~keep], t0[~keep]), (case, shape, step)
                assert (t32.double() - t64).abs().max().item() / t64.abs().max().item() < 1e-6, (case, shape, step)


def test_reference_with_everything_kept_is_torch_adamw_and_adam():
    gen = torch.Generator().manual_seed(1)
    for cls, kw, decoupled in ((torch.optim.AdamW, {}, True), (torch.optim.Adam, {}, False),
                               (torch.optim.Adam, {"decoupled_weight_decay": True}, True)):
        w = torch.nn.Parameter(torch.randn(9, 5, dtype=torch.float64, generator=gen))
        opt = cls([w], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=0.1, **kw)
        p, m, v = w.detach().clone(), torch.zeros_like(w), torch.zeros_like(w)
        for step in range(1, 4):
            w.grad = torch.randn(9, 5, dtype=torch.float64, generator=gen)
            opt.step()
            ran = ops.masked_adamw_(p, w.grad, m, v, keep_rows=torch.ones(9, dtype=torch.bool), step=step,
                                    weight_decay=0.1, decoupled=decoupled, **HP)
            assert ran == "reference"
            torch.testing.assert_close(p, w.detach(), rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(m, opt.state[w]["exp_avg"], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(v, opt.state[w]["exp_avg_sq"], rtol=1e-13, atol=1e-15)


def test_op_checks_its_arguments(monkeypatch):
    p = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="keep_rows"):
        ops.masked_adamw_(p, p, p.clone(), p.clone(), keep_rows=torch.ones(3, dtype=torch.bool), step=1, **HP)
    with pytest.raises(ValueError, match="keep_cols needs a 2-D"):
        ops.masked_adamw_(p[0], p[0], p[0], p[0], keep_cols=torch.ones(3, dtype=torch.bool), step=1, **HP)
    with pytest.raises(ValueError, match="impl"):
        ops.masked_adamw_(p, p, p.clone(), p.clone(), step=1, impl="cuda", **HP)
    if not _CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA"):
            ops.masked_adamw_(p, p, p.clone(), p.clone(), step=1, impl="triton", **HP)


# ------------------------------------------------------------------------------------------ OptimizerMask


def _groups(model, **norm_group):
    """Weight decay on everything but the norms (q / k / v biases included); the norms in their own group."""
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    plain = [p for n, p in model.named_parameters() if "norm" in n]
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0, "lr": 0.02, **norm_group}]


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(_groups(m), lr=0.05, betas=(0.9, 0.99), weight_decay=0.1),
    "adamw-fused": lambda m: torch.optim.AdamW(_groups(m), lr=0.05, weight_decay=0.1, fused=True),
    "adamw-tensor-lr": lambda m: torch.optim.AdamW(_groups(m), lr=torch.tensor(0.05, dtype=torch.float64),
                                                      weight_decay=0.1),
    "adam-l2": lambda m: torch.optim.Adam(_groups(m), lr=0.05, weight_decay=0.1),
    "adam-decoupled": lambda m: torch.optim.Adam(_groups(m), lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
}


def _train(make_opt, fast, *, steps=4, dtype=torch.float64, model_type="qwen2"):
    """Steps with changing plans: the first step omits (fresh state), step 2 intersects two micro-batch
    plans, step 3 is dense. Returns model, optimizer, mask and, per step, the names whose gradient was None
    inside the stock step."""
    model = tiny_model(model_type, dtype=dtype)  # qwen2: q / k / v biases, 1-D rows
    names = {id(p): n for n, p in model.named_parameters()}
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    opt = make_opt(model)
    mask = omitter.protect(opt, fast=fast)
    held = []
    opt.register_step_pre_hook(  # runs after the mask's pre-step hook
        lambda o, a, k: held.append({names[id(p)] for g in o.param_groups for p in g["params"] if p.grad is None}))
    for step in range(steps):
        if step == 2:
            plans = [omitter.plan(step), omitter.plan(step + 100)]
            model.zero_grad(set_to_none=True)
            for i, plan in enumerate(plans):
                omitter.set_plan(plan)
                model(**batch(10 + i)).loss.backward()
        else:
            if step == 3:
                omitter.clear()
            else:
                omitter.plan(step)
            step_grads(model, batch(step))
        opt.step()
        assert all(p.grad is not None for p in model.parameters())  # held-back gradients came back
    return model, opt, mask, omitter, held


def _assert_same(a, b, tol=1e-11):
    """Parameters and optimizer states equal within ``tol``, relative to each tensor's largest entry (in float32
    a few isolated entries, where Adam's first step divides a near-zero gradient by its own size, amplify
    rounding differences: the float32 comparisons therefore use the relative norm of the difference)."""
    (model_a, opt_a), (model_b, opt_b) = a, b

    def close(x, y, what):
        x, y = x.double(), y.double()
        scale = max(y.abs().max().item(), 1e-30)
        err = ((x - y).abs().max().item() / scale if tol < 1e-9
               else (x - y).norm().item() / max(y.norm().item(), 1e-30))
        assert err <= tol, (what, err)

    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        close(pa.detach(), pb.detach(), name)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), name
        for key in sa:
            assert (sa[key].dtype, sa[key].device) == (sb[key].dtype, sb[key].device), (name, key)
            close(sa[key], sb[key], (name, key))


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_fast_path_equals_save_restore_and_hands_state_back(kind):
    fast_model, fast_opt, fast_mask, fast_om, held = _train(OPTIMIZERS[kind], None)
    slow_model, slow_opt, slow_mask, slow_om, slow_held = _train(OPTIMIZERS[kind], False)
    _assert_same((fast_model, fast_opt), (slow_model, slow_opt))
    # the fast path was taken: omitted weights were held back from the stock step (and only on omitting steps)
    assert fast_mask.fast_updates > 0 and slow_mask.fast_updates == 0
    assert "model.layers.0.mlp.gate_proj.weight" in held[0] and "model.layers.1.self_attn.q_proj.bias" in held[0]
    assert "model.layers.0.self_attn.o_proj.weight" in held[0] and "model.layers.0.mlp.down_proj.weight" in held[2]
    assert held[3] == set()
    assert "model.embed_tokens.weight" not in held[0] and not any(slow_held)
    # (d) protection off: the stock optimizer continues from the state the masked path left
    updates = fast_mask.fast_updates
    for model, mask, om, opt in ((fast_model, fast_mask, fast_om, fast_opt),
                                 (slow_model, slow_mask, slow_om, slow_opt)):
        mask.remove()
        om.plan(7)
        step_grads(model, batch(7))
        opt.step()
    _assert_same((fast_model, fast_opt), (slow_model, slow_opt))
    assert fast_mask.fast_updates == updates


@pytest.mark.parametrize("fused", [False, True], ids=["host-step", "device-step"])
def test_fast_path_through_the_triton_kernel(monkeypatch, fused):
    """The mask with the Triton kernel (interpreted, on CPU, also where CUDA exists) in float32 against the save /
    restore path (Llama: Qwen2's k_proj bias has a near-zero gradient whose normalised Adam step is rounding
    noise in float32)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(neuron_optim, "masked_adamw_multi_", functools.partial(ops.masked_adamw_multi_, impl="triton"))
    make = lambda m: torch.optim.AdamW(_groups(m), lr=0.01, weight_decay=0.1, fused=fused)  # noqa: E731
    fast = _train(make, True, steps=3, dtype=torch.float32, model_type="llama")
    slow = _train(make, False, steps=3, dtype=torch.float32, model_type="llama")
    assert fast[2].fast_updates > 0
    _assert_same(fast[:2], slow[:2], tol=5e-6)


def test_first_step_leaves_zero_state_in_omitted_rows():
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    mask = omitter.protect(opt, fast=True)
    lp = omitter.plan(0).layers[0]
    step_grads(model, batch(0))
    down = model.model.layers[0].mlp.down_proj.weight
    before = down.detach().clone()
    opt.step()
    assert mask.fast_updates == 14 and opt.state[down]["step"].item() == 1
    assert torch.equal(down.detach()[:, lp.dropped_channels], before[:, lp.dropped_channels])
    for key in ("exp_avg", "exp_avg_sq"):
        assert not opt.state[down][key][:, lp.dropped_channels].any()
        assert opt.state[down][key][:, lp.channels].abs().sum() > 0


@pytest.mark.parametrize("kind", ["amsgrad", "sgd"])
def test_unsupported_optimizers_fall_back_and_still_protect(kind):
    model = tiny_model("llama")
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True) if kind == "amsgrad"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1))
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    mask = omitter.protect(opt)
    for step in range(2):
        lp = omitter.plan(step).layers[1]
        step_grads(model, batch(step))
        w = model.model.layers[1].mlp.up_proj.weight
        before = w.detach().clone()
        opt.step()
        assert torch.equal(w.detach()[lp.dropped_channels], before[lp.dropped_channels])
        assert not torch.equal(w.detach()[lp.channels], before[lp.channels])
    assert mask.fast_updates == 0


def test_fast_true_refuses_what_it_cannot_do():
    model = tiny_model("llama")
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=16)
    with pytest.raises(ValueError, match=r"fast=True\): the masked path needs torch.optim.AdamW or .*SGD"):
        omitter.protect(torch.optim.SGD(model.parameters(), lr=0.1), fast=True)
    with pytest.raises(ValueError, match="amsgrad"):
        omitter.protect(torch.optim.AdamW(model.parameters(), amsgrad=True), fast=True)
    with pytest.raises(ValueError, match="fast must be"):
        omitter.protect(torch.optim.AdamW(model.parameters()), fast="yes")
    assert omitter._masks == []
    opt = torch.optim.AdamW(model.parameters())
    omitter.protect(opt, fast=True)
    omitter.plan(0)
    step_grads(model, batch(0))
    opt.grad_scale = torch.ones(())  # what GradScaler sets on a fused optimizer
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()
