"""GPU benchmark of a *hybrid* kept-token attention backward: Triton for kept queries × filtered keys, a dense
causal attention backward (cuDNN, or FlashAttention-2 for comparison) for kept queries × kept keys.

Usage (H100, no network):

    PYTHONPATH=src python3 benchmarks/gpu_attention_hybrid.py OUT_DIR

Why it works. Kept rows are sorted row ids, so inside one causal sequence the kept rows, compacted, are again
a plain causal sequence (kept query i sees kept key j iff j <= i in compact order). The kept × kept part of the
token-sparse backward is therefore the ordinary causal backward on the compacted sequence of length m, provided
the kernel is given the log-sum-exp of the *full* forward (so P = exp(S - lse_full) are the true probabilities)
and the full-forward output O of the kept rows (so D_i = rowsum(dO ∘ O) is right). It returns dK, dV of the kept
keys exactly (only kept queries carry gradient) and the part of dQ from kept keys; the rest of dQ (kept queries ×
filtered keys at or before the query) is the existing Triton kernel ``_dqf``. dQ = dQ_dqf + dQ_dense.

Steps (everything in try/except: a failing piece is recorded and the script goes on; JSON written after each
step):

1. probes: the schemas of the private aten ops, cuDNN version, the log-sum-exp shape / strides / dtype that the
   dense and the ragged (cum_seq) cuDNN forwards and the dense / varlen flash forwards return (the backward
   wants the same layout);
2. correctness on small shapes (H = 32, Hkv = 4, D = 64, bf16; B = 1, B = 2 with different kept counts, and
   B = 3 with one row that keeps nothing) against the math backend (fp32 compute on the same inputs), for the
   version-1 backward, every hybrid variant and the library's backend;
3. timings (median of ``triton.testing.do_bench``) at S × B = 16384 × 1, 2048 × 8 (Bernoulli keep: kept counts
   differ per sequence), 4096 × 1 and 32768 × 1 (``HYBRID_CASES="16384x1,..."`` for a subset) for
   κ = 0.3, 0.5, 0.7 (B = 1: exactly round(κ·S) random kept rows):
   * ``sdpa``: the full causal backward of ``F.scaled_dot_product_attention`` (what the dense model runs);
   * ``cudnn_full``: the cuDNN backward op on all rows (the kernel SDPA runs on the H100, as a check);
   * ``v1``: ``TritonKeptAttention.backward_kept`` version 1 (``_dq`` over all keys + ``_dkdv`` with recompute);
   * ``dqf``: the ``_dqf`` kernel alone (kept queries × filtered keys; fp32 dQ partial), setup excluded, at the
     library's default tile; at 16k, κ = 0.5 a short tile sweep (the fastest is used by the ``hybrid_*`` rows);
   * kept × kept pieces alone, inputs prepared: ``cudnn_dense`` ([B, H, m, D] views, equal counts only),
     ``cudnn_padded`` (rows scattered into [B, m_pad] zero padding: padded queries have dO = 0 and padded keys
     sit after every real query, so both contribute nothing), ``flash_dense``, ``flash_varlen`` (THD rows,
     cu_seqlens = kept-row offsets); ``cudnn_ragged_T`` / ``cudnn_ragged_m`` (THD rows with cum_seq = kept-row
     offsets, max length T or the true maximum) only with ``HYBRID_RAGGED=1``: in the first run (torch 2.11,
     cuDNN 9.19) they returned wrong gradients, took ~100 ms per call, and then faulted (illegal memory access);
   * ``hybrid_*``: the whole backward from the layer's inputs (kept q / o / lse / dO, all k / v, keep), setup
     included (searchsorted, the filtered-row list, K / V gathers, lse layout, padding, the fp32 dQ sum), for
     the kept × kept variants that apply; ``hybrid_*_streams``: ``_dqf`` on a side stream, overlapping the
     dense backward;
   * ``lib`` / ``lib_overlap``: ``TritonKeptAttention()`` as the library has it (``overlap_dqf`` False / True;
     the path it took, ``last_backward``, is recorded);
   * host ms: the CPU time to issue one call of v1, ``dqf``, ``cudnn_dense`` and the library's backend;
   and every hybrid's gradients against v1 (relative error ‖a − b‖ / ‖b‖, bf16 vs bf16).

The table last: ratios to SDPA's backward; the target is ours ≤ 0.45× SDPA at S = 16k, κ = 0.5.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

T0 = time.time()
# skip what is left past this many seconds (HYBRID_BUDGET_S; the command runs under a timeout)
BUDGET_S = float(os.environ.get("HYBRID_BUDGET_S", "235"))
H, HKV, D = 32, 4, 64
# S x B cases; HYBRID_CASES="16384x1,2048x8" runs a subset (a later check of the library path)
CASES = [tuple(int(x) for x in c.split("x")) for c in
         os.environ.get("HYBRID_CASES", "16384x1,2048x8,4096x1,32768x1").split(",")]
# The ragged (cum_seq) cuDNN variants: in the first run (torch 2.11, cuDNN 9.19) they returned wrong gradients,
# took ~100 ms per call, and then faulted (illegal memory access), so they only run with HYBRID_RAGGED=1.
RAGGED = os.environ.get("HYBRID_RAGGED", "0") == "1"
KAPPAS = [0.3, 0.5, 0.7]
DTYPE = torch.bfloat16
DQF_TILES = [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 4), (128, 64, 8, 2)]


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("TRITON_INTERPRET is set: unset it to benchmark compiled kernels")
if not torch.cuda.is_available():
    sys.exit("no CUDA device")
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from centrifuge.ops import attention_triton as AT  # noqa: E402
from centrifuge.ops.attention import MathAttention  # noqa: E402
from centrifuge.tokens.layout import TokenLayout  # noqa: E402

DEV = torch.device("cuda")
AOPS = torch.ops.aten
STATE: dict = {}  # probe results: lse layouts and the philox / rng tensors the backward ops take


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        return float("nan")
    return (got.double() - ref.double()).norm().item() / max(ref.double().norm().item(), 1e-30)


def bench(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20": p20, "p80": p80}


def host_ms(fn, reps: int = 15) -> float:
    """Median host (CPU) time of one call, from an idle GPU queue: what the call costs to issue. A call whose
    GPU work takes less than this is host-bound (and a hidden sync would show as host time ≈ GPU time)."""
    fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2] * 1e3


def first_call_ms(fn) -> float:
    """Wall time of one call from a synchronized start (a new cuDNN graph is built on the first call)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def desc(t) -> dict | str:
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype)}


# ------------------------------------------------------------------------------------------------------
# 1. probes
# ------------------------------------------------------------------------------------------------------


def probe(results: dict) -> None:
    pr = results["probe"]
    for name in ("_scaled_dot_product_cudnn_attention_backward", "_cudnn_attention_backward",
                 "_cudnn_attention_forward", "_scaled_dot_product_flash_attention_backward",
                 "_flash_attention_backward", "_flash_attention_forward"):
        try:
            pr.setdefault("schemas", {})[name] = str(getattr(AOPS, name).default._schema)
        except Exception as e:
            pr.setdefault("schemas", {})[name] = f"missing: {e!r}"
    pr["cudnn_version"] = torch.backends.cudnn.version()
    log(f"cudnn {pr['cudnn_version']}; schemas:\n  " + "\n  ".join(f"{v}" for v in pr["schemas"].values()))
    gen = torch.Generator().manual_seed(100)
    T = 100
    q = torch.randn(2, H, T, D, generator=gen).to(DEV, DTYPE)
    k = torch.randn(2, HKV, T, D, generator=gen).to(DEV, DTYPE)
    v = torch.randn(2, HKV, T, D, generator=gen).to(DEV, DTYPE)
    try:
        out = AOPS._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.125)
        pr["cudnn_dense_fwd"] = {"out": desc(out[0]), "lse": desc(out[1]), "philox_seed": desc(out[6]),
                                 "philox_offset": desc(out[7])}
        STATE["cudnn_lse_ndim"] = out[1].dim()
        STATE["cudnn_philox"] = (out[6], out[7])
    except Exception as e:
        pr["cudnn_dense_fwd"] = f"{type(e).__name__}: {str(e)[:400]}"
    try:
        out = AOPS._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=0.125)
        pr["flash_dense_fwd"] = {"out": desc(out[0]), "lse": desc(out[1]), "philox_seed": desc(out[6]),
                                 "philox_offset": desc(out[7])}
        STATE["flash_philox"] = (out[6], out[7])
    except Exception as e:
        pr["flash_dense_fwd"] = f"{type(e).__name__}: {str(e)[:400]}"
    # ragged: two sequences of 100 and 77 rows, THD layout [total, heads, D]
    lens = [100, 77]
    cu = torch.tensor([0, 100, 177], dtype=torch.int32, device=DEV)
    qt = torch.randn(177, H, D, generator=gen).to(DEV, DTYPE)
    kt = torch.randn(177, HKV, D, generator=gen).to(DEV, DTYPE)
    vt = torch.randn(177, HKV, D, generator=gen).to(DEV, DTYPE)
    try:
        out = AOPS._cudnn_attention_forward(qt, kt, vt, None, cu, cu, max(lens), max(lens), True, 0.0, True, False,
                                            scale=0.125)
        pr["cudnn_ragged_fwd"] = {"out": desc(out[0]), "lse": desc(out[1])}
        STATE["cudnn_ragged_lse"] = tuple(out[1].shape)
    except Exception as e:
        pr["cudnn_ragged_fwd"] = f"{type(e).__name__}: {str(e)[:400]}"
    try:
        out = AOPS._flash_attention_forward(qt, kt, vt, cu, cu, max(lens), max(lens), 0.0, True, False, scale=0.125)
        pr["flash_varlen_fwd"] = {"out": desc(out[0]), "lse": desc(out[1]), "rng_state": desc(out[2]),
                                  "unused": desc(out[3])}
        STATE["flash_varlen_lse"] = tuple(out[1].shape)
        STATE["flash_rng"] = (out[2], out[3])
    except Exception as e:
        pr["flash_varlen_fwd"] = f"{type(e).__name__}: {str(e)[:400]}"
    for key in ("cudnn_dense_fwd", "flash_dense_fwd", "cudnn_ragged_fwd", "flash_varlen_fwd"):
        log(f"probe {key}: {pr[key]}")


# ------------------------------------------------------------------------------------------------------
# kept rows of one problem, and the hybrid's pieces
# ------------------------------------------------------------------------------------------------------


class Kept:
    """Compact kept-row tensors of one (problem, keep): what the layer hands to ``backward_kept``, plus the
    prepared inputs of each kept × kept variant (so that pieces can be timed alone)."""

    def __init__(self, layout: TokenLayout, q, k, v, o, lse, do_full, keep: torch.Tensor, scale: float):
        self.layout, self.k, self.v, self.keep, self.scale = layout, k, v, keep, scale
        self.B, self.T, self.N = layout.batch, layout.seqlen, layout.num_rows
        self.q_k, self.o_k, self.lse_k = q.index_select(0, keep), o.index_select(0, keep), lse.index_select(0, keep)
        self.do_k = do_full.index_select(0, keep)
        self.M = keep.numel()
        self.setup()
        self.counts = (self.kcu[1:] - self.kcu[:-1]).tolist()
        self.m_max = max(self.counts)
        self.equal = len(set(self.counts)) == 1

    def setup(self):
        """Everything the hybrid derives from keep: int32 ids, per-row kept offsets, the filtered-row list,
        gathered K / V of kept rows."""
        self.keep32 = self.keep.to(torch.int32)
        self.cu = self.layout.cu_seqlens.to(device=DEV, dtype=torch.int32)
        self.kcu = torch.searchsorted(self.keep, self.cu.to(self.keep.dtype)).to(torch.int32)
        self.drop = AT.filtered_rows(self.keep32, self.N)
        self.k_k, self.v_k = self.k.index_select(0, self.keep), self.v.index_select(0, self.keep)


def run_dqf(kp: Kept, cfg) -> torch.Tensor:
    """``_dqf`` as ``_backward_split`` launches it: dQ of kept queries against filtered keys, fp32 [M, H, D]."""
    M = kp.M
    dq_acc = torch.empty(M, H, D, dtype=torch.float32, device=DEV)
    delta = torch.empty(M, H, dtype=torch.float32, device=DEV)
    BM, BN, warps, stages = cfg
    S = kp.cu.numel() - 1
    nqb = AT.triton_cdiv(min(kp.layout.max_seqlen, M), BM)
    prec, acc = AT._precision_args(DTYPE)
    AT._kernels(False)["dqf"][(S * nqb, H)](
        kp.q_k, kp.k, kp.v, kp.o_k, kp.do_k, kp.lse_k, delta, dq_acc, kp.keep32, kp.drop, kp.cu, kp.kcu,
        kp.scale, kp.scale * AT._LOG2E, kp.k.stride(0), kp.k.stride(1), H, H // HKV, S, nqb,
        HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=prec, ACC=acc, num_warps=warps, num_stages=stages,
    )
    return dq_acc


def lse_dense(lse_k: torch.Tensor, B: int, m: int, ndim: int) -> torch.Tensor:
    """[M, H] (M = B·m) → contiguous [B, H, m] (flash) or [B, H, m, 1] (cuDNN's stats)."""
    x = lse_k.view(B, m, H).permute(0, 2, 1).contiguous()
    return x.unsqueeze(-1) if ndim == 4 else x


def lse_ragged(lse_k: torch.Tensor, shape: tuple, kp: Kept | None = None) -> torch.Tensor:
    """[M, H] → the ragged layout the forward probe returned: (H, total) or (total, H, 1); (B, H, max) for an
    older flash varlen (rows scattered per sequence)."""
    if len(shape) == 2 and shape[0] == H:
        return lse_k.t().contiguous()
    if len(shape) == 3 and shape[1] == H and shape[2] == 1:
        return lse_k.unsqueeze(-1).contiguous()
    if len(shape) == 3 and shape[1] == H and kp is not None:
        out = torch.zeros(kp.B * kp.T, H, dtype=lse_k.dtype, device=DEV)
        out.index_copy_(0, pad_dest(kp, kp.T), lse_k)
        return out.view(kp.B, kp.T, H).permute(0, 2, 1).contiguous()
    raise RuntimeError(f"unknown ragged lse layout {shape}")


def pad_dest(kp: Kept, m_pad: int) -> torch.Tensor:
    """Slot of each kept row in [B · m_pad] padded rows: row b's kept rows go to b·m_pad + rank."""
    seg = kp.keep // kp.T  # plain causal rows: batch row = segment
    rank = torch.arange(kp.M, device=DEV) - kp.kcu.long()[seg]
    return seg * m_pad + rank


def dense_bwd(impl: str, do4, q4, k4, v4, o4, lse, m: int, scale: float):
    """One dense causal backward on [B, heads, m, D] tensors with the given (full-forward) lse."""
    if impl == "cudnn":
        seed, off = STATE["cudnn_philox"]
        return AOPS._scaled_dot_product_cudnn_attention_backward(do4, q4, k4, v4, o4, lse, seed, off, None, None,
                                                                 None, m, m, 0.0, True, scale=scale)
    seed, off = STATE["flash_philox"]
    return AOPS._scaled_dot_product_flash_attention_backward(do4, q4, k4, v4, o4, lse, None, None, m, m, 0.0, True,
                                                             seed, off, scale=scale)


def heads_first(x: torch.Tensor, B: int, m: int) -> torch.Tensor:
    """[B·m, heads, D] → [B, heads, m, D] view."""
    return x.view(B, m, x.shape[1], D).transpose(1, 2)


def rows_back(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, m, D] → [B·m, heads, D] (a view when x has the BSHD strides of ``heads_first``)."""
    B, h, m, _ = x.shape
    return x.transpose(1, 2).reshape(B * m, h, D)


class KK:
    """Kept × kept variants. ``prepare(kp)`` returns the prepared inputs, ``call(prep)`` the dense backward on
    them, ``finish(kp, out)`` dq_c [M, H, D], dk [M, HKV, D], dv [M, HKV, D] in compact row order."""

    def __init__(self, name: str, impl: str, mode: str):
        self.name, self.impl, self.mode = name, impl, mode

    def applies(self, kp: Kept) -> bool:
        if self.mode == "dense":
            return kp.equal
        return True

    def prepare(self, kp: Kept, sync_counts: bool = False):
        B, T, M = kp.B, kp.T, kp.M
        if self.mode == "dense":
            m = M // B
            nd = STATE.get("cudnn_lse_ndim", 4) if self.impl == "cudnn" else 3
            return ("dense", heads_first(kp.do_k, B, m), heads_first(kp.q_k, B, m), heads_first(kp.k_k, B, m),
                    heads_first(kp.v_k, B, m), heads_first(kp.o_k, B, m), lse_dense(kp.lse_k, B, m, nd), m)
        if self.mode == "padded":
            # the true maximum needs the kept counts on the host (a sync); rounded up to 64 rows
            m_max = int((kp.kcu[1:] - kp.kcu[:-1]).max().item()) if sync_counts else kp.m_max
            m_pad = -(-m_max // 64) * 64
            dest = pad_dest(kp, m_pad)

            def pad(x):
                buf = x.new_zeros(B * m_pad, *x.shape[1:])
                buf.index_copy_(0, dest, x)
                return buf
            nd = STATE.get("cudnn_lse_ndim", 4) if self.impl == "cudnn" else 3
            lse_p = lse_dense(pad(kp.lse_k), B, m_pad, nd)
            return ("padded", heads_first(pad(kp.do_k), B, m_pad), heads_first(pad(kp.q_k), B, m_pad),
                    heads_first(pad(kp.k_k), B, m_pad), heads_first(pad(kp.v_k), B, m_pad),
                    heads_first(pad(kp.o_k), B, m_pad), lse_p, m_pad, dest)
        max_q = T if self.mode == "ragged_T" else kp.m_max
        if self.impl == "cudnn":
            return ("ragged", lse_ragged(kp.lse_k, STATE["cudnn_ragged_lse"]), max_q)
        return ("ragged", lse_ragged(kp.lse_k, STATE["flash_varlen_lse"], kp), max_q)

    def call(self, kp: Kept, prep):
        if prep[0] in ("dense", "padded"):
            _, do4, q4, k4, v4, o4, lse, m = prep[:8]
            return dense_bwd(self.impl, do4, q4, k4, v4, o4, lse, m, kp.scale)
        _, lse, max_q = prep
        if self.impl == "cudnn":
            seed, off = STATE["cudnn_philox"]
            return AOPS._cudnn_attention_backward(kp.do_k, kp.q_k, kp.k_k, kp.v_k, kp.o_k, lse, seed, off, None,
                                                  kp.kcu, kp.kcu, max_q, max_q, 0.0, True, scale=kp.scale)
        rng, unused = STATE["flash_rng"]
        return AOPS._flash_attention_backward(kp.do_k, kp.q_k, kp.k_k, kp.v_k, kp.o_k, lse, kp.kcu, kp.kcu, max_q,
                                              max_q, 0.0, True, rng, unused, scale=kp.scale)

    def finish(self, prep, out):
        dq, dk, dv = out[0], out[1], out[2]
        if prep[0] == "dense":
            return rows_back(dq), rows_back(dk), rows_back(dv)
        if prep[0] == "padded":
            dest = prep[8]
            return (rows_back(dq).index_select(0, dest), rows_back(dk).index_select(0, dest),
                    rows_back(dv).index_select(0, dest))
        return dq, dk, dv

    def run(self, kp: Kept, sync_counts: bool = True):
        prep = self.prepare(kp, sync_counts)
        return self.finish(prep, self.call(kp, prep))


KKS = [KK("cudnn_dense", "cudnn", "dense"), KK("cudnn_padded", "cudnn", "padded"),
       KK("flash_dense", "flash", "dense"), KK("flash_varlen", "flash", "ragged_T")]
HYBRIDS = ["cudnn_dense", "cudnn_padded", "flash_varlen"]
if RAGGED:
    KKS += [KK("cudnn_ragged_T", "cudnn", "ragged_T"), KK("cudnn_ragged_m", "cudnn", "ragged_m")]
    HYBRIDS.append("cudnn_ragged_T")
SIDE: dict = {}
SEEN_ERRORS: set = set()


def hybrid(kp: Kept, kk: KK, cfg, streams: bool = False):
    """The whole hybrid backward from the layer's inputs (setup included)."""
    kp.setup()
    if streams:
        main = torch.cuda.current_stream()
        side = SIDE.setdefault("s", torch.cuda.Stream())
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dq_acc = run_dqf(kp, cfg)
        dq_c, dk, dv = kk.run(kp)
        main.wait_stream(side)
        dq_acc.record_stream(main)
    else:
        dq_acc = run_dqf(kp, cfg)
        dq_c, dk, dv = kk.run(kp)
    dq = dq_acc.add_(dq_c).to(DTYPE)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------------
# 2. correctness on small shapes
# ------------------------------------------------------------------------------------------------------


def v1_backend():
    try:
        tri = AT.TritonKeptAttention(kept_backward="off")
    except TypeError:  # a library without the hybrid path
        tri = AT.TritonKeptAttention()
    tri.split_backward = False
    return tri


def lib_backend(overlap: bool):
    """The library's default backend (the hybrid where it applies, when the library has it); ``overlap``:
    its ``_dqf`` on a side stream."""
    tri = AT.TritonKeptAttention()
    tri.overlap_dqf = overlap
    return tri


def kept_backward(tri, kp: Kept):
    """``tri``'s kept-token backward on problem ``kp`` (version 1 or the library's default, per ``tri``)."""
    return tri.backward_kept(kp.do_k, q=kp.q_k, k=kp.k, v=kp.v, o=kp.o_k, aux=kp.lse_k, keep=kp.keep,
                             layout=kp.layout, scale=kp.scale, queries_compact=True)


def make_problem(B: int, T: int, gen: torch.Generator):
    layout = TokenLayout.build(batch=B, seqlen=T, device=DEV)
    N = B * T
    q = torch.randn(N, H, D, generator=gen).to(DEV, DTYPE)
    k = torch.randn(N, HKV, D, generator=gen).to(DEV, DTYPE)
    v = torch.randn(N, HKV, D, generator=gen).to(DEV, DTYPE)
    do_full = torch.randn(N, H, D, generator=gen).to(DEV, DTYPE)
    return layout, q, k, v, do_full


def keep_rows(B: int, T: int, kappa: float, gen: torch.Generator, exact: bool, empty_row: int | None = None):
    rows = []
    for b in range(B):
        if b == empty_row:
            continue
        if exact:
            m = max(1, round(kappa * T))
            rows.append(torch.randperm(T, generator=gen)[:m].sort().values + b * T)
        else:
            rows.append(torch.nonzero(torch.rand(T, generator=gen) < kappa).flatten() + b * T)
    return torch.cat(rows).to(DEV)


def check_small(results: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    math_b, tri = MathAttention(), v1_backend()
    cases = [("B1", 1, 1100, None, True), ("B2_ragged", 2, 700, None, False), ("B3_empty_row", 3, 300, 1, False)]
    for name, B, T, empty, exact in cases:
        layout, q, k, v, do_full = make_problem(B, T, gen)
        scale = D ** -0.5
        o, lse = math_b.forward(q, k, v, layout, scale)
        keep = keep_rows(B, T, 0.5, gen, exact, empty)
        kp = Kept(layout, q, k, v, o, lse, do_full, keep, scale)
        ref = math_b.backward_kept(kp.do_k, q=kp.q_k, k=k, v=v, o=kp.o_k, aux=kp.lse_k, keep=keep, layout=layout,
                                   scale=scale, queries_compact=True)
        row = {"counts": kp.counts}
        variants = {"v1": lambda kp=kp: kept_backward(tri, kp)}
        for kk in KKS:
            if kk.applies(kp):
                variants["hybrid_" + kk.name] = lambda kk=kk, kp=kp: hybrid(kp, kk, AT.DEFAULT_CONFIGS[D]["dqf"])
        variants["hybrid_cudnn_padded_streams"] = lambda kp=kp: hybrid(kp, KKS[1], AT.DEFAULT_CONFIGS[D]["dqf"],
                                                                       streams=True)
        for overlap in (False, True):
            variants["lib" + ("_overlap" if overlap else "")] = lambda kp=kp, overlap=overlap: kept_backward(
                lib_backend(overlap), kp)
        for vname, fn in variants.items():
            try:
                got = fn()
                torch.cuda.synchronize()
                row[vname] = {n_: rel(g, r) for n_, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True)}
            except Exception as e:
                row[vname] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            log(f"correctness {name} counts={kp.counts} {vname}: {row[vname]}")
        results["correctness"][name] = row


# ------------------------------------------------------------------------------------------------------
# 3. timings
# ------------------------------------------------------------------------------------------------------


def time_case(S: int, B: int, gen: torch.Generator, results: dict) -> None:
    layout, q, k, v, do_full = make_problem(B, S, gen)
    scale = D ** -0.5
    fwd = AT.TritonKeptAttention()
    o, lse = fwd.forward(q, k, v, layout, scale)
    case = {"S": S, "B": B, "forward_path": fwd.last_forward, "rows": []}
    results["cases"].append(case)
    # SDPA full backward (the dense model's), and the cuDNN backward op on all rows
    q4 = q.view(B, S, H, D).transpose(1, 2).detach().requires_grad_(True)
    k4 = k.view(B, S, HKV, D).transpose(1, 2).detach().requires_grad_(True)
    v4 = v.view(B, S, HKV, D).transpose(1, 2).detach().requires_grad_(True)
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True, scale=scale)
    do4 = do_full.view(B, S, H, D).transpose(1, 2)
    case["sdpa_bwd"] = bench(lambda out=out: torch.autograd.grad(out, (q4, k4, v4), do4, retain_graph=True))
    log(f"S={S} B={B}: sdpa bwd {case['sdpa_bwd']['ms']:.3f} ms (forward path {fwd.last_forward})")
    try:
        o4 = o.view(B, S, H, D).transpose(1, 2)
        lse4 = lse_dense(lse, B, S, STATE.get("cudnn_lse_ndim", 4))
        case["cudnn_full_bwd"] = bench(lambda: dense_bwd("cudnn", do4, q4.detach(), k4.detach(), v4.detach(), o4,
                                                         lse4, S, scale))
        log(f"S={S}: cudnn full bwd op {case['cudnn_full_bwd']['ms']:.3f} ms")
    except Exception as e:
        case["cudnn_full_bwd"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    del out
    tri_v1 = v1_backend()
    sdpa_ms = case["sdpa_bwd"]["ms"]
    for kappa in KAPPAS:
        if time.time() - T0 > BUDGET_S:
            log(f"time budget reached: skipping S={S} kappa={kappa}")
            case["rows"].append({"kappa": kappa, "skipped": "time budget"})
            continue
        keep = keep_rows(B, S, kappa, gen, exact=(B == 1))
        kp = Kept(layout, q, k, v, o, lse, do_full, keep, scale)
        row = {"kappa": kappa, "M": kp.M, "counts_min_max": [min(kp.counts), max(kp.counts)], "times": {},
               "errors_vs_v1": {}, "first_call_ms": {}}
        case["rows"].append(row)
        t = row["times"]
        ref = kept_backward(tri_v1, kp)
        t["v1"] = bench(lambda kp=kp: kept_backward(tri_v1, kp))
        row["host_ms"] = {"v1": host_ms(lambda kp=kp: kept_backward(tri_v1, kp))}
        cfg0 = AT.DEFAULT_CONFIGS[D]["dqf"]
        t["dqf"] = bench(lambda kp=kp, cfg0=cfg0: run_dqf(kp, cfg0))
        row["host_ms"]["dqf"] = host_ms(lambda kp=kp, cfg0=cfg0: run_dqf(kp, cfg0))
        if S == 16384 and kappa == 0.5:  # a short tile sweep for dqf alone
            row["dqf_tiles"] = {}
            for cfg in DQF_TILES:
                try:
                    row["dqf_tiles"][str(cfg)] = bench(lambda kp=kp, cfg=cfg: run_dqf(kp, cfg))["ms"]
                except Exception as e:
                    row["dqf_tiles"][str(cfg)] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"dqf tiles: {row['dqf_tiles']}")
            ok = {c: ms for c, ms in row["dqf_tiles"].items() if isinstance(ms, float)}
            best = min(ok, key=ok.get) if ok else str(cfg0)
            row["dqf_best"] = best
            STATE["dqf_best"] = tuple(int(x) for x in best.strip("()").split(","))
        cfg = STATE.get("dqf_best", cfg0)
        for kk in KKS:
            if not kk.applies(kp):
                continue
            try:
                prep = kk.prepare(kp)
                row["first_call_ms"][kk.name] = first_call_ms(lambda kk=kk, prep=prep, kp=kp: kk.call(kp, prep))
                t[kk.name] = bench(lambda kk=kk, prep=prep, kp=kp: kk.call(kp, prep))
                if kk.name == "cudnn_dense":
                    row["host_ms"][kk.name] = host_ms(lambda kk=kk, prep=prep, kp=kp: kk.call(kp, prep))
            except Exception as e:
                t[kk.name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for name in HYBRIDS:
            kk = next(x for x in KKS if x.name == name)
            if not kk.applies(kp):
                continue
            for streams in (False, True):
                hname = f"hybrid_{name}" + ("_streams" if streams else "")
                try:
                    got = hybrid(kp, kk, cfg, streams)
                    row["errors_vs_v1"][hname] = {n_: rel(g, r) for n_, g, r in zip(("dq", "dk", "dv"), got, ref,
                                                                                    strict=True)}
                    t[hname] = bench(lambda kp=kp, kk=kk, streams=streams, cfg=cfg: hybrid(kp, kk, cfg, streams))
                except Exception as e:
                    t[hname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for overlap in (False, True):
            name = "lib" + ("_overlap" if overlap else "")
            try:
                lib = lib_backend(overlap)
                got = kept_backward(lib, kp)
                row[name + "_path"] = getattr(lib, "last_backward", "v1")
                row["errors_vs_v1"][name] = {n_: rel(g, r) for n_, g, r in zip(("dq", "dk", "dv"), got, ref,
                                                                               strict=True)}
                t[name] = bench(lambda kp=kp, lib=lib: kept_backward(lib, kp))
                row["host_ms"][name] = host_ms(lambda kp=kp, lib=lib: kept_backward(lib, kp))
            except Exception as e:
                t[name] = {"error": f"{type(e).__name__}: {traceback.format_exc()[-600:]}"}
        row["ratios"] = {n_: r_["ms"] / sdpa_ms for n_, r_ in t.items() if "ms" in r_}
        log(f"S={S} B={B} kappa={kappa} M={kp.M} counts {row['counts_min_max']}: " + ", ".join(
            f"{n_} {r_['ms']:.3f}" if "ms" in r_ else f"{n_} ERR" for n_, r_ in t.items()))
        errs = {n_: max(e_.values()) for n_, e_ in row["errors_vs_v1"].items()}
        log(f"   max rel err vs v1: {errs}; first calls ms: "
            + ", ".join(f"{n_} {ms:.0f}" for n_, ms in row["first_call_ms"].items()) + "; host ms: "
            + ", ".join(f"{n_} {ms:.3f}" for n_, ms in row["host_ms"].items()))
        for n_, r_ in t.items():
            if "error" in r_ and r_["error"] not in SEEN_ERRORS:  # each distinct error once
                SEEN_ERRORS.add(r_["error"])
                log(f"   {n_}: {r_['error']}")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: PYTHONPATH=src python3 benchmarks/gpu_attention_hybrid.py OUT_DIR")
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                     "shape": {"H": H, "Hkv": HKV, "D": D, "dtype": str(DTYPE)}, "probe": {}, "correctness": {},
                     "cases": [], "command": " ".join(sys.argv)}
    log(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")

    def dump():
        results["elapsed_s"] = time.time() - T0
        (out_dir / "attention_hybrid.json").write_text(json.dumps(results, indent=1, default=str))

    for step in (lambda: probe(results), lambda: check_small(results)):
        try:
            step()
        except Exception:
            results.setdefault("failures", []).append(traceback.format_exc()[-2000:])
            traceback.print_exc()
        dump()
    gen = torch.Generator().manual_seed(1)
    for S, B in CASES:
        if time.time() - T0 > BUDGET_S:
            log(f"time budget reached: skipping S={S}")
            continue
        try:
            time_case(S, B, gen, results)
        except Exception:
            results.setdefault("failures", []).append(traceback.format_exc()[-2000:])
            traceback.print_exc()
        dump()
        torch.cuda.empty_cache()
    dump()
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, triton {results['triton']}; H={H} Hkv={HKV} D={D} "
          f"{DTYPE}; median ms (ratio to SDPA's full causal backward)")
    cols = ["v1", "dqf", "cudnn_dense", "cudnn_padded", "flash_varlen", "hybrid_cudnn_dense",
            "hybrid_cudnn_dense_streams", "hybrid_cudnn_padded", "lib", "lib_overlap"]
    print(f"{'S':>6} {'B':>2} {'kappa':>5} {'sdpa':>7} | " + " ".join(f"{c[:18]:>18}" for c in cols))
    for case in results["cases"]:
        for row in case["rows"]:
            if "times" not in row:
                continue
            cells = []
            for c in cols:
                r = row["times"].get(c)
                cells.append(f"{r['ms']:7.3f} ({row['ratios'][c]:.3f})" if r and "ms" in r else
                             ("ERR" if r else "-"))
            print(f"{case['S']:>6} {case['B']:>2} {row['kappa']:>5} {case['sdpa_bwd']['ms']:>7.3f} | "
                  + " ".join(f"{c:>18}" for c in cells))
    print("host ms per call (issue time from an idle queue):")
    for case in results["cases"]:
        for row in case["rows"]:
            if "host_ms" in row:
                print(f"  S={case['S']} B={case['B']} kappa={row['kappa']}: " + ", ".join(
                    f"{n_} {ms:.3f}" for n_, ms in row["host_ms"].items()))
    print("max rel error vs v1 (dq, dk, dv):")
    for case in results["cases"]:
        for row in case["rows"]:
            if "errors_vs_v1" in row:
                print(f"  S={case['S']} B={case['B']} kappa={row['kappa']}: " + ", ".join(
                    f"{n_} {max(e_.values()):.1e}" for n_, e_ in row["errors_vs_v1"].items())
                    + f"; lib path {row.get('lib_path')}, overlap {row.get('lib_overlap_path')}")
    for name, row in results["correctness"].items():
        print(f"small {name} vs math: " + ", ".join(
            f"{n_} {max(e_.values()):.1e}" if "error" not in e_ else f"{n_} ERROR" for n_, e_ in row.items()
            if isinstance(e_, dict)))
    for case in results["cases"]:
        for row in case["rows"]:
            cands = [(r, n_) for n_, r in row.get("ratios", {}).items() if n_.startswith(("hybrid", "lib"))]
            if case["S"] == 16384 and row.get("kappa") == 0.5 and cands:
                best = min(cands)
                print(f"target S=16k kappa=0.5: best hybrid {best[1]} {best[0]:.3f}x SDPA (target <= 0.45: "
                      f"{'MET' if best[0] <= 0.45 else 'NOT met'}); v1 {row['ratios']['v1']:.3f}x")
    print(f"elapsed {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
