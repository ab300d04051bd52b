"""The gradient of a weight slice as a full-size gradient: the slice's rows / columns at their ids, zeros at
the omitted ones.

Neuron omission slices weights (``w.index_select(dim, kept)``); the backward of that slice has to hand autograd
a gradient of the whole weight. In plain torch that is ``grad.new_zeros(full).index_copy_(dim, kept, grad)``:
two passes over the output (a memset, then an ``index_copy_`` that runs at ~1.3 TB/s on an H100), ~28 µs for
a [5632, 2048] bf16 weight with half its rows kept.

``expand_slice`` writes every output element exactly once (no memset, no atomics), so its traffic is one
write of the full output plus one read of the slice. It walks the concatenated id list ``[kept..., dropped...]``
(length ``size``, a permutation of ``range(size)``): list position ``j < k`` copies slice row / column ``j``
to output row / column ``kept[j]``; position ``j >= k`` writes zeros at ``dropped[j - k]``. Since the list is a
permutation, each output row / column is written by exactly one list position, and the kernel never needs
``kept`` sorted.

Shapes: ``grad`` [k, n] (``dim=0``), [n, k] (``dim=1``) or [k] (1-D); ``kept`` [k] and ``dropped`` [size - k]
int64 (or int32) ids on ``grad``'s device; the result is a new contiguous tensor of ``grad``'s dtype with
``size`` entries along ``dim``.

Implementations:

* ``expand_slice_reference``: zeros + ``index_copy_`` (any device, any dtype; the oracle).
* ``expand_slice_triton``: one Triton kernel, grid (id-list blocks × blocks of the other dimension), tile
  [BLOCK_L list positions × BLOCK_N other]. For ``dim=0`` every list position is a whole contiguous row
  (loads and stores coalesced). For ``dim=1`` loads are contiguous along the list and stores go to the
  scattered output columns. A 1-D gradient runs as a [1, k] slice with ``dim=1``. CUDA, fp16 / bf16 / fp32;
  CPU tensors only under ``TRITON_INTERPRET=1`` with ``allow_interpreter`` (tests). The kernel is decorated
  on first use, keyed by the interpreter mode, so that importing this module never imports Triton and a test
  can set ``TRITON_INTERPRET`` first.

Measured on an H100 (bf16, TinyLlama-1.1B shapes at rate 0.5, ``benchmarks/gpu_expand_grad.py``; GPU µs,
kernel vs reference): gate/up [5632, 2048] dim 0 11.5 vs 29.6 (3.0 TB/s); down [2048, 5632] dim 1, random
columns 23.8 vs 29.1 (1.45 TB/s: half-sector scattered 2-byte stores); q [2048, 2048] dim 0 6.4 vs 14.7;
o [2048, 2048] dim 1, columns in runs of 512, 6.6 vs 14.7; k / v [256, 2048] 4.3 vs 8.0. Over the 22 layers
of a step: 1.50 vs 2.95 ms. The host pays ~50 µs per call (Triton's launch ~25 µs of it) against ~28 µs for
the reference's two torch ops.

For ``dim=1`` the alternative, a tile over output columns that gathers through an inverse map (``inv[c]`` =
list position of column ``c``, -1 if dropped), needs the map built per call: one more launch (4.4 µs of GPU,
~25 µs of host). Its best tiles took 18.9 µs on down (coalesced stores, but the extra launch) and 10.2 µs on
o (vs 6.6: gathered loads and the extra launch): about even on GPU time per layer, worse on host time and
one more kernel, so the list tile stayed.

``expand_slice`` picks the kernel where ``triton_supports`` says so, else the reference. No host sync in
either: the ids are never read on the host, only their shapes are checked.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from centrifuge.ops.triton_support import (
    TRITON_DTYPES,
    interpreting,
    jit_copies,
    next_pow2,
    on_triton_device,
    triton_available,
)

_ID_DTYPES = (torch.int64, torch.int32)


def _check(grad: torch.Tensor, dim: int, kept: torch.Tensor, dropped: torch.Tensor | None, size: int) -> int:
    """Shape / device / dtype checks (no device reads); returns ``dim`` made non-negative."""
    if grad.dim() == 0:
        raise ValueError("expand_slice needs a gradient with at least one dimension")
    if not -grad.dim() <= dim < grad.dim():
        raise ValueError(f"dim {dim} out of range for a gradient of shape {tuple(grad.shape)}")
    dim %= grad.dim()
    k = grad.shape[dim]
    if size < k:
        raise ValueError(f"size {size} is smaller than the slice's {k} entries along dim {dim}")
    for name, ids, n in (("kept", kept, k), ("dropped", dropped, size - k)):
        if ids is None:
            continue
        if ids.dim() != 1 or ids.numel() != n or ids.dtype not in _ID_DTYPES or ids.device != grad.device:
            raise ValueError(f"{name} must be a 1-D int64 / int32 tensor of {n} ids on {grad.device}, got "
                             f"{ids.dtype} {tuple(ids.shape)} on {ids.device}")
    return dim


def _out_shape(grad: torch.Tensor, dim: int, size: int) -> list[int]:
    shape = list(grad.shape)
    shape[dim] = size
    return shape


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def expand_slice_reference(grad: torch.Tensor, *, dim: int, kept: torch.Tensor, size: int) -> torch.Tensor:
    """Zeros of ``grad``'s shape with ``size`` entries along ``dim``, then ``index_copy_(dim, kept, grad)``.

    ``grad``: any shape with ``k`` entries along ``dim``; ``kept``: [k] distinct ids in ``range(size)``.
    Returns a new tensor; any device and dtype (the oracle of ``expand_slice_triton`` and its fallback)."""
    dim = _check(grad, dim, kept, None, size)
    return grad.new_zeros(_out_shape(grad, dim, size)).index_copy_(dim, kept.long(), grad)


# --------------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------------

tl: Any = None  # triton.language, bound in the kernel's own namespace by ``_kernels``


def _expand_slice_kernel(G, KEPT, DROPPED, OUT, K, SIZE, N, sg_l, sg_n, so_l, so_n,
                         BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (list blocks, other-dimension blocks). List position j < K: output line KEPT[j] = slice line j;
    # K <= j < SIZE: output line DROPPED[j - K] = 0. "line" = row (dim 0) or column (dim 1); the strides say
    # which: sg_l / so_l along the list dimension, sg_n / so_n along the other one.
    j = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_kept = j < K
    in_list = j < SIZE
    kid = tl.load(KEPT + j, mask=is_kept, other=0)
    did = tl.load(DROPPED + (j - K), mask=in_list & (j >= K), other=0)
    ids = tl.where(is_kept, kid, did).to(tl.int64)
    cin = c < N
    c64 = c.to(tl.int64)[None, :]
    # masked-off loads read nothing and yield 0.0: the dropped lines' zeros come from here (no memset pass)
    vals = tl.load(G + j.to(tl.int64)[:, None] * sg_l + c64 * sg_n, mask=is_kept[:, None] & cin[None, :],
                   other=0.0)
    tl.store(OUT + ids[:, None] * so_l + c64 * so_n, vals, mask=in_list[:, None] & cin[None, :])


_KERNEL_NAMES = ("_expand_slice_kernel",)


@functools.cache
def _kernels(interpret: bool) -> dict[str, Any]:
    """The jitted kernel, once per interpreter mode (``interpret`` keys the cache; see ``triton_support``)."""
    return {"expand": jit_copies(globals(), _KERNEL_NAMES)["_expand_slice_kernel"]}


def triton_supports(grad: torch.Tensor, *, allow_interpreter: bool = False) -> bool:
    """Whether ``expand_slice_triton`` can take ``grad``: CUDA (or CPU under ``TRITON_INTERPRET=1`` with
    ``allow_interpreter``), fp16 / bf16 / fp32, 1-D / 2-D, Triton importable."""
    on_device = on_triton_device(grad, allow_interpreter=allow_interpreter)
    return on_device and grad.dim() in (1, 2) and grad.dtype in TRITON_DTYPES and triton_available()


def _default_block(dim: int, size: int, n: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_N) for a [size along the list] × [n other] output, ~4096 elements per program."""
    if dim == 0:
        # rows are contiguous: wide row chunks (coalesced, 16-byte vectors), a few rows per program
        bn = min(next_pow2(n), 1024)
        bl = min(next_pow2(size), max(1, 4096 // bn))
    else:
        # columns: the list runs along the contiguous axis of grad (loads coalesced; stores scattered)
        bl = min(next_pow2(size), 128)
        bn = min(next_pow2(n), max(1, 4096 // bl))
    return bl, bn


def expand_slice_triton(grad: torch.Tensor, *, dim: int, kept: torch.Tensor, dropped: torch.Tensor, size: int,
                        block: tuple[int, int] | None = None, num_warps: int = 4) -> torch.Tensor:
    """``expand_slice`` as one Triton kernel (shapes there). ``block``: (BLOCK_L, BLOCK_N) powers of two, list
    positions × other dimension per program (default ``_default_block``). Raises where ``triton_supports``
    (with ``allow_interpreter``) says no."""
    dim = _check(grad, dim, kept, dropped, size)
    if not triton_supports(grad, allow_interpreter=True):
        raise ValueError(f"expand_slice_triton needs CUDA (or TRITON_INTERPRET=1), fp16/bf16/fp32, 1-D/2-D and "
                         f"Triton; got {grad.dtype} {tuple(grad.shape)} on {grad.device}")
    out = torch.empty(_out_shape(grad, dim, size), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    k = grad.shape[dim]
    if grad.dim() == 1:  # [k] as a [1, k] slice along dim 1: the list runs along the vector
        dim, n = 1, 1
        sg_l, sg_n, so_l, so_n = grad.stride(0), 0, 1, 0
    elif dim == 0:
        n = grad.shape[1]
        sg_l, sg_n, so_l, so_n = grad.stride(0), grad.stride(1), n, 1
    else:
        n = grad.shape[0]
        sg_l, sg_n, so_l, so_n = grad.stride(1), grad.stride(0), 1, size
    bl, bn = block if block is not None else _default_block(dim, size, n)
    # an empty ``dropped`` (k == size) is never read (no list position reaches it), but may have no storage:
    # hand the kernel ``kept`` in its place
    drop = dropped if dropped.numel() else kept
    grid = (-(-size // bl), -(-n // bn))
    _kernels(interpreting())["expand"][grid](grad, kept, drop, out, k, size, n, sg_l, sg_n, so_l,
                                              so_n, BLOCK_L=bl, BLOCK_N=bn, num_warps=num_warps)
    return out


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------


def expand_slice(grad: torch.Tensor, *, dim: int, kept: torch.Tensor, dropped: torch.Tensor, size: int,
                 allow_interpreter: bool = False) -> torch.Tensor:
    """The full-size gradient of a slice: ``out.index_select(dim, kept) == grad``, zeros at ``dropped``.

    Args:
        grad: [k, n] (``dim=0``), [n, k] (``dim=1``) or [k] (1-D, ``dim=0``), any strides.
        dim: the sliced dimension (negative counts from the end).
        kept: [k] int64 (or int32) distinct ids in ``range(size)``, on ``grad``'s device, in any order.
        dropped: [size - k] ids, the complement of ``kept`` (together a permutation of ``range(size)``; the
            kernel relies on this, it is not checked: that would read the ids on the host).
        size: the full length of ``dim``.
        allow_interpreter: CPU tensors take the Triton kernel when ``TRITON_INTERPRET=1`` (tests).

    Returns:
        A new contiguous tensor shaped like ``grad`` with ``size`` entries along ``dim``, ``grad``'s dtype.

    Triton (one pass, ``expand_slice_triton``) for CUDA fp16 / bf16 / fp32 1-D / 2-D gradients when Triton
    imports; everything else (CPU, float64, other ranks, no Triton) goes to ``expand_slice_reference``. An
    empty ``dropped`` (k == size) takes the kernel too: one pass, the same result as the reference (``grad``
    permuted by ``kept``, which need not be ``arange``)."""
    if triton_supports(grad, allow_interpreter=allow_interpreter):
        return expand_slice_triton(grad, dim=dim, kept=kept, dropped=dropped, size=size)
    _check(grad, dim, kept, dropped, size)
    return expand_slice_reference(grad, dim=dim, kept=kept, size=size)


__all__ = ["expand_slice", "expand_slice_reference", "expand_slice_triton", "triton_supports"]
