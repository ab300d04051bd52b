"""``expand_slice``: the full-size gradient of a weight slice, Triton kernel against zeros + ``index_copy_``.

Without CUDA the kernel runs under the Triton interpreter: the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` for the test only (the kernel is decorated at its first use in that mode); with CUDA
it runs compiled. Fresh output buffers are poisoned with NaN, so a kernel that leaves the dropped rows /
columns to a memset (or forgets any element) fails the exact comparison.
"""

from __future__ import annotations

import pytest
import torch

from centrifuge.ops import expand_grad as ops

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"
SIZE, OTHER, K = 37, 29, 13  # not multiples of any block size


@pytest.fixture(autouse=True)
def _poisoned(poison_buffers):
    poison_buffers(ops)


def split_ids(pattern: str, size: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [k], dropped [size - k]) int64 on DEVICE: a partition of range(size)."""
    if pattern == "blocks":  # contiguous runs, as heads omitted in groups give
        run = max(1, k // 3)
        mask = torch.zeros(size, dtype=torch.bool)
        starts = [0, size // 2, size - run]
        for s in starts:
            mask[s:s + run] = True
        mask[torch.nonzero(~mask)[: k - int(mask.sum())]] = True  # top up to exactly k
        kept, dropped = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    else:
        perm = torch.randperm(size, generator=gen)
        kept, dropped = perm[:k], perm[k:]
        if pattern == "sorted":
            kept, dropped = kept.sort().values, dropped.sort().values
    assert kept.numel() == k and torch.equal(torch.cat([kept, dropped]).sort().values, torch.arange(size))
    return kept.to(DEVICE), dropped.to(DEVICE)


def slice_grad(dim: int, k: int, dtype: torch.dtype, gen: torch.Generator, one_d: bool = False) -> torch.Tensor:
    """Random non-zero values (|x| >= 0.5), so that a zero in the output can only come from a dropped id."""
    shape = (k,) if one_d else (k, OTHER) if dim == 0 else (OTHER, k)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = torch.where(x >= 0, x + 0.5, x - 0.5)
    return x.to(dtype).to(DEVICE)


def check(out: torch.Tensor, grad: torch.Tensor, dim: int, kept: torch.Tensor, dropped: torch.Tensor):
    ref = ops.expand_slice_reference(grad, dim=dim, kept=kept, size=kept.numel() + dropped.numel())
    assert out.shape == ref.shape and out.dtype == grad.dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(out.index_select(dim, kept), grad)
    if dropped.numel():
        assert (out.index_select(dim, dropped) == 0).all()


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["sorted", "unsorted", "blocks"])
@pytest.mark.parametrize("dim,block", [(0, None), (0, (8, 16)), (1, None), (1, (16, 8)), (-1, (4, 32))])
def test_triton_equals_the_reference(interpret, dim, block, pattern, dtype):
    gen = torch.Generator().manual_seed(hash((dim, pattern)) % 1000)
    kept, dropped = split_ids(pattern, SIZE, K, gen)
    grad = slice_grad(dim % 2, K, dtype, gen)
    out = ops.expand_slice_triton(grad, dim=dim, kept=kept, dropped=dropped, size=SIZE, block=block)
    check(out, grad, dim % 2, kept, dropped)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [None, (8, 1)])
def test_bias(interpret, block, dtype):
    gen = torch.Generator().manual_seed(3)
    kept, dropped = split_ids("unsorted", SIZE, K, gen)
    grad = slice_grad(0, K, dtype, gen, one_d=True)
    out = ops.expand_slice(grad, dim=0, kept=kept, dropped=dropped, size=SIZE, allow_interpreter=True)
    check(out, grad, 0, kept, dropped)
    out = ops.expand_slice_triton(grad, dim=-1, kept=kept, dropped=dropped, size=SIZE, block=block)
    check(out, grad, 0, kept, dropped)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("k", [1, SIZE], ids=["k=1", "k=size"])
def test_extreme_kept_counts(interpret, dim, k):
    gen = torch.Generator().manual_seed(k)
    kept, dropped = split_ids("unsorted", SIZE, k, gen)  # k = size: an unsorted permutation, dropped empty
    grad = slice_grad(dim, k, torch.float32, gen)
    out = ops.expand_slice(grad, dim=dim, kept=kept, dropped=dropped, size=SIZE, allow_interpreter=True)
    check(out, grad, dim, kept, dropped)
    out = ops.expand_slice_triton(grad, dim=dim, kept=kept, dropped=dropped, size=SIZE, block=(8, 8))
    check(out, grad, dim, kept, dropped)


@pytest.mark.parametrize("dim", [0, 1])
def test_strided_grad_and_int32_ids(interpret, dim):
    gen = torch.Generator().manual_seed(11)
    kept, dropped = split_ids("unsorted", SIZE, K, gen)
    grad = slice_grad(1 - dim, K, torch.float32, gen).t()  # a transposed (non-contiguous) slice
    assert not grad.is_contiguous()
    out = ops.expand_slice_triton(grad, dim=dim, kept=kept.int(), dropped=dropped.int(), size=SIZE, block=(8, 8))
    check(out, grad, dim, kept, dropped)


def test_float64_and_cpu_without_interpreter_take_the_reference(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(ops, "expand_slice_triton", no_kernel)
    gen = torch.Generator().manual_seed(5)
    kept, dropped = split_ids("unsorted", SIZE, K, gen)
    for dim in (0, 1):
        grad = slice_grad(dim, K, torch.float64, gen)
        check(ops.expand_slice(grad, dim=dim, kept=kept, dropped=dropped, size=SIZE, allow_interpreter=True), grad,
              dim, kept, dropped)
    # a 3-D gradient: the reference handles any rank
    grad = torch.randn(2, K, 3, generator=gen).to(DEVICE)
    out = ops.expand_slice(grad, dim=1, kept=kept, dropped=dropped, size=SIZE)
    assert torch.equal(out, ops.expand_slice_reference(grad, dim=1, kept=kept, size=SIZE))
    if not _CUDA:  # a CPU fp32 tensor without allow_interpreter
        grad = slice_grad(0, K, torch.float32, gen)
        check(ops.expand_slice(grad, dim=0, kept=kept, dropped=dropped, size=SIZE), grad, 0, kept, dropped)


def test_bad_arguments_raise():
    kept, dropped = torch.arange(K), torch.arange(K, SIZE)
    grad = torch.zeros(K, OTHER)
    bad = [
        dict(dim=2, kept=kept, dropped=dropped, size=SIZE),
        dict(dim=0, kept=kept[1:], dropped=dropped, size=SIZE),
        dict(dim=0, kept=kept, dropped=dropped[1:], size=SIZE),
        dict(dim=0, kept=kept.float(), dropped=dropped, size=SIZE),
        dict(dim=0, kept=kept[:, None], dropped=dropped, size=SIZE),
        dict(dim=0, kept=kept, dropped=dropped, size=K - 1),
        dict(dim=1, kept=kept, dropped=dropped, size=SIZE),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            ops.expand_slice(grad, **kwargs)
    with pytest.raises(ValueError):
        ops.expand_slice_triton(grad.double(), dim=0, kept=kept, dropped=dropped, size=SIZE)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape,dim,groups", [
    ((5632, 2048), 0, None), ((2048, 5632), 1, None), ((2048, 2048), 0, 512), ((2048, 2048), 1, 512),
    ((256, 2048), 0, 64), ((5632,), 0, None),
])
def test_tinyllama_shapes_bf16_on_cuda(shape, dim, groups):
    gen = torch.Generator().manual_seed(0)
    size = shape[dim]
    if groups is None:
        kept = torch.randperm(size, generator=gen)[: size // 2].sort().values
    else:
        kept = torch.cat([torch.arange(g * groups, (g + 1) * groups) for g in (1, 3)])
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    kept, dropped = kept.cuda(), mask.nonzero().squeeze(1).cuda()
    slice_shape = list(shape)
    slice_shape[dim] = kept.numel()
    grad = torch.randn(slice_shape, generator=gen).to("cuda", torch.bfloat16)
    assert ops.triton_supports(grad)
    out = ops.expand_slice(grad, dim=dim, kept=kept, dropped=dropped, size=size)
    assert torch.equal(out, grad.new_zeros(shape).index_copy_(dim, kept, grad))
