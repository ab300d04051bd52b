"""``ops.elementwise_triton``: the Triton kernels against the formulas of ``ops.elementwise`` they replace.

Without CUDA the kernels run under the Triton interpreter (the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` for the test; kernels are decorated at their first use in that mode). The interpreter
rounds float32 → bfloat16 by truncation, so its exactness checks use float32 / float64 (where the kernels
follow the formulas' precisions op by op: rounding-level differences only); bfloat16 is checked for rounding
on the GPU, where the conversion rounds to nearest. Fresh output buffers are poisoned with NaN: a kernel that
misses an element fails. Odd sizes (not powers of two), GQA head counts, empty inputs, mixed dtypes (bf16
activations with fp32 weights / tables, as under autocast).
"""

from __future__ import annotations

import pytest
import torch

from centrifuge.ops import elementwise as formulas
from centrifuge.ops import elementwise_triton as kernels

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
R, D_MODEL, M, H, HKV, HEAD = 37, 48, 70, 6, 2, 16


@pytest.fixture(autouse=True)
def _poisoned(poison_buffers):
    poison_buffers(kernels)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _close(got, want, dtype):
    """fp64: 1e-6 relative (the RMS statistic is float32 in the formulas, as in HF); fp32: a few roundings."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    rtol, atol = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-5, 1e-5)}[want.dtype if want.dtype in (
        torch.float64, torch.float32) else torch.float32]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


EXACT_DTYPES = [torch.float32, torch.float64] if not _CUDA else [torch.float32]


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("with_add", [False, True])
def test_rms_norm_and_backward(interpret, dtype, with_add):
    x, w = _rand(R, D_MODEL, dtype=dtype, seed=0), _rand(D_MODEL, dtype=dtype, seed=1)
    g = _rand(R, D_MODEL, dtype=dtype, seed=2)
    add = _rand(R, D_MODEL, dtype=dtype, seed=3) if with_add else None
    _close(kernels.rms_norm(x, w, 1e-5), formulas.rms_norm(x, w, 1e-5), dtype)
    dx, dw = kernels.rms_norm_backward(g, x, w, 1e-5, add)
    rdx, rdw = formulas.rms_norm_backward(g, x, w, 1e-5, add)
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype)


@pytest.mark.parametrize("rows", [1, 600])  # one program; several rows per program with a ragged last one
def test_rms_backward_row_partition(interpret, rows):
    x, w = _rand(rows, 24, dtype=torch.float32, seed=4), _rand(24, dtype=torch.float32, seed=5)
    g = _rand(rows, 24, dtype=torch.float32, seed=6)
    dx, dw = kernels.rms_norm_backward(g, x, w, 1e-6)
    rdx, rdw = formulas.rms_norm_backward(g, x, w, 1e-6)
    _close(dx, rdx, torch.float32)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_swiglu_and_backward(interpret, dtype):
    gate, up, grad = (_rand(R, M, dtype=dtype, seed=s) for s in (7, 8, 9))
    _close(kernels.swiglu(gate, up), formulas.swiglu(gate, up), dtype)
    for got, want in zip(kernels.swiglu_backward(grad, gate, up), formulas.swiglu_backward(grad, gate, up),
                         strict=True):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_rope_and_backward(interpret, dtype):
    q, k = _rand(R, H, HEAD, dtype=dtype, seed=10), _rand(R, HKV, HEAD, dtype=dtype, seed=11)
    cos, sin = _rand(R, HEAD, dtype=dtype, seed=12), _rand(R, HEAD, dtype=dtype, seed=13)
    for got, want in zip(kernels.rope(q, k, cos, sin), formulas.rope(q, k, cos, sin), strict=True):
        _close(got, want, dtype)
    for got, want in zip(kernels.rope_backward(q, k, cos, sin, dtype, dtype),
                         formulas.rope_backward(q, k, cos, sin, dtype, dtype), strict=True):
        _close(got, want, dtype)


def test_mixed_dtypes_follow_promotion(interpret):
    """bf16 activations with fp32 weight / rotary tables (autocast with fp32 master weights): outputs in the
    promoted dtype, as the formulas give; rope_backward casts to the requested dtypes."""
    x, w = _rand(R, D_MODEL, dtype=torch.bfloat16, seed=14), _rand(D_MODEL, dtype=torch.float32, seed=15)
    got, want = kernels.rms_norm(x, w, 1e-5), formulas.rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # (interpreter bf16 rounding: truncation)
    q, k = _rand(R, H, HEAD, dtype=torch.bfloat16, seed=16), _rand(R, HKV, HEAD, dtype=torch.bfloat16, seed=17)
    cos, sin = _rand(R, HEAD, dtype=torch.float32, seed=18), _rand(R, HEAD, dtype=torch.float32, seed=19)
    for got, want in zip(kernels.rope(q, k, cos, sin), formulas.rope(q, k, cos, sin), strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want)  # products of bf16 and fp32 in fp32: exact agreement
    dq, dk = (t.float() for t in (q, k))
    for got, want in zip(kernels.rope_backward(dq, dk, cos, sin, torch.bfloat16, torch.bfloat16),
                         formulas.rope_backward(dq, dk, cos, sin, torch.bfloat16, torch.bfloat16), strict=True):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_empty_inputs(interpret):
    x, w = _rand(0, D_MODEL, dtype=torch.float32, seed=20), _rand(D_MODEL, dtype=torch.float32, seed=21)
    assert kernels.rms_norm(x, w, 1e-5).shape == (0, D_MODEL)
    dx, dw = kernels.rms_norm_backward(x, x, w, 1e-5)
    assert dx.shape == (0, D_MODEL) and torch.equal(dw, torch.zeros_like(dw))
    assert kernels.swiglu(x, x).shape == (0, D_MODEL)
    q, k = _rand(0, H, HEAD, dtype=torch.float32, seed=22), _rand(0, HKV, HEAD, dtype=torch.float32, seed=23)
    assert [t.shape for t in kernels.rope(q, k, q[:, 0], q[:, 0])] == [(0, H, HEAD), (0, HKV, HEAD)]


def test_dispatch_uses_kernels_only_without_autograd(interpret, monkeypatch):
    """``ELEMENTWISE["compiled"]`` runs a kernel when nothing records autograd, and the compiled formula
    (which has a backward) when an input requires grad under grad mode, or when dtypes differ."""
    calls = []
    monkeypatch.setattr(kernels, "swiglu", lambda *a: calls.append("triton") or formulas.swiglu(*a))
    monkeypatch.setattr(formulas, "_compiled", lambda f: (lambda *a: calls.append("compiled") or f(*a)))
    formulas._fused.cache_clear()
    try:
        ops = formulas.ELEMENTWISE["compiled"]
        gate, up = _rand(5, 8, dtype=torch.float32, seed=24), _rand(5, 8, dtype=torch.float32, seed=25)
        with torch.no_grad():
            ops.fn(formulas.swiglu)(gate, up)
        ops.fn(formulas.swiglu)(gate, up)  # grad mode on, but nothing requires grad
        ops.fn(formulas.swiglu)(gate.requires_grad_(True), up)
        ops.fn(formulas.swiglu)(gate.detach().double(), up)  # mixed dtypes (autocast): torch.compile
        assert calls == ["triton", "triton", "compiled", "compiled"]
    finally:
        formulas._fused.cache_clear()


@pytest.mark.skipif(not _CUDA, reason="bf16 rounding to nearest needs the GPU")
@pytest.mark.parametrize("shape", [(2047, 2048), (33, 100)])
def test_bf16_on_gpu_rounds_like_the_formulas(shape):
    """bf16 on the GPU: the kernels agree with the formulas to a bf16 ulp or two (reduction order, exp /
    rsqrt implementations, intermediate roundings the compiler may skip)."""
    rows, d = shape
    dt = torch.bfloat16
    x, w, g, add = (_rand(rows, d, dtype=dt, seed=s) for s in (30, 31, 32, 33))
    w = w[0]
    q = x[:, : (d // 64) * 64].reshape(rows, -1, 64)
    k = q[:, :1].contiguous()
    cos, sin = g[:, :64].contiguous(), add[:, :64].contiguous()
    pairs = [
        (kernels.rms_norm(x, w, 1e-5), formulas.rms_norm(x, w, 1e-5)),
        *zip(kernels.rms_norm_backward(g, x, w, 1e-5, add), formulas.rms_norm_backward(g, x, w, 1e-5, add),
             strict=True),
        (kernels.swiglu(x, g), formulas.swiglu(x, g)),
        *zip(kernels.swiglu_backward(add, x, g), formulas.swiglu_backward(add, x, g), strict=True),
        *zip(kernels.rope(q, k, cos, sin), formulas.rope(q, k, cos, sin), strict=True),
        *zip(kernels.rope_backward(q, k, cos, sin, dt, dt), formulas.rope_backward(q, k, cos, sin, dt, dt),
             strict=True),
    ]
    for i, (got, want) in enumerate(pairs):
        assert got.dtype == want.dtype and got.shape == want.shape, i
        assert torch.isfinite(got).all(), i
        if got.dtype == torch.float32:  # the weight gradient: fp32 sums over the rows, in another order
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=f"pair {i}")
            continue
        # a bf16 ulp or two: like torch.compile's kernels, Triton may keep a product in fp32 where eager
        # PyTorch rounds it to bf16 before the sum (RoPE: 24% of elements differ by 1–2 ulps on an H100)
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=3e-2, msg=f"pair {i}")
