"""The compiled element-wise formulas stay usable past dynamo's recompile limit (eager fallback, one warning)."""

from __future__ import annotations

import warnings

import pytest
import torch

from centrifuge.ops.elementwise import _compiled


def _scale_shift(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w + 1.0


def test_past_the_recompile_limit_runs_eagerly():
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            _check_fallback()
    finally:
        torch._dynamo.reset()


def _check_fallback():
    f = _compiled(_scale_shift)
    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(5, 7, generator=gen), torch.randn(7, generator=gen)
    assert torch.allclose(f(x32, w32), _scale_shift(x32, w32))
    x64, w64 = x32.double(), w32.double()  # a new input kind: would need a second compilation
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        out = f(x64, w64)
    assert out.dtype == torch.float64 and torch.equal(out, _scale_shift(x64, w64))
    x3 = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)  # and another: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(f(x3, w64), _scale_shift(x3, w64))
