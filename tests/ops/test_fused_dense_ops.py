"""The dense route's autograd wrappers of our Triton RMSNorm / SwiGLU kernels against autograd through the
formulas (float64, Triton interpreter on the CPU; odd sizes)."""

from __future__ import annotations

import torch

from centrifuge.ops.elementwise import rms_norm, swiglu
from centrifuge.ops.liger import _RMSNormFn, _SwiGLUFn


def test_rms_norm_and_swiglu_functions_match_the_formulas(interpret):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 37, dtype=torch.float64, generator=gen)
    w = torch.randn(37, dtype=torch.float64, generator=gen)
    gate, up = (torch.randn(3, 41, dtype=torch.float64, generator=gen) for _ in range(2))
    # RMSNorm normalizes in float32 whatever the input dtype (HF's LlamaRMSNorm), in another summation order
    for fn, ref, inputs, extra, tol in ((_RMSNormFn.apply, rms_norm, (x, w), (1e-6,), 1e-5),
                                        (_SwiGLUFn.apply, swiglu, (gate, up), (), 1e-12)):
        a = [t.clone().requires_grad_(True) for t in inputs]
        b = [t.clone().requires_grad_(True) for t in inputs]
        out_a, out_b = fn(*a, *extra), ref(*b, *extra)
        dy = torch.randn(out_b.shape, dtype=torch.float64, generator=gen)
        out_a.backward(dy)
        out_b.backward(dy)
        torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta.grad, tb.grad, rtol=tol, atol=tol)
