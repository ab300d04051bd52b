"""The Triton kept-token attention backend equals the math reference.

On a machine without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here
before Triton is imported) on CPU tensors in float64 / float32 with 16-wide tiles; with CUDA the same tests
run compiled on the GPU in float32 (full-precision dots), and the ``gpu`` tests below check bf16 / fp16 at
realistic shapes. Outputs are poisoned with NaN before every run, so rows a kernel forgets fail.
"""

from __future__ import annotations

import pytest
import torch

_CUDA = torch.cuda.is_available()

triton = pytest.importorskip("triton")

import centrifuge  # noqa: E402
from centrifuge.models.presets import build_model  # noqa: E402
from centrifuge.ops import attention_triton  # noqa: E402
from centrifuge.ops.attention import MathAttention, choose_backend  # noqa: E402
from centrifuge.ops.attention_triton import TritonKeptAttention  # noqa: E402
from centrifuge.tokens.layout import TokenLayout  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
SMALL = {d: {k: (16, 16, 4, 1) for k in ("fwd", "dq", "dkdv", "dqf", "kk")} for d in (16, 32, 64, 128)}
MIXED = {d: {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dqf": (16, 32, 4, 1),
             "kk": (32, 16, 4, 1)} for d in (16, 32, 64, 128)}
DTYPES = [torch.float32] if _CUDA else [torch.float64, torch.float32]
# On a GPU, Triton's float32 dot products run in TF32 (relative error ~3e-4); the interpreter is exact fp32.
TOL = {torch.float64: 1e-10, torch.float32: 1e-3 if _CUDA else 2e-5}
MATH = MathAttention()


@pytest.fixture(autouse=True)
def _interpreted(interpret):
    """Every test here runs its kernels under Triton's interpreter without CUDA, for that test only (set at
    import, the variable leaked into every test collected before this module's teardown)."""


@pytest.fixture(autouse=True)
def _poisoned(poison_buffers):
    poison_buffers(attention_triton)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values (unwritten rows?)"
    # floor: some gradients vanish exactly (window 1: dS = 0), where a pure ratio measures rounding noise
    denom = max(ref.double().norm().item(), 1e-3 * ref.numel() ** 0.5)
    return (got.double() - ref.double()).norm().item() / denom


def make_layout(kind: str, B: int, T: int, gen: torch.Generator, window: int | None = None) -> TokenLayout:
    """plain causal rows, packed documents (position_ids restarts), or left/right padding."""
    if kind == "plain":
        return TokenLayout.build(batch=B, seqlen=T, device=DEVICE, sliding_window=window)
    if kind == "packed":
        pos = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            cuts = sorted(torch.randperm(T - 1, generator=gen)[:3].add(1).tolist())
            start = 0
            for c in [*cuts, T]:
                pos[b, start:c] = torch.arange(c - start)
                start = c
        return TokenLayout.build(batch=B, seqlen=T, device=DEVICE, position_ids=pos.to(DEVICE),
                                 sliding_window=window)
    if kind == "padded":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :5] = 0  # left padding
        if B > 1:
            mask[1, T - 3:] = 0  # right padding
        return TokenLayout.build(batch=B, seqlen=T, device=DEVICE, attention_mask=mask.to(DEVICE),
                                 sliding_window=window)
    raise ValueError(kind)


def make_keep(kind: str, layout: TokenLayout, gen: torch.Generator) -> torch.Tensor:
    N = layout.num_rows
    valid = layout.valid.cpu()
    if kind == "empty":
        mask = torch.zeros(N, dtype=torch.bool)
    elif kind == "full":
        mask = valid.clone()
    elif kind == "contiguous":
        mask = torch.zeros(N, dtype=torch.bool)
        mask[N // 5: N // 5 + 19] = True
        mask &= valid
    elif kind == "scattered":
        mask = (torch.rand(N, generator=gen) < 0.4) & valid
    else:
        raise ValueError(kind)
    return torch.nonzero(mask).flatten().to(DEVICE)


def inputs(N: int, H: int, Hkv: int, D: int, dtype: torch.dtype, gen: torch.Generator):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return r(N, H, D), r(N, Hkv, D), r(N, Hkv, D)


# ------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_kind,window,H,Hkv,D", [
    ("plain", None, 4, 2, 16),
    ("packed", None, 2, 1, 32),
    ("padded", None, 2, 2, 16),
    ("plain", 7, 4, 1, 16),
])
def test_forward_matches_math(dtype, layout_kind, window, H, Hkv, D):
    gen = torch.Generator().manual_seed(11)
    B, T = 2, 37
    layout = make_layout(layout_kind, B, T, gen, window)
    q, k, v = inputs(B * T, H, Hkv, D, dtype, gen)
    scale = D ** -0.5
    for configs in (SMALL, MIXED):
        o, lse = TritonKeptAttention(configs).forward(q, k, v, layout, scale)
        o_ref, lse_ref = MATH.forward(q, k, v, layout, scale)
        assert lse.shape == (B * T, H)
        assert rel(o, o_ref) < TOL[dtype]
        assert rel(lse, lse_ref) < TOL[dtype]


# ------------------------------------------------------------------------------------------------------
# Backward on kept rows
# ------------------------------------------------------------------------------------------------------


def check_backward(layout, keep, H, Hkv, D, dtype, gen, configs, compact: bool):
    N = layout.num_rows
    q, k, v = inputs(N, H, Hkv, D, dtype, gen)
    scale = D ** -0.5
    o, lse = MATH.forward(q, k, v, layout, scale)
    M = keep.numel()
    do = torch.randn(M, H, D, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    if compact:
        qq, oo, ll = q[keep], o[keep], lse[keep]
    else:
        qq, oo, ll = q, o, lse
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o, aux=lse, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for split in (True, False):  # the split backward (no window) and the version-1 recompute one
        tri = TritonKeptAttention(configs)
        tri.split_backward = split
        got = tri.backward_kept(
            do, q=qq, k=k, v=v, o=oo, aux=ll, keep=keep, layout=layout, scale=scale, queries_compact=compact)
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            assert g.shape == r.shape, (name, g.shape, r.shape)
            assert g.dtype == dtype
            if M:
                err = rel(g, r)
                assert err < TOL[dtype], (split, name, err)
        if layout.sliding_window is not None:
            break  # a window always takes the recompute kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_kind", ["empty", "full", "contiguous", "scattered"])
def test_backward_keep_sets(dtype, keep_kind):
    gen = torch.Generator().manual_seed(5)
    layout = make_layout("plain", 2, 37, gen)  # 37: not a multiple of any tile
    keep = make_keep(keep_kind, layout, gen)
    for configs in (SMALL, MIXED):
        check_backward(layout, keep, 4, 2, 16, dtype, gen, configs, compact=True)


@pytest.mark.parametrize("H,Hkv,D", [(4, 1, 16), (3, 3, 32), (4, 2, 64)])
@pytest.mark.parametrize("layout_kind", ["packed", "padded"])
def test_backward_gqa_packed_padded(H, Hkv, D, layout_kind):
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(7)
    layout = make_layout(layout_kind, 2, 29, gen)
    keep = make_keep("scattered", layout, gen)
    check_backward(layout, keep, H, Hkv, D, dtype, gen, MIXED, compact=False)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_backward_sliding_window(window):
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(9)
    layout = make_layout("packed", 2, 41, gen, window)
    keep = make_keep("scattered", layout, gen)
    check_backward(layout, keep, 2, 1, 16, dtype, gen, SMALL, compact=True)
    check_backward(layout, keep, 2, 1, 16, dtype, gen, MIXED, compact=False)


def test_backward_long_rows_multiple_tiles():
    """A row long enough for many kept blocks on both sides, several segments and heads."""
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(3)
    layout = make_layout("packed", 1, 150, gen)
    keep = make_keep("scattered", layout, gen)
    check_backward(layout, keep, 2, 1, 16, dtype, gen, MIXED, compact=True)
    # kept x kept tiles wide enough for the untransposed dQ product (BLOCK_M >= 64), as on the GPU
    wide = {16: {"dqf": (32, 16, 4, 1), "kk": (64, 64, 4, 1)}}
    check_backward(layout, keep, 2, 1, 16, dtype, gen, wide, compact=True)


def test_filtered_rows():
    gen = torch.Generator().manual_seed(1)
    for N, p in ((1, 0.0), (1, 1.0), (37, 0.3), (64, 0.0), (64, 1.0), (200, 0.7)):
        mask = torch.rand(N, generator=gen) < p
        keep = torch.nonzero(mask).flatten().to(DEVICE)
        got = attention_triton.filtered_rows(keep.to(torch.int32), N)
        assert torch.equal(got.cpu(), torch.nonzero(~mask).flatten().to(torch.int32))


def _plain_causal_by_value(layout) -> bool:
    rows = torch.arange(layout.batch + 1, device=layout.cu_seqlens.device) * layout.seqlen
    return (layout.contiguous and layout.sliding_window is None
            and layout.cu_seqlens.numel() == layout.batch + 1 and bool(torch.equal(layout.cu_seqlens, rows)))


def test_plain_causal_rows_without_sync():
    """The sync-free test (segment count) agrees with comparing cu_seqlens to [0, T, 2T, ...]."""
    gen = torch.Generator().manual_seed(8)
    layouts = [make_layout(kind, B, T, gen, w) for kind in ("plain", "packed", "padded")
               for B, T in ((1, 1), (2, 1), (1, 9), (3, 17)) for w in (None, 4) if not (kind == "padded" and T < 8)]
    one_pad = TokenLayout.build(batch=2, seqlen=1, device=DEVICE, attention_mask=torch.tensor([[1], [0]]).to(DEVICE))
    all_pad = TokenLayout.build(batch=1, seqlen=3, device=DEVICE, attention_mask=torch.zeros(1, 3).long().to(DEVICE))
    for layout in [*layouts, one_pad, all_pad]:
        assert attention_triton.plain_causal_rows(layout) == _plain_causal_by_value(layout)
    assert any(attention_triton.plain_causal_rows(x) for x in layouts)
    assert not all(attention_triton.plain_causal_rows(x) for x in layouts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_through_sdpa_kernel_plumbing(dtype):
    """The SDPA-forward path (here PyTorch's CPU flash kernel through the same code as cuDNN / flash on the
    GPU): o and lse equal the math backend and our Triton forward's, and the backward on them is right."""
    if _CUDA:
        pytest.skip("the CPU flash kernel needs CPU tensors; the gpu tests check cudnn / flash")
    gen = torch.Generator().manual_seed(12)
    B, T, H, Hkv, D = 2, 37, 4, 2, 16
    layout = make_layout("plain", B, T, gen)
    q, k, v = inputs(B * T, H, Hkv, D, dtype, gen)
    scale = D ** -0.5
    tri = TritonKeptAttention(SMALL, sdpa_forward="flash_cpu")
    o, lse = tri.forward(q, k, v, layout, scale)
    assert tri.last_forward == "flash_cpu", attention_triton.sdpa_forward_status()
    own = TritonKeptAttention(SMALL, sdpa_forward="off")
    o_t, lse_t = own.forward(q, k, v, layout, scale)
    assert own.last_forward == "triton"
    o_ref, lse_ref = MATH.forward(q, k, v, layout, scale)
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape == (B * T, H)
    assert o.dtype == dtype and lse.dtype == lse_ref.dtype
    assert rel(o, o_ref) < TOL[dtype] and rel(lse, lse_ref) < TOL[dtype] and rel(lse, lse_t) < TOL[dtype]
    keep = make_keep("scattered", layout, gen)
    do = torch.randn(keep.numel(), H, D, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                            scale=scale, queries_compact=True)
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o_ref, aux=lse_ref, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert rel(g, r) < TOL[dtype], name
    # layouts that are not plain causal rows take the Triton forward
    packed = make_layout("packed", B, T, gen)
    o_p, _ = tri.forward(q, k, v, packed, scale)
    assert tri.last_forward == "triton"
    assert rel(o_p, MATH.forward(q, k, v, packed, scale)[0]) < TOL[dtype]
    with pytest.raises(ValueError):
        TritonKeptAttention(sdpa_forward="cudnn-ish")


# ------------------------------------------------------------------------------------------------------
# Hybrid backward (one plain causal row): kept × kept pairs through a dense causal backward, given the full
# forward's o and lse, + ``_dqf`` for kept queries × filtered keys. On the CPU the dense backward is PyTorch's
# CPU flash kernel ("flash_cpu", same contract as cuDNN's) and ``_dqf`` runs in the interpreter.
# ------------------------------------------------------------------------------------------------------


def _hybrid_keep(kind: str, layout, gen) -> torch.Tensor:
    if kind == "odd":  # first and last rows, a pair of neighbours: odd count, tile edges
        N = layout.num_rows
        return torch.tensor([0, 5, 6, 17, 31, N - 1], device=DEVICE)
    return make_keep(kind, layout, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_kind", ["empty", "full", "contiguous", "scattered", "odd"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 1, 16), (3, 3, 32), (4, 2, 16)])
def test_hybrid_backward_cpu_flash(dtype, keep_kind, H, Hkv, D):
    if _CUDA:
        pytest.skip("the CPU flash kernel needs CPU tensors; the gpu tests check cuDNN")
    gen = torch.Generator().manual_seed(21)
    layout = make_layout("plain", 1, 53, gen)  # 53: not a multiple of any tile
    keep = _hybrid_keep(keep_kind, layout, gen)
    q, k, v = inputs(layout.num_rows, H, Hkv, D, dtype, gen)
    scale = D ** -0.5
    o, lse = MATH.forward(q, k, v, layout, scale)
    M = keep.numel()
    do = torch.randn(M, H, D, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o, aux=lse, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for configs in (SMALL, MIXED):
        tri = TritonKeptAttention(configs, kept_backward="flash_cpu")
        got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                                scale=scale, queries_compact=True)
        if M:
            assert tri.last_backward == "flash_cpu", attention_triton.kept_backward_status()
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            assert g.shape == r.shape and g.dtype == dtype, name
            if M:
                assert rel(g, r) < TOL[dtype], (name, rel(g, r))


def test_hybrid_backward_padded_rows(monkeypatch):
    """Past EXACT_SIZES distinct kept counts the dense call runs on zero-padded rows (rounded up): same
    gradients."""
    if _CUDA:
        pytest.skip("CPU flash kernel; test_gpu_hybrid_padded_rows covers cuDNN")
    dtype = DTYPES[0]
    monkeypatch.setattr(attention_triton, "EXACT_SIZES", 0)
    monkeypatch.setattr(attention_triton, "ROUND_ROWS", 16)
    monkeypatch.setattr(attention_triton, "_DENSE_ROWS", {})
    calls = []
    inner = attention_triton._kept_pairs_backward

    def spy(impl, do_k, q, k_k, v_k, o, lse, rows, scale):
        calls.append((q.shape[0], rows))
        return inner(impl, do_k, q, k_k, v_k, o, lse, rows, scale)

    monkeypatch.setattr(attention_triton, "_kept_pairs_backward", spy)
    gen = torch.Generator().manual_seed(22)
    layout = make_layout("plain", 1, 61, gen)
    q, k, v = inputs(61, 4, 2, 16, dtype, gen)
    o, lse = MATH.forward(q, k, v, layout, 0.25)
    tri = TritonKeptAttention(SMALL, kept_backward="flash_cpu")
    for keep_kind in ("scattered", "contiguous", "full"):
        keep = make_keep(keep_kind, layout, gen)
        do = torch.randn(keep.numel(), 4, 16, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        calls.clear()
        got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                                scale=0.25, queries_compact=True)
        ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o, aux=lse, keep=keep, layout=layout, scale=0.25,
                                 queries_compact=False)
        M = keep.numel()
        assert tri.last_backward == "flash_cpu"
        assert calls == [(M, -(-M // 16) * 16)]
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            assert rel(g, r) < TOL[dtype], name


def test_hybrid_backward_self_check_rejects_wrong_gradients(monkeypatch):
    """A dense backward that misreads its inputs (here: dK off by 1 %) fails the one-time self-check: never
    used silently ("auto" falls back to the Triton kernels; an explicit impl raises)."""
    if _CUDA:
        pytest.skip("CPU flash kernel")
    monkeypatch.setattr(attention_triton, "_KEPT_STATUS", {})
    inner = attention_triton._kept_pairs_backward

    def broken(*args, **kwargs):
        dq, dk, dv = inner(*args, **kwargs)
        return dq, dk * 1.01, dv

    monkeypatch.setattr(attention_triton, "_kept_pairs_backward", broken)
    gen = torch.Generator().manual_seed(23)
    layout = make_layout("plain", 1, 40, gen)
    dtype = DTYPES[0]
    q, k, v = inputs(40, 2, 1, 16, dtype, gen)
    o, lse = MATH.forward(q, k, v, layout, 0.25)
    keep = make_keep("scattered", layout, gen)
    do = torch.randn(keep.numel(), 2, 16, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    tri = TritonKeptAttention(SMALL, kept_backward="flash_cpu")
    with pytest.raises(RuntimeError, match="self-check failed"):
        tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout, scale=0.25,
                          queries_compact=True)
    status = attention_triton.kept_backward_status()
    assert status[("flash_cpu", "cpu", dtype, 2, 1, 16)].startswith("self-check failed")


def test_hybrid_backward_only_on_one_plain_row():
    """Several rows, packed documents, padding or a window: the Triton kernels, whatever was asked."""
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(24)
    for kind, B, window in (("plain", 2, None), ("packed", 1, None), ("padded", 2, None), ("plain", 1, 7)):
        layout = make_layout(kind, B, 37, gen, window)
        keep = make_keep("scattered", layout, gen)
        q, k, v = inputs(layout.num_rows, 2, 1, 16, dtype, gen)
        o, lse = MATH.forward(q, k, v, layout, 0.25)
        do = torch.randn(keep.numel(), 2, 16, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        tri = TritonKeptAttention(SMALL, kept_backward="flash_cpu")
        got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                                scale=0.25, queries_compact=True)
        ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o, aux=lse, keep=keep, layout=layout, scale=0.25,
                                 queries_compact=False)
        assert tri.last_backward == "triton", kind
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            assert rel(g, r) < TOL[dtype], (kind, name)
    with pytest.raises(ValueError):
        TritonKeptAttention(kept_backward="cudnn-ish")


def test_backend_registration_and_choice():
    gen = torch.Generator().manual_seed(0)
    layout = make_layout("plain", 1, 8, gen)
    q = torch.randn(8, 2, 16, device=DEVICE)
    assert choose_backend("triton", q, layout).name == "triton"
    with pytest.raises(ValueError):
        choose_backend("triton", torch.randn(8, 2, 12, device=DEVICE), layout)  # head dim 12
    if _CUDA:
        assert choose_backend("auto", q.bfloat16(), layout).name == "triton"
    else:
        assert choose_backend("auto", q, layout).name == "math"  # CPU stays math


def test_model_fast_triton_equals_reference():
    """Whole model: centrifuge.apply(attention="triton") gives the oracle's gradients."""
    dtype = DTYPES[0]
    from transformers import AutoConfig
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=61, max_position_embeddings=64, head_dim=16)
    model = build_model(config, dtype=dtype, seed=0).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 61, (2, 19), generator=gen).to(DEVICE)
    keep = (torch.rand(2, 19, generator=gen) < 0.5).to(DEVICE)

    def grads(mode, attention="auto"):
        centrifuge.apply(model, mode=mode, attention=attention)
        try:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=ids, keep_mask=keep)
            out.loss.backward()
            return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            centrifuge.revert(model)

    loss_ref, ref = grads("reference")
    loss, got = grads("fast", "triton")
    assert torch.allclose(loss, loss_ref, rtol=TOL[dtype], atol=0)
    assert got.keys() == ref.keys()
    worst = max(rel(got[n], ref[n]) for n in ref)
    assert worst < 10 * TOL[dtype], worst


# ------------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at realistic shapes against the math backend (fp32 compute on the same inputs)
# ------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
BF16_TOL = 2e-2


def _gpu_case(B, T, H, Hkv, D, dtype, layout_kind="plain", window=None, kappa=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = make_layout(layout_kind, B, T, gen, window)
    N = B * T
    q, k, v = inputs(N, H, Hkv, D, dtype, gen)
    keep_mask = (torch.rand(N, generator=gen) < kappa) & layout.valid.cpu()
    keep = torch.nonzero(keep_mask).flatten().to(DEVICE)
    return layout, q, k, v, keep


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(32, 4, 64), (16, 16, 128)])
@pytest.mark.parametrize("layout_kind,window", [("plain", None), ("packed", None), ("padded", None),
                                                 ("plain", 300)])
@pytest.mark.parametrize("sdpa_forward", ["auto", "off"])
def test_gpu_default_configs_vs_math(dtype, H, Hkv, D, layout_kind, window, sdpa_forward):
    B, T = 2, 1100
    layout, q, k, v, keep = _gpu_case(B, T, H, Hkv, D, dtype, layout_kind, window)
    scale = D ** -0.5
    tri = TritonKeptAttention(sdpa_forward=sdpa_forward)
    o, lse = tri.forward(q, k, v, layout, scale)
    plain = layout_kind == "plain" and window is None
    if sdpa_forward == "off" or not plain:
        assert tri.last_forward == "triton"
    o_ref, lse_ref = MATH.forward(q, k, v, layout, scale)
    assert rel(o, o_ref) < BF16_TOL
    assert rel(lse, lse_ref) < 1e-3
    do = torch.randn(keep.numel(), H, D, device=DEVICE, dtype=dtype)
    got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o_ref[keep], aux=lse_ref[keep], keep=keep, layout=layout,
                            scale=scale, queries_compact=True)
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o_ref, aux=lse_ref, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        err = rel(g, r)
        assert err < BF16_TOL, (name, err)


@gpu
@pytest.mark.gpu
def test_gpu_matches_flash_backend_bf16():
    """Same kept-row gradients as the stock varlen flash path (which runs the full backward)."""
    from centrifuge.ops.attention import FlashVarlenAttention
    layout, q, k, v, keep = _gpu_case(4, 2048, 32, 4, 64, torch.bfloat16, "packed")
    scale = 0.125
    flash = FlashVarlenAttention()
    o, aux = flash.forward(q, k, v, layout, scale)
    do = torch.randn(keep.numel(), 32, 64, device=DEVICE, dtype=torch.bfloat16)
    ref = flash.backward_kept(do, q=q, k=k, v=v, o=o, aux=aux, keep=keep, layout=layout, scale=scale,
                              queries_compact=False)
    tri = TritonKeptAttention()
    o_t, lse = tri.forward(q, k, v, layout, scale)
    assert rel(o_t, o) < BF16_TOL
    got = tri.backward_kept(do, q=q, k=k, v=v, o=o_t, aux=lse, keep=keep, layout=layout, scale=scale,
                            queries_compact=False)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        err = rel(g, r)
        assert err < BF16_TOL, (name, err)


@gpu
@pytest.mark.gpu
def test_gpu_model_auto_picks_triton_and_matches_reference():
    from transformers import AutoConfig
    config = AutoConfig.for_model(
        "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, head_dim=64)
    model = build_model(config, dtype=torch.float32, seed=0).to(DEVICE)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 300), generator=gen).to(DEVICE)
    keep = (torch.rand(2, 300, generator=gen) < 0.5).to(DEVICE)
    grads = {}
    for mode, attention in (("reference", "auto"), ("fast", "triton"), ("fast", "auto")):
        centrifuge.apply(model, mode=mode, attention=attention)
        try:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
            grads[mode, attention] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            centrifuge.revert(model)
    ref = grads["reference", "auto"]
    for key in (("fast", "triton"), ("fast", "auto")):
        worst = max(rel(grads[key][n], ref[n]) for n in ref)
        assert worst < 1e-4, (key, worst)


@gpu
@pytest.mark.gpu
def test_gpu_auto_forward_uses_sdpa_on_plain_rows():
    """bf16 plain causal rows: "auto" takes one of the SDPA kernels (fails, with the reasons, if none works)."""
    layout, q, k, v, _ = _gpu_case(2, 1100, 32, 4, 64, torch.bfloat16)
    tri = TritonKeptAttention()
    tri.forward(q, k, v, layout, 0.125)
    assert tri.last_forward in attention_triton.SDPA_FORWARDS, attention_triton.sdpa_forward_status()
    tri.forward(q.float(), k.float(), v.float(), layout, 0.125)
    assert tri.last_forward == "triton"  # fp32: our forward


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "flash", "cudnn_repeat"])
@pytest.mark.parametrize("H,Hkv,D", [(32, 4, 64), (16, 16, 128), (8, 2, 128)])
def test_gpu_sdpa_forward_matches_triton_forward(impl, H, Hkv, D):
    """Each SDPA forward that passes its self-check gives the o and lse of our Triton forward (and the math
    backend), and the kept-token backward on its o / lse is right; an explicit impl that fails raises."""
    dtype = torch.bfloat16
    layout, q, k, v, keep = _gpu_case(3, 777, H, Hkv, D, dtype)
    scale = D ** -0.5
    status = attention_triton._sdpa_self_check(impl, q.device, dtype, H, Hkv, D)
    tri = TritonKeptAttention(sdpa_forward=impl)
    if status != "ok":
        with pytest.raises(RuntimeError):
            tri.forward(q, k, v, layout, scale)
        pytest.skip(f"{impl} unavailable here: {status}")
    o, lse = tri.forward(q, k, v, layout, scale)
    assert tri.last_forward == impl
    own = TritonKeptAttention(sdpa_forward="off")
    o_t, lse_t = own.forward(q, k, v, layout, scale)
    o_ref, lse_ref = MATH.forward(q, k, v, layout, scale)
    assert lse.dtype == torch.float32 and lse.shape == lse_t.shape == (layout.num_rows, H)
    assert (lse - lse_t).abs().max().item() < 1e-2
    assert rel(lse, lse_t) < 1e-3 and rel(lse, lse_ref) < 1e-3
    assert rel(o, o_t) < BF16_TOL and rel(o, o_ref) < BF16_TOL
    do = torch.randn(keep.numel(), H, D, device=DEVICE, dtype=dtype)
    got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                            scale=scale, queries_compact=True)
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o_ref, aux=lse_ref, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        err = rel(g, r)
        assert err < BF16_TOL, (name, err)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(32, 4, 64), (16, 16, 128), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_hybrid_backward_vs_math(dtype, H, Hkv, D, overlap):
    """One plain causal row in bf16 / fp16: the cuDNN hybrid passes its self-check here (fails, with the reason,
    if it does not) and its kept-row gradients match the math backend."""
    layout, q, k, v, keep = _gpu_case(1, 1900, H, Hkv, D, dtype, seed=H + D)
    scale = D ** -0.5
    o, lse = MATH.forward(q, k, v, layout, scale)
    do = torch.randn(keep.numel(), H, D, device=DEVICE, dtype=dtype)
    tri = TritonKeptAttention(kept_backward="cudnn")  # "auto" would take version 1 below HYBRID_MIN_ROWS
    tri.overlap_dqf = overlap
    got = tri.backward_kept(do, q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout,
                            scale=scale, queries_compact=True)
    assert tri.last_backward == "cudnn", attention_triton.kept_backward_status()
    ref = MATH.backward_kept(do, q=q, k=k, v=v, o=o, aux=lse, keep=keep, layout=layout, scale=scale,
                             queries_compact=False)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        err = rel(g, r)
        assert err < BF16_TOL, (name, err)


@gpu
@pytest.mark.gpu
def test_gpu_hybrid_padded_rows_and_edge_keeps(monkeypatch):
    """Zero-padded dense rows (past EXACT_SIZES distinct counts), all rows kept, one row kept: same gradients
    as the version-1 kernels."""
    monkeypatch.setattr(attention_triton, "EXACT_SIZES", 0)
    monkeypatch.setattr(attention_triton, "_DENSE_ROWS", {})
    layout, q, k, v, _ = _gpu_case(1, 3001, 32, 4, 64, torch.bfloat16, seed=5)
    scale = 0.125
    o, lse = TritonKeptAttention().forward(q, k, v, layout, scale)
    gen = torch.Generator().manual_seed(6)
    for keep in (torch.nonzero(torch.rand(3001, generator=gen) < 0.37).flatten().to(DEVICE),
                 torch.arange(3001, device=DEVICE), torch.tensor([1234], device=DEVICE)):
        do = torch.randn(keep.numel(), 32, 64, device=DEVICE, dtype=torch.bfloat16)
        args = dict(q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout, scale=scale,
                    queries_compact=True)
        hyb = TritonKeptAttention(kept_backward="cudnn")
        got = hyb.backward_kept(do, **args)
        assert hyb.last_backward == "cudnn", attention_triton.kept_backward_status()
        ref = TritonKeptAttention(kept_backward="off").backward_kept(do, **args)
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            err = rel(g, r)
            assert err < 1e-2, (keep.numel(), name, err)


@gpu
@pytest.mark.gpu
def test_gpu_auto_backward_takes_hybrid_from_min_rows():
    """"auto": version 1 below HYBRID_MIN_ROWS kept rows, the cuDNN hybrid from there on (same gradients)."""
    for T, expect in ((1900, "triton"), (2 * attention_triton.HYBRID_MIN_ROWS + 500, "cudnn")):
        layout, q, k, v, keep = _gpu_case(1, T, 32, 4, 64, torch.bfloat16, seed=T)
        o, lse = TritonKeptAttention().forward(q, k, v, layout, 0.125)
        do = torch.randn(keep.numel(), 32, 64, device=DEVICE, dtype=torch.bfloat16)
        args = dict(q=q[keep], k=k, v=v, o=o[keep], aux=lse[keep], keep=keep, layout=layout, scale=0.125,
                    queries_compact=True)
        tri = TritonKeptAttention()
        got = tri.backward_kept(do, **args)
        assert tri.last_backward == expect, (T, keep.numel(), attention_triton.kept_backward_status())
        ref = TritonKeptAttention(kept_backward="off").backward_kept(do, **args)
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            err = rel(g, r)
            assert err < 1e-2, (T, name, err)
