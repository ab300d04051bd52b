"""The element-wise formulas of ``centrifuge.ops.elementwise`` as hand-written Triton kernels (no autograd).

Why: the token-sparse step with neuron omission is host-bound on an H100 — the GPU finishes a layer's
shrunken GEMMs before Python has issued the next ones — and a ``torch.compile``-d call with dynamic shapes
costs 85 µs of host time (guards, symbolic sizes, AOT wrappers; ``benchmarks/gpu_call_overhead.py`` on an
H100 host), against 33–54 µs for a Triton call with its wrapper. The layer calls these 11 times per layer and
step (forward and hand-written backward), 242 calls for TinyLlama.

Each function follows its formula in ``ops.elementwise`` op for op, with the casts the formula has (a product
of two 16-bit floats is exact in fp32, so "multiply in fp32, round to bf16" is PyTorch's bf16 multiply):
``rms_norm``, ``rms_norm_backward`` (plus an optional gradient added to dx, which saves the residual add),
``swiglu``, ``swiglu_backward``, ``rope``, ``rope_backward``. Accumulation in fp32 (fp64 for fp64 inputs,
tests). In fp32 / fp64 they agree with the formulas to rounding; in bf16 on the GPU to a bf16 ulp or two
(reductions sum in another order — the weight gradient's row sum is per-program partials, then ``sum`` —,
``exp`` / ``rsqrt`` are the GPU's, and the compiler may keep a product in fp32 where eager PyTorch rounds it:
measured on RoPE, 1–2 ulps in ~24% of elements, as ``torch.compile``'s kernels differ too).

Shapes: rows first, features last and contiguous — x [R, d], gate / up [R, m], q [R, H, D], k [R, Hkv, D],
cos / sin [R, D]. ``supported(*tensors)`` says where the kernels apply (CUDA, or CPU under
``TRITON_INTERPRET=1`` for tests; fp16 / bf16 / fp32, fp64 in the interpreter); callers fall back to the
formulas elsewhere. Kernels are jitted on first use (``triton_support.jit_copies``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from centrifuge.ops.triton_support import (
    interpreting,
    jit_copies,
    next_pow2,
    tl_accumulator,
    tl_dtype,
    triton_available,
)

tl: Any = None  # triton.language, bound in the kernels' namespace by ``jit_copies``


def _sum_combine(a, b):
    return a + b


# Triton's tl.sum / tl.zeros are @jit functions decorated at Triton's import, so under TRITON_INTERPRET=1 set
# later (tests) they would not run in the interpreter: reductions go through tl.reduce with ``_sum_combine``,
# decorated with the kernels. ``ACC``: fp32 (fp64 for fp64 inputs); ``*_T``: the dtype a formula's product
# has in PyTorch (promotion of its operands), passed by the host.


def _rms_fwd(X, W, Y, d, eps, stride_x, stride_y, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < d
    h = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)  # HF: always in float32
    r = tl.rsqrt(tl.reduce(h * h, 0, _sum_combine) / d + eps)
    normed = (h * r).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=m, other=0.0)
    out_t = Y.dtype.element_ty
    # weight * normed in the output dtype (the product of two 16-bit floats is exact in fp32, so this is
    # PyTorch's 16-bit multiply; fp64 products in fp64)
    y = (normed.to(ACC) * w.to(ACC)).to(out_t)
    tl.store(Y + row * stride_y + cols, y, mask=m)


def _rms_bwd(G, X, W, ADD, DX, DWP, R, d, eps, rows_per_prog, stride_g, stride_x, stride_a, stride_dx,
             ACC: tl.constexpr, GW_T: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [pid·rows_per_prog, (pid+1)·rows_per_prog): dx per row, and this program's partial sum of the
    weight gradient (DWP [programs, d], ACC) — the host sums the partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m = cols < d
    x_t = X.dtype.element_ty
    w = tl.load(W + cols, mask=m, other=0.0)
    dw = tl.full([BLOCK_D], 0.0, ACC)
    for i in range(0, rows_per_prog):
        row = (pid * rows_per_prog + i).to(tl.int64)
        mr = m & ((cols * 0 + row) < R)  # (a tensor compare: the interpreter masks with tensors only)
        x = tl.load(X + row * stride_x + cols, mask=mr, other=0.0)
        g = tl.load(G + row * stride_g + cols, mask=mr, other=0.0)
        h = x.to(tl.float32)
        r = tl.rsqrt(tl.reduce(h * h, 0, _sum_combine) / d + eps)
        normed = (h * r).to(x_t)
        dw += g.to(ACC) * normed.to(ACC)
        dn = (g.to(ACC) * w.to(ACC)).to(GW_T).to(x_t).to(tl.float32)
        d_var = -0.5 * tl.reduce(dn * h, 0, _sum_combine) * r * r * r
        out = (dn * r + (d_var / d) * (2.0 * h)).to(x_t)
        if HAS_ADD:
            a = tl.load(ADD + row * stride_a + cols, mask=mr, other=0.0)
            out = (out.to(ACC) + a.to(ACC)).to(x_t)
        tl.store(DX + row * stride_dx + cols, out, mask=mr)
    tl.store(DWP + pid * d + cols, dw, mask=m)


def _swiglu_fwd(G, U, Y, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = G.dtype.element_ty
    g = tl.load(G + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=m, other=0.0).to(ACC)
    silu = (g / (1.0 + tl.exp(-g))).to(t)  # F.silu rounds to the input dtype
    tl.store(Y + offs, (silu.to(ACC) * u).to(t), mask=m)


def _swiglu_bwd(DY, G, U, DG, DU, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = G.dtype.element_ty
    dy = tl.load(DY + offs, mask=m, other=0.0).to(ACC)
    g = tl.load(G + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=m, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = (g / (1.0 + tl.exp(-g))).to(t)  # as the forward computes it
    dup = (dy * silu.to(ACC)).to(t)
    dsilu = (dy * u).to(t)
    dg = (dsilu.to(ACC) * s * (1.0 + g * (1.0 - s))).to(t)
    tl.store(DG + offs, dg, mask=m)
    tl.store(DU + offs, dup, mask=m)


def _rope_rows(X, Y, row, nh, stride_xr, stride_xh, stride_yr, stride_yh, c1, c2, s1, s2, half,
               ACC: tl.constexpr, BACKWARD: tl.constexpr, PROD_T: tl.constexpr, BLOCK_H: tl.constexpr,
               HALF: tl.constexpr):
    """One row's heads, x = [x1 | x2] (halves of the head dim):
    forward  (x·cos + rotate_half(x)·sin):  y1 = x1·c1 + (−x2)·s1,  y2 = x2·c2 + x1·s2;
    backward (its transpose):               y1 = x1·c1 + x2·s2,     y2 = x2·c2 + (−x1)·s1;
    each product rounded to PROD_T, then to Y's dtype, and the two summed in Y's dtype."""
    out_t = Y.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    m = (heads < nh) & (cols < half)
    base = X + row * stride_xr + heads * stride_xh + cols
    x1 = tl.load(base, mask=m, other=0.0).to(ACC)
    x2 = tl.load(base + half, mask=m, other=0.0).to(ACC)
    if BACKWARD:
        a1 = (x1 * c1).to(PROD_T).to(out_t)
        b1 = (x2 * s2).to(PROD_T).to(out_t)
        a2 = (x2 * c2).to(PROD_T).to(out_t)
        b2 = (-(x1 * s1)).to(PROD_T).to(out_t)
    else:
        a1 = (x1 * c1).to(out_t)
        b1 = (-(x2 * s1)).to(out_t)
        a2 = (x2 * c2).to(out_t)
        b2 = (x1 * s2).to(out_t)
    ybase = Y + row * stride_yr + heads * stride_yh + cols
    tl.store(ybase, (a1.to(ACC) + b1.to(ACC)).to(out_t), mask=m)
    tl.store(ybase + half, (a2.to(ACC) + b2.to(ACC)).to(out_t), mask=m)


def _rope(Q, K, QO, KO, COS, SIN, H, HKV, half, stride_qr, stride_qh, stride_kr, stride_kh, stride_qor,
          stride_qoh, stride_kor, stride_koh, stride_c, ACC: tl.constexpr, BACKWARD: tl.constexpr,
          QPROD_T: tl.constexpr, KPROD_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
          HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    mc = cols < half
    cbase = row * stride_c + cols
    c1 = tl.load(COS + cbase, mask=mc, other=0.0).to(ACC)
    c2 = tl.load(COS + cbase + half, mask=mc, other=0.0).to(ACC)
    s1 = tl.load(SIN + cbase, mask=mc, other=0.0).to(ACC)
    s2 = tl.load(SIN + cbase + half, mask=mc, other=0.0).to(ACC)
    _rope_rows(Q, QO, row, H, stride_qr, stride_qh, stride_qor, stride_qoh, c1, c2, s1, s2, half,
               ACC, BACKWARD, QPROD_T, BLOCK_H, HALF)
    _rope_rows(K, KO, row, HKV, stride_kr, stride_kh, stride_kor, stride_koh, c1, c2, s1, s2, half,
               ACC, BACKWARD, KPROD_T, BLOCK_HKV, HALF)


_KERNEL_NAMES = ("_sum_combine", "_rms_fwd", "_rms_bwd", "_swiglu_fwd", "_swiglu_bwd", "_rope_rows", "_rope")


@functools.cache
def _kernels_for(interpret: bool) -> dict[str, Any]:
    return jit_copies(globals(), _KERNEL_NAMES)


def _kernels() -> dict[str, Any]:
    return _kernels_for(interpreting())


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: all on one CUDA device (or CPU under ``TRITON_INTERPRET=1``),
    float16 / bfloat16 / float32 (float64 too in the interpreter), last dimension contiguous."""
    if not triton_available():
        return False
    first = tensors[0]
    interp = first.device.type == "cpu" and interpreting()
    if not (first.is_cuda or interp):
        return False
    dtypes = _DTYPES + ((torch.float64,) if interp else ())
    return all(t.device == first.device and t.dtype in dtypes and t.dim() >= 1 and t.stride(-1) == 1
               for t in tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., d] as a 2-D [R, d] view (a copy only if the rows cannot be viewed so)."""
    return t.reshape(-1, t.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``ops.elementwise.rms_norm``: x [..., d], weight [d] → [..., d] in promote(x, weight)."""
    x2 = _rows(x)
    R, d = x2.shape
    y = torch.empty(R, d, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if R:
        _kernels()["_rms_fwd"][(R,)](x2, weight, y, d, float(eps), x2.stride(0), y.stride(0),
                                     ACC=tl_accumulator(y.dtype), BLOCK_D=next_pow2(d))
    return y.view(x.shape)


def _programs(R: int) -> int:
    """Programs for a row reduction: enough to fill an H100 (132 SMs) a few times over, few partial rows."""
    return max(1, min(R, 528))


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                      add: torch.Tensor | None = None):
    """``ops.elementwise.rms_norm_backward``: (dx [like x] (+ ``add``, same shape and dtype as x), dweight
    [d] in grad's opmath dtype)."""
    g2, x2 = _rows(grad), _rows(x)
    R, d = x2.shape
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dx = torch.empty(R, d, dtype=x.dtype, device=x.device)
    if R == 0:
        return dx.view(x.shape), torch.zeros(d, dtype=acc, device=x.device)
    a2 = _rows(add) if add is not None else dx
    P = _programs(R)
    rows_per_prog = -(-R // P)
    P = -(-R // rows_per_prog)
    partial = torch.empty(P, d, dtype=acc, device=x.device)
    _kernels()["_rms_bwd"][(P,)](g2, x2, weight, a2, dx, partial, R, d, float(eps), rows_per_prog, g2.stride(0),
                                 x2.stride(0), a2.stride(0), dx.stride(0), ACC=tl_accumulator(grad.dtype),
                                 GW_T=tl_dtype(torch.promote_types(grad.dtype, weight.dtype)),
                                 HAS_ADD=add is not None, BLOCK_D=next_pow2(d))
    return dx.view(x.shape), partial.sum(0)


_BLOCK = 1024


def _flat(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``ops.elementwise.swiglu``: silu(gate) · up, same shapes and dtype (both given in one dtype)."""
    gate, up = _flat(gate, up)
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _kernels()["_swiglu_fwd"][(-(-n // _BLOCK),)](gate, up, y, n, ACC=tl_accumulator(gate.dtype), BLOCK=_BLOCK)
    return y


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """``ops.elementwise.swiglu_backward``: (dgate, dup), all of one shape and dtype."""
    grad, gate, up = _flat(grad, gate, up)
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _kernels()["_swiglu_bwd"][(-(-n // _BLOCK),)](grad, gate, up, dg, du, n, ACC=tl_accumulator(gate.dtype),
                                                      BLOCK=_BLOCK)
    return dg, du


def _rope_launch(q, k, cos, sin, q_out_dtype, k_out_dtype, q_prod, k_prod, backward: bool):
    R, H, D = q.shape
    Hkv = k.shape[1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    q, k = _flat(q, k)
    cos, sin = _flat(cos, sin)
    qo = torch.empty(R, H, D, dtype=q_out_dtype, device=q.device)
    ko = torch.empty(R, Hkv, D, dtype=k_out_dtype, device=k.device)
    if R:
        half = D // 2
        _kernels()["_rope"][(R,)](
            q, k, qo, ko, cos, sin, H, Hkv, half, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
            ACC=tl_accumulator(torch.promote_types(q.dtype, cos.dtype)), BACKWARD=backward,
            QPROD_T=tl_dtype(q_prod), KPROD_T=tl_dtype(k_prod), BLOCK_H=next_pow2(H), BLOCK_HKV=next_pow2(Hkv),
            HALF=next_pow2(half))
    return qo, ko


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``ops.elementwise.rope``: q [R, H, D], k [R, Hkv, D], cos / sin [R, D] → rotated q, k in
    promote(q / k, cos) (as ``q * cos`` is)."""
    qd, kd = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
    return _rope_launch(q, k, cos, sin, qd, kd, qd, kd, backward=False)


def rope_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_dtype: torch.dtype, k_dtype: torch.dtype):
    """``ops.elementwise.rope_backward``: each product in promote(grad, cos), cast to ``q_dtype`` /
    ``k_dtype``, summed there."""
    return _rope_launch(dq, dk, cos, sin, q_dtype, k_dtype, torch.promote_types(dq.dtype, cos.dtype),
                        torch.promote_types(dk.dtype, cos.dtype), backward=True)
