"""What the Triton ops share: availability, the interpreter switch, and jitting plain functions late.

Each op module writes its kernels as plain Python functions (``tl`` unbound) and asks ``jit_copies`` for
``triton.jit`` copies on first use, cached per interpreter mode: importing an op never imports Triton, and a
test can set ``TRITON_INTERPRET=1`` before the first kernel runs (CPU tensors then go through Triton's
interpreter).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Sequence
from typing import Any

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read at each call: tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def on_triton_device(t: torch.Tensor, *, allow_interpreter: bool = False) -> bool:
    """Whether a kernel can take ``t`` where it lives: CUDA, or CPU under ``TRITON_INTERPRET=1`` when the
    caller allows the interpreter (tests)."""
    return t.is_cuda or (allow_interpreter and t.device.type == "cpu" and interpreting())


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1): Triton block sizes."""
    return 1 << max(0, (int(n) - 1).bit_length())


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype of a torch float dtype (for constexpr arguments)."""
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def tl_accumulator(dtype: torch.dtype):
    """Where kernels accumulate for inputs of ``dtype``: float64 for float64 (exactness tests), else float32."""
    return tl_dtype(torch.float64 if dtype == torch.float64 else torch.float32)


def jit_copies(module_globals: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``triton.jit`` copies of the plain functions ``names`` of a module (its ``globals()``), made with globals
    in which ``tl`` / ``triton`` and each other's jitted copies resolve (so kernels can call helpers).
    Callers cache the result per ``interpreting()`` value."""
    import triton
    import triton.language as tl

    ns = dict(module_globals)
    ns["tl"], ns["triton"] = tl, triton
    for name in names:
        raw = module_globals[name]
        fn = types.FunctionType(raw.__code__, ns, name, raw.__defaults__, raw.__closure__)
        fn.__qualname__, fn.__module__, fn.__annotations__ = raw.__qualname__, raw.__module__, raw.__annotations__
        ns[name] = triton.jit(fn)
    return {name: ns[name] for name in names}
