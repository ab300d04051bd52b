"""Fused Triton attention for the token-sparse backward: a varlen causal forward and a kept-token backward.

Token-row layout as in ``ops.attention``: ``q`` [N, H, D], ``k``/``v`` [N, Hkv, D] (GQA: query head ``h``
reads KV head ``h // (H / Hkv)``, never repeated in memory), segments given by ``layout.cu_seqlens``
(contiguous runs of rows; inside a segment rows are in position order, so causality by ``layout.index`` is
causality by row id), optional sliding window (key visible iff ``0 <= t_q - t_k < window``).

Kernels (built lazily on first use, so that ``TRITON_INTERPRET=1`` set by a test before the first call
takes effect and importing this module never imports Triton):

* ``_fwd``: FlashAttention-2 style forward over all rows; grid (segments × query blocks, H). Returns
  o [N, H, D] (input dtype) and lse [N, H] (natural log, fp32; fp64 for fp64 inputs).
* ``_dq``: dQ of the M kept queries against *all* visible keys; grid (segments × kept-query blocks, H).
  Uses the full-row lse and D_i = rowsum(dO_i ∘ O_i), which it computes and stores for ``_dkdv``.
  Exact: the kept-query rows of the dense backward.
* ``_dkdv``: dK, dV of the kept keys from kept queries only; grid (segments × kept-key blocks, Hkv); each
  program loops over the G query heads of its KV group (no atomics).
* ``_dqf`` / ``_kk``: the split backward (no window; not the default): kept queries × filtered keys, then each
  kept pair once with dQ atomics.
* The hybrid backward (one plain causal row, fp16 / bf16 on CUDA, from ``HYBRID_MIN_ROWS`` kept rows on; the
  default there): the kept × kept pairs through cuDNN's causal backward on the compacted kept rows (given the
  full forward's O and lse), plus ``_dqf`` for kept queries × filtered keys; see ``_backward_hybrid``.

Kept rows ``keep`` [M] (sorted flat row ids) are grouped per segment by ``kcu`` [S + 1] =
searchsorted(keep, cu_seqlens): the kept rows of segment s are ``keep[kcu[s]:kcu[s+1]]``. No host
synchronisation: grids are sized from ``layout.max_seqlen`` and M, programs past their segment's end exit.

Work at keep fraction κ (D per head, pairs = visible (query, key) pairs of the full causal problem):
dQ pass ≈ κ · pairs · 3 GEMMs (S = QKᵀ, dP = dO Vᵀ, dQ = dS K), dK/dV pass ≈ κ² · pairs · 4 GEMMs
(S, dP, dV = Pᵀ dO, dK = dSᵀ Q), each GEMM 2·D FLOPs per pair; the dense backward does 5 GEMMs per pair.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from centrifuge.ops.triton_support import interpreting, jit_copies, tl_accumulator, triton_available
from centrifuge.tokens.layout import TokenLayout

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.0 / math.log(2.0)

# Tile configurations per head dim and kernel: (BLOCK_OUT, BLOCK_INNER, num_warps, num_stages), BLOCK_OUT =
# rows one program owns, BLOCK_INNER = rows of the other side per loop step. fwd: queries × keys; dq: kept
# queries × keys; dkdv: kept keys (rows of dK / dV) × kept queries (BLOCK_OUT % BLOCK_INNER == 0). Without a
# sliding window the backward runs dqf (kept queries × filtered keys) and kk (kept keys × kept queries, as
# dkdv, BLOCK_OUT % BLOCK_INNER == 0) instead of dq and dkdv.
DEFAULT_CONFIGS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    # Head dim 64: the fastest of the H100 sweep (benchmarks/results/2026-11-24-h100-attention-kernel, S = 16k,
    # kappa = 0.5, Triton 3.6): 4.55 ms against 5.23 ms with the earlier (128, 32, 8, 3) tiles. Head dim 128:
    # from ptxas resource reports only (sm_90, Triton 3.9 on the CPU machine; the least-spilling tiles, the
    # same 4-warp / 3-stage shape as the 64 winners where it does not spill more); 16 / 32: untimed.
    16: {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dqf": (64, 64, 4, 2),
         "kk": (64, 64, 4, 2)},
    32: {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dqf": (64, 64, 4, 2),
         "kk": (64, 64, 4, 2)},
    # dqf (64, 32, 4, 3): alone at S = 16k, κ = 0.5 0.97 / 1.03 ms against 1.04 / 1.03 for (64, 64, 4, 3) in
    # two runs (benchmarks/results/2026-11-24-h100-attention-hybrid); the split-backward sweep also chose it.
    64: {"fwd": (128, 64, 8, 3), "dq": (64, 64, 4, 3), "dkdv": (64, 32, 4, 3), "dqf": (64, 32, 4, 3),
         "kk": (128, 32, 8, 3)},
    128: {"fwd": (128, 32, 8, 2), "dq": (64, 16, 4, 2), "dkdv": (64, 32, 4, 2), "dqf": (64, 32, 4, 2),
          "kk": (128, 32, 8, 2)},
}


# --------------------------------------------------------------------------------------------------------
# Kernels: plain functions, decorated by ``_kernels`` (``tl`` is bound there).
# --------------------------------------------------------------------------------------------------------

tl: Any = None  # triton.language, bound in the kernels' own namespace by ``_kernels``


# Reductions through tl.reduce with our own combine functions: Triton's tl.max / tl.sum / tl.zeros are
# themselves @jit functions, decorated when Triton was imported, so under TRITON_INTERPRET=1 set after that
# import they would not run in the interpreter; ours are decorated in ``_kernels``.
def _max_combine(a, b):
    return tl.maximum(a, b)


def _sum_combine(a, b):
    return a + b


def _fwd_inner(acc, m_i, l_i, q, K, V, qpos, n_lo, n_hi, load_hi, sm_scale_log2, WINDOW, stride_kn,
               HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
               PREC: tl.constexpr):
    # K, V: pointers to (row 0, this KV head); rows n_lo .. n_hi (int32 row ids) in BLOCK_N steps.
    offs_n = tl.arange(0, BLOCK_N)
    offs_kd = offs_n[:, None] * stride_kn + tl.arange(0, HEAD_D)[None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        kb = tl.cast(n0, tl.int64) * stride_kn
        if MASK:
            kin = (n0 + offs_n) < load_hi
            k = tl.load(K + kb + offs_kd, mask=kin[:, None], other=0.0)
            v = tl.load(V + kb + offs_kd, mask=kin[:, None], other=0.0)
        else:
            k = tl.load(K + kb + offs_kd)
            v = tl.load(V + kb + offs_kd)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC).to(acc.dtype) * sm_scale_log2
        if MASK:
            krow = n0 + offs_n
            vis = (krow[None, :] <= qpos[:, None]) & (krow[None, :] < load_hi)
            if HAS_WINDOW:
                vis = vis & (qpos[:, None] - krow[None, :] < WINDOW)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_combine))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(acc.dtype)
        m_i = m_new
    return acc, m_i, l_i


def _fwd(Q, K, V, OUT, LSE, CU, sm_scale_log2, stride_qn, stride_qh, stride_kn, stride_kh, stride_on,
         stride_oh, H, G, NMB, WINDOW, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seg = pid // NMB
    mb = NMB - 1 - pid % NMB  # the longest causal rows first
    seg_start = tl.load(CU + seg)
    seg_end = tl.load(CU + seg + 1)
    q_start = seg_start + mb * BLOCK_M
    if q_start >= seg_end:
        return
    q_end = tl.minimum(q_start + BLOCK_M, seg_end)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    qvalid = (q_start + offs_m) < q_end
    q_base = q_start.to(tl.int64) * stride_qn + h * stride_qh
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qvalid[:, None], other=0.0)
    qpos = tl.minimum(q_start + offs_m, q_end - 1)  # rows past the segment act as its last row (never stored)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.full([BLOCK_M], 0.0, ACC)
    acc = tl.full([BLOCK_M, HEAD_D], 0.0, ACC)
    k_head = (h // G) * stride_kh
    if HAS_WINDOW:
        lo = tl.maximum(seg_start, q_start - WINDOW + 1)
        full_end = lo
    else:
        lo = seg_start
        full_end = seg_start + ((q_start - seg_start + 1) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + k_head, V + k_head, qpos, lo, full_end, q_end,
                               sm_scale_log2, WINDOW, stride_kn, HEAD_D, BLOCK_N, False, HAS_WINDOW, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + k_head, V + k_head, qpos, full_end, q_end, q_end,
                               sm_scale_log2, WINDOW, stride_kn, HEAD_D, BLOCK_N, True, HAS_WINDOW, PREC)
    o = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    o_base = q_start.to(tl.int64) * stride_on + h * stride_oh
    tl.store(OUT + o_base + offs_m[:, None] * stride_on + offs_d[None, :], o.to(OUT.dtype.element_ty),
             mask=qvalid[:, None])
    tl.store(LSE + q_start.to(tl.int64) * H + h + offs_m * H, lse.to(LSE.dtype.element_ty), mask=qvalid)


def _dq_inner(dq, q, do, lse2, delta, K, V, qrow, n_lo, n_hi, load_hi, sm_scale_log2, WINDOW, stride_kn,
              HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
              PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_kd = offs_n[:, None] * stride_kn + tl.arange(0, HEAD_D)[None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        kb = tl.cast(n0, tl.int64) * stride_kn
        if MASK:
            kin = (n0 + offs_n) < load_hi
            k = tl.load(K + kb + offs_kd, mask=kin[:, None], other=0.0)
            v = tl.load(V + kb + offs_kd, mask=kin[:, None], other=0.0)
        else:
            k = tl.load(K + kb + offs_kd)
            v = tl.load(V + kb + offs_kd)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC).to(dq.dtype)
        p = tl.math.exp2(qk * sm_scale_log2 - lse2[:, None])
        if MASK:
            krow = n0 + offs_n
            vis = (krow[None, :] <= qrow[:, None]) & (krow[None, :] < load_hi)
            if HAS_WINDOW:
                vis = vis & (qrow[:, None] - krow[None, :] < WINDOW)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(dq.dtype)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(dq.dtype)
    return dq


def _dq(Q, K, V, OUT, DO, LSE, DELTA, DQ, KEEP, CU, KCU, sm_scale, sm_scale_log2, stride_kn, stride_kh,
        H, G, NQB, WINDOW, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    # Q, OUT, DO, DQ: compact [M, H, HEAD_D] contiguous; LSE, DELTA: [M, H]; KEEP: [M] int32 row ids.
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seg = pid // NQB
    b = NQB - 1 - pid % NQB
    kstart = tl.load(KCU + seg)
    kend = tl.load(KCU + seg + 1)
    j0 = kstart + b * BLOCK_M
    if j0 >= kend:
        return
    seg_start = tl.load(CU + seg)
    j_last = tl.minimum(j0 + BLOCK_M, kend) - 1
    row_min = tl.load(KEEP + j0)
    row_max = tl.load(KEEP + j_last)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    jvalid = (j0 + offs_m) < kend
    qrow = tl.load(KEEP + j0 + offs_m, mask=jvalid, other=0)
    qrow = tl.where(jvalid, qrow, row_max)
    base = j0.to(tl.int64) * (H * HEAD_D) + h * HEAD_D
    offs_qd = offs_m[:, None] * (H * HEAD_D) + offs_d[None, :]
    q = tl.load(Q + base + offs_qd, mask=jvalid[:, None], other=0.0)
    do = tl.load(DO + base + offs_qd, mask=jvalid[:, None], other=0.0)
    o = tl.load(OUT + base + offs_qd, mask=jvalid[:, None], other=0.0)
    lbase = j0.to(tl.int64) * H + h
    lse2 = tl.load(LSE + lbase + offs_m * H, mask=jvalid, other=float("inf")).to(ACC) * 1.4426950408889634
    delta = tl.reduce(do.to(ACC) * o.to(ACC), 1, _sum_combine)
    tl.store(DELTA + lbase + offs_m * H, delta.to(DELTA.dtype.element_ty), mask=jvalid)
    dq = tl.full([BLOCK_M, HEAD_D], 0.0, ACC)
    k_head = (h // G) * stride_kh
    if HAS_WINDOW:
        lo = tl.maximum(seg_start, row_min - WINDOW + 1)
        full_end = lo
    else:
        lo = seg_start
        full_end = seg_start + ((row_min - seg_start + 1) // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, K + k_head, V + k_head, qrow, lo, full_end, row_max + 1,
                   sm_scale_log2, WINDOW, stride_kn, HEAD_D, BLOCK_N, False, HAS_WINDOW, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, K + k_head, V + k_head, qrow, full_end, row_max + 1, row_max + 1,
                   sm_scale_log2, WINDOW, stride_kn, HEAD_D, BLOCK_N, True, HAS_WINDOW, PREC)
    dq = dq * sm_scale
    tl.store(DQ + base + offs_qd, dq.to(DQ.dtype.element_ty), mask=jvalid[:, None])


def _dkdv_inner(dk, dv, k, v, krow, Q, DO, LSE, DELTA, KEEP, m_lo, m_hi, kend, sm_scale_log2, WINDOW, H,
                HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                PREC: tl.constexpr):
    # Q, DO: pointers to (compact row 0, this query head); LSE, DELTA likewise.
    offs_m = tl.arange(0, BLOCK_M)
    offs_qd = offs_m[:, None] * (H * HEAD_D) + tl.arange(0, HEAD_D)[None, :]
    for m0 in range(m_lo, m_hi, BLOCK_M):
        mvalid = (m0 + offs_m) < kend
        qb = tl.cast(m0, tl.int64) * (H * HEAD_D)
        lb = tl.cast(m0, tl.int64) * H
        q = tl.load(Q + qb + offs_qd, mask=mvalid[:, None], other=0.0)
        do = tl.load(DO + qb + offs_qd, mask=mvalid[:, None], other=0.0)
        lse2 = tl.load(LSE + lb + offs_m * H, mask=mvalid, other=float("inf")).to(dk.dtype) * 1.4426950408889634
        delta = tl.load(DELTA + lb + offs_m * H, mask=mvalid, other=0.0).to(dk.dtype)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC).to(dk.dtype)  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(qkT * sm_scale_log2 - lse2[None, :])
        if MASK:
            qrow = tl.load(KEEP + m0 + offs_m, mask=mvalid, other=0)
            vis = (krow[:, None] <= qrow[None, :]) & mvalid[None, :]
            if HAS_WINDOW:
                vis = vis & (qrow[None, :] - krow[:, None] < WINDOW)
            pT = tl.where(vis, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC).to(dv.dtype)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC).to(dk.dtype)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC).to(dk.dtype)
    return dk, dv


def _dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KEEP, KCU, sm_scale, sm_scale_log2, stride_kn, stride_kh,
          H, HKV, G, NKB, WINDOW, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    # Q, DO: compact [M, H, HEAD_D]; LSE, DELTA: [M, H]; DK, DV: compact [M, HKV, HEAD_D] contiguous;
    # KEEP: [M] int32 row ids.
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    seg = pid // NKB
    b = NKB - 1 - pid % NKB
    kstart = tl.load(KCU + seg)
    kend = tl.load(KCU + seg + 1)
    j0 = kstart + b * BLOCK_N
    if j0 >= kend:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    nvalid = (j0 + offs_n) < kend
    krow = tl.load(KEEP + j0 + offs_n, mask=nvalid, other=0)
    kptr = krow.to(tl.int64)[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kptr, mask=nvalid[:, None], other=0.0)
    v = tl.load(V + kptr, mask=nvalid[:, None], other=0.0)
    dk = tl.full([BLOCK_N, HEAD_D], 0.0, ACC)
    dv = tl.full([BLOCK_N, HEAD_D], 0.0, ACC)
    diag_end = tl.minimum(j0 + BLOCK_N, kend)
    if HAS_WINDOW:  # noqa: SIM108
        # kept rows are distinct and increasing, so a query WINDOW or more compact slots past the
        # block's last key is at least WINDOW rows past it: invisible.
        m_hi = tl.minimum(kend, diag_end - 1 + WINDOW)
    else:
        m_hi = kend
    for g in range(G):
        h = hk * G + g
        Qh = Q + h * HEAD_D
        DOh = DO + h * HEAD_D
        if HAS_WINDOW:
            dk, dv = _dkdv_inner(dk, dv, k, v, krow, Qh, DOh, LSE + h, DELTA + h, KEEP, j0, m_hi, kend,
                                 sm_scale_log2, WINDOW, H, HEAD_D, BLOCK_M, True, HAS_WINDOW, PREC)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, krow, Qh, DOh, LSE + h, DELTA + h, KEEP, j0, diag_end, kend,
                                 sm_scale_log2, WINDOW, H, HEAD_D, BLOCK_M, True, HAS_WINDOW, PREC)
            dk, dv = _dkdv_inner(dk, dv, k, v, krow, Qh, DOh, LSE + h, DELTA + h, KEEP, j0 + BLOCK_N, m_hi,
                                 kend, sm_scale_log2, WINDOW, H, HEAD_D, BLOCK_M, False, HAS_WINDOW, PREC)
    dk = dk * sm_scale
    obase = j0.to(tl.int64) * (HKV * HEAD_D) + hk * HEAD_D
    optr = obase + offs_n[:, None] * (HKV * HEAD_D) + offs_d[None, :]
    tl.store(DK + optr, dk.to(DK.dtype.element_ty), mask=nvalid[:, None])
    tl.store(DV + optr, dv.to(DV.dtype.element_ty), mask=nvalid[:, None])


# ---- kept-token backward without recompute (no sliding window): the filtered-key dQ pass + the kept-kept pass ----


def _dqf_inner(dq, q, do, lse2, delta, K, V, DROP, qrow, f_lo, f_hi, load_hi, sm_scale_log2, stride_kn,
               HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    # Keys: filtered rows DROP[f_lo:f_hi] (sorted int32 row ids), gathered row by row; K, V point at this
    # KV head. Unmasked blocks: every key row below every query row of the block.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    for f0 in range(f_lo, f_hi, BLOCK_N):
        if MASK:
            fin = (f0 + offs_n) < load_hi
            krow = tl.load(DROP + f0 + offs_n, mask=fin, other=0)
            kp = krow.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
            k = tl.load(K + kp, mask=fin[:, None], other=0.0)
            v = tl.load(V + kp, mask=fin[:, None], other=0.0)
        else:
            krow = tl.load(DROP + f0 + offs_n)
            kp = krow.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
            k = tl.load(K + kp)
            v = tl.load(V + kp)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC).to(dq.dtype)
        p = tl.math.exp2(qk * sm_scale_log2 - lse2[:, None])
        if MASK:
            vis = (krow[None, :] <= qrow[:, None]) & fin[None, :]
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(dq.dtype)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(dq.dtype)
    return dq


def _dqf(Q, K, V, OUT, DO, LSE, DELTA, DQACC, KEEP, DROP, CU, KCU, sm_scale, sm_scale_log2, stride_kn,
         stride_kh, H, G, NSEG, NQB, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         PREC: tl.constexpr, ACC: tl.constexpr, ADD_DQ: tl.constexpr = False):
    # dQ of kept queries against the *filtered* keys of their segment (the kept keys are ``_kk``'s), scaled,
    # stored to DQACC [M, H, HEAD_D] (fp32 / fp64) for ``_kk`` to add to; D_i = rowsum(dO ∘ O) to DELTA.
    # ADD_DQ (the hybrid backward): DQACC already holds the kept-key part of dQ (any float dtype, e.g. bf16
    # from cuDNN); this kernel adds its part to it in place (one rounding to DQACC's dtype).
    # Filtered index of a row r: f(r) = r - #(kept rows < r); so the filtered rows of the segment start at
    # seg_start - kstart, those below the block's first kept row end at row_min - j0, and those below its last
    # kept row at row_max - j_last. Programs: block-major, the blocks with the most keys first.
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = NQB - 1 - pid // NSEG
    seg = pid % NSEG
    kstart = tl.load(KCU + seg)
    kend = tl.load(KCU + seg + 1)
    j0 = kstart + b * BLOCK_M
    if j0 >= kend:
        return
    seg_start = tl.load(CU + seg)
    j_last = tl.minimum(j0 + BLOCK_M, kend) - 1
    row_min = tl.load(KEEP + j0)
    row_max = tl.load(KEEP + j_last)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    jvalid = (j0 + offs_m) < kend
    qrow = tl.load(KEEP + j0 + offs_m, mask=jvalid, other=0)
    qrow = tl.where(jvalid, qrow, row_max)
    base = j0.to(tl.int64) * (H * HEAD_D) + h * HEAD_D
    offs_qd = offs_m[:, None] * (H * HEAD_D) + offs_d[None, :]
    q = tl.load(Q + base + offs_qd, mask=jvalid[:, None], other=0.0)
    do = tl.load(DO + base + offs_qd, mask=jvalid[:, None], other=0.0)
    o = tl.load(OUT + base + offs_qd, mask=jvalid[:, None], other=0.0)
    lbase = j0.to(tl.int64) * H + h
    lse2 = tl.load(LSE + lbase + offs_m * H, mask=jvalid, other=float("inf")).to(ACC) * 1.4426950408889634
    delta = tl.reduce(do.to(ACC) * o.to(ACC), 1, _sum_combine)
    tl.store(DELTA + lbase + offs_m * H, delta.to(DELTA.dtype.element_ty), mask=jvalid)
    dq = tl.full([BLOCK_M, HEAD_D], 0.0, ACC)
    k_head = (h // G) * stride_kh
    f_lo = seg_start - kstart
    f_full = row_min - j0
    f_hi = row_max - j_last
    f_full_end = f_lo + ((f_full - f_lo) // BLOCK_N) * BLOCK_N
    dq = _dqf_inner(dq, q, do, lse2, delta, K + k_head, V + k_head, DROP, qrow, f_lo, f_full_end, f_hi,
                    sm_scale_log2, stride_kn, HEAD_D, BLOCK_N, False, PREC)
    dq = _dqf_inner(dq, q, do, lse2, delta, K + k_head, V + k_head, DROP, qrow, f_full_end, f_hi, f_hi,
                    sm_scale_log2, stride_kn, HEAD_D, BLOCK_N, True, PREC)
    dq = dq * sm_scale
    if ADD_DQ:
        dq += tl.load(DQACC + base + offs_qd, mask=jvalid[:, None], other=0.0).to(ACC)
    tl.store(DQACC + base + offs_qd, dq.to(DQACC.dtype.element_ty), mask=jvalid[:, None])


def _kk_inner(dk, dv, k, v, krow, Q, DO, LSE, DELTA, DQACC, KEEP, m_lo, m_hi, kend, sm_scale, sm_scale_log2, H,
              HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, DQ_TRANS: tl.constexpr,
              PREC: tl.constexpr):
    # Q, DO, DQACC: pointers to (compact row 0, this query head); LSE, DELTA likewise.
    offs_m = tl.arange(0, BLOCK_M)
    offs_qd = offs_m[:, None] * (H * HEAD_D) + tl.arange(0, HEAD_D)[None, :]
    for m0 in range(m_lo, m_hi, BLOCK_M):
        mvalid = (m0 + offs_m) < kend
        qb = tl.cast(m0, tl.int64) * (H * HEAD_D)
        lb = tl.cast(m0, tl.int64) * H
        q = tl.load(Q + qb + offs_qd, mask=mvalid[:, None], other=0.0)
        do = tl.load(DO + qb + offs_qd, mask=mvalid[:, None], other=0.0)
        lse2 = tl.load(LSE + lb + offs_m * H, mask=mvalid, other=float("inf")).to(dk.dtype) * 1.4426950408889634
        delta = tl.load(DELTA + lb + offs_m * H, mask=mvalid, other=0.0).to(dk.dtype)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC).to(dk.dtype)  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(qkT * sm_scale_log2 - lse2[None, :])
        if MASK:
            qrow = tl.load(KEEP + m0 + offs_m, mask=mvalid, other=0)
            vis = (krow[:, None] <= qrow[None, :]) & mvalid[None, :]
            pT = tl.where(vis, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC).to(dv.dtype)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC).to(dk.dtype)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q, input_precision=PREC).to(dk.dtype)
        if DQ_TRANS:  # dQᵀ = Kᵀ dSᵀ: M = HEAD_D rows for the MMA when BLOCK_M is too short for wgmma
            dq = tl.trans(tl.dot(tl.trans(k), dsT, input_precision=PREC).to(dk.dtype))
        else:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PREC).to(dk.dtype)
        dq = dq * sm_scale  # [BLOCK_M, HEAD_D]
        tl.atomic_add(DQACC + qb + offs_qd, dq, mask=mvalid[:, None], sem="relaxed")
    return dk, dv


def _kk(Q, K, V, DO, LSE, DELTA, DQACC, DK, DV, KEEP, KCU, sm_scale, sm_scale_log2, stride_kn, stride_kh,
        H, HKV, G, NSEG, NKB, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DQ_TRANS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    # Kept keys × kept queries, each (query, key) pair once: dK, dV of a block of kept keys (summed over the G
    # query heads of the KV head, in registers) and the pair's dQ contribution, added to DQACC atomically.
    # Programs: block-major, the first blocks of each segment (the most queries) first.
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = pid // NSEG
    seg = pid % NSEG
    kstart = tl.load(KCU + seg)
    kend = tl.load(KCU + seg + 1)
    j0 = kstart + b * BLOCK_N
    if j0 >= kend:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    nvalid = (j0 + offs_n) < kend
    krow = tl.load(KEEP + j0 + offs_n, mask=nvalid, other=0)
    kptr = krow.to(tl.int64)[:, None] * stride_kn + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kptr, mask=nvalid[:, None], other=0.0)
    v = tl.load(V + kptr, mask=nvalid[:, None], other=0.0)
    dk = tl.full([BLOCK_N, HEAD_D], 0.0, ACC)
    dv = tl.full([BLOCK_N, HEAD_D], 0.0, ACC)
    diag_end = tl.minimum(j0 + BLOCK_N, kend)
    for g in range(G):
        h = hk * G + g
        dk, dv = _kk_inner(dk, dv, k, v, krow, Q + h * HEAD_D, DO + h * HEAD_D, LSE + h, DELTA + h,
                           DQACC + h * HEAD_D, KEEP, j0, diag_end, kend, sm_scale, sm_scale_log2, H, HEAD_D,
                           BLOCK_M, True, DQ_TRANS, PREC)
        dk, dv = _kk_inner(dk, dv, k, v, krow, Q + h * HEAD_D, DO + h * HEAD_D, LSE + h, DELTA + h,
                           DQACC + h * HEAD_D, KEEP, j0 + BLOCK_N, kend, kend, sm_scale, sm_scale_log2, H,
                           HEAD_D, BLOCK_M, False, DQ_TRANS, PREC)
    dk = dk * sm_scale
    obase = j0.to(tl.int64) * (HKV * HEAD_D) + hk * HEAD_D
    optr = obase + offs_n[:, None] * (HKV * HEAD_D) + offs_d[None, :]
    tl.store(DK + optr, dk.to(DK.dtype.element_ty), mask=nvalid[:, None])
    tl.store(DV + optr, dv.to(DV.dtype.element_ty), mask=nvalid[:, None])


_KERNEL_NAMES = ("_max_combine", "_sum_combine", "_fwd_inner", "_fwd", "_dq_inner", "_dq", "_dkdv_inner", "_dkdv",
                 "_dqf_inner", "_dqf", "_kk_inner", "_kk")


@functools.cache
def _kernels(interpret: bool) -> dict[str, Any]:
    """The jitted kernels, once per interpreter mode (``interpret`` keys the cache; see ``triton_support``)."""
    k = jit_copies(globals(), _KERNEL_NAMES)
    return {"fwd": k["_fwd"], "dq": k["_dq"], "dkdv": k["_dkdv"], "dqf": k["_dqf"], "kk": k["_kk"]}


def _precision_args(dtype: torch.dtype):
    """(PREC, ACC) constexprs: full-precision dots for fp32/fp64 inputs (the flag only matters for fp32
    operands), and the accumulator (fp64 for fp64, else fp32)."""
    return ("ieee" if dtype in (torch.float32, torch.float64) else "tf32"), tl_accumulator(dtype)


# --------------------------------------------------------------------------------------------------------
# Forward through the dense model's own SDPA kernels (plain causal rows): output and log-sum-exp
# --------------------------------------------------------------------------------------------------------

# Tried in this order by ``sdpa_forward="auto"``: cuDNN and FlashAttention-2 with native GQA (K / V with
# Hkv heads), then cuDNN on K / V repeated to H heads (costs a copy of K and V).
SDPA_FORWARDS = ("cudnn", "flash", "cudnn_repeat")
_SDPA_STATUS: dict[tuple, str] = {}  # (impl, device, dtype, H, Hkv, D) -> "ok" or why not (self-check)


def plain_causal_rows(layout: TokenLayout) -> bool:
    """True when every batch row is one causal sequence (no packing, padding or sliding window).

    Sync-free: segments never cross batch rows and every row has at least one, so B segments means one
    per row, i.e. ``cu_seqlens == [0, T, 2T, ...]`` (a padded row of T >= 2 has one segment per padding
    token; a row of one padding token attends to itself, as plain causal attention does)."""
    return (layout.contiguous and layout.sliding_window is None
            and layout.cu_seqlens.numel() == layout.batch + 1)


def _sdpa_forward(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, B: int, T: int, scale: float):
    """One SDPA kernel on [B, T] plain causal rows: q [N, H, D], k / v [N, Hkv, D] (N = B·T) →
    o [N, H, D] (q's dtype), lse [N, H] fp32 (natural log of the softmax denominators, scale included)."""
    N, H, D = q.shape
    Hkv = k.shape[1]
    qb = q.view(B, T, H, D).transpose(1, 2)
    kb = k.view(B, T, Hkv, D).transpose(1, 2)
    vb = v.view(B, T, Hkv, D).transpose(1, 2)
    if impl.endswith("_repeat") and Hkv != H:
        kb, vb = kb.repeat_interleave(H // Hkv, dim=1), vb.repeat_interleave(H // Hkv, dim=1)
    if impl.startswith("cudnn"):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False,
                                                                 scale=scale)
    elif impl == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, True, False, scale=scale)
    elif impl == "flash_cpu":  # tests on the CPU machine: the same plumbing around the CPU flash kernel
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, True, scale=scale)
    else:
        raise ValueError(f"unknown SDPA forward {impl!r}; choose from {SDPA_FORWARDS}")
    ob, lse = out[0], out[1]
    if tuple(ob.shape) != (B, H, T, D) or ob.dtype != q.dtype:
        raise RuntimeError(f"SDPA {impl}: output {tuple(ob.shape)} {ob.dtype}, expected {(B, H, T, D)} {q.dtype}")
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (B, H) or lse.shape[2] < T or lse.dtype != lse_dtype:
        raise RuntimeError(f"SDPA {impl}: log-sum-exp {tuple(lse.shape)} {lse.dtype}, expected {(B, H, T)} "
                           f"{lse_dtype}")
    o = ob.transpose(1, 2).reshape(N, H, D).contiguous()
    lse = lse[:, :, :T].transpose(1, 2).reshape(N, H).contiguous()
    return o, lse


def sdpa_forward_status() -> dict[tuple, str]:
    """Self-check results so far: (impl, device, dtype, H, Hkv, D) → "ok" or why the path is not used."""
    return dict(_SDPA_STATUS)


def _sdpa_self_check(impl: str, device: torch.device, dtype: torch.dtype, H: int, Hkv: int, D: int) -> str:
    """Run ``impl`` once on a small random problem against an fp32 reference: "ok" or the reason it failed
    (an exception, or o / lse off: a wrong lse would give wrong gradients without an error)."""
    return _cached_check(_SDPA_STATUS, _sdpa_check_once, impl, device, dtype, H, Hkv, D)


def _cached_check(cache: dict[tuple, str], check_once, impl: str, device: torch.device, dtype: torch.dtype,
                  H: int, Hkv: int, D: int) -> str:
    """``check_once(impl, device, dtype, H, Hkv, D)`` run once per key (no grad, no autocast) and its verdict
    cached in ``cache``: "ok", what it reported, or the exception it raised (not available in this build /
    for these shapes). Never during a CUDA graph capture (not cached then: checked on a later call)."""
    key = (impl, str(device), dtype, H, Hkv, D)
    if key not in cache:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return "not checked yet (CUDA graph capture in progress)"
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                cache[key] = check_once(impl, device, dtype, H, Hkv, D)
        except Exception as e:
            cache[key] = f"{type(e).__name__}: {str(e)[:300]}"
    return cache[key]


def _sdpa_check_once(impl: str, device: torch.device, dtype: torch.dtype, H: int, Hkv: int, D: int) -> str:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    B, T = 2, 136  # not a multiple of any tile
    q = torch.randn(B * T, H, D, generator=gen).to(device, dtype)
    k = torch.randn(B * T, Hkv, D, generator=gen).to(device, dtype)
    v = torch.randn(B * T, Hkv, D, generator=gen).to(device, dtype)
    scale = D ** -0.5
    o, lse = _sdpa_forward(impl, q, k, v, B, T, scale)
    qf = q.double().view(B, T, H, D).transpose(1, 2)  # float64: no TF32 in the reference
    kf = k.double().view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    vf = v.double().view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    sc = (qf @ kf.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=device).tril(), float("-inf"))
    lse_ref = torch.logsumexp(sc, -1)
    o_ref = (torch.softmax(sc, -1) @ vf).transpose(1, 2).reshape(B * T, H, D)
    lse_ref = lse_ref.transpose(1, 2).reshape(B * T, H)
    o_err = ((o.double() - o_ref).norm() / o_ref.norm()).item()
    lse_err = (lse - lse_ref).abs().max().item()
    if not (o_err < 2e-2 and lse_err < 1e-2):  # NaN fails too
        return f"self-check failed: o rel err {o_err:.2e}, lse max abs err {lse_err:.2e}"
    return "ok"


# --------------------------------------------------------------------------------------------------------
# Hybrid backward on one plain causal row: the kept × kept pairs through cuDNN's causal attention backward
# --------------------------------------------------------------------------------------------------------
#
# Kept rows are sorted row ids, so the kept rows of one causal sequence, compacted, are again a plain causal
# sequence: kept query i sees kept key j iff j <= i in compact order. The kept × kept part of the token-sparse
# backward is therefore the ordinary causal backward on the compacted rows, provided the kernel is given the
# log-sum-exp of the *full* forward (then P = exp(S − lse) are the true probabilities) and the full-forward
# output O of the kept rows (then D_i = rowsum(dO ∘ O) is right); cuDNN's backward op takes both as inputs. It
# gives dK, dV of the kept keys exactly (only kept queries carry gradient) and the part of dQ from kept keys;
# ``_dqf`` (kept queries × filtered keys) adds the rest of dQ. No recompute and no atomics on our side, and the
# kept × kept GEMMs run in cuDNN's Hopper kernel (H100, S = 16k, κ = 0.5: 1.73 ms for m = 8192 kept rows,
# about 400 TFLOP/s on the FlashAttention count; ``_dqf`` ≈ 420 on its 3 GEMMs per pair).
#
# One batch row only (B = 1): with B > 1 the rows keep different counts, so one dense call needs the rows
# padded to the longest count (a host sync plus copies: measured slower than version 1 at 8 × 2048), and
# PyTorch 2.11's ragged (cum_seq) cuDNN backward returned wrong gradients and then faulted (illegal memory
# access) when given kept-row offsets (benchmarks/results/2026-11-24-h100-attention-hybrid).

KEPT_BACKWARDS = ("cudnn",)  # tried by kept_backward="auto" (one for now)
# "auto" takes the hybrid from this many kept rows on. A call costs 0.8-1.7 ms of host time (measured at 16k
# and 32k; version 1: 0.3-0.7), hidden where the GPU work is longer, not on small problems: at 1 × 4096
# (M = 1229-2867) the hybrid took 0.80-0.94 ms in one run and 0.35-0.52 ms in another (another machine)
# against 0.39-0.88 ms for version 1, although its pieces' GPU time was 0.21-0.43 ms; at 1 × 16384 with
# M = 4915 it took 1.63-1.80 ms against 2.25 in every run.
HYBRID_MIN_ROWS = 4096
_KEPT_STATUS: dict[tuple, str] = {}  # (impl, device, dtype, H, Hkv, D) -> "ok" or why not (self-check)
# cuDNN builds one execution graph per problem shape (60-110 ms on the H100) and caches it. A constant kept
# count (top-k selection) needs one graph; a count that changes every step (threshold selection) would build
# one per step, so after EXACT_SIZES distinct counts the compact rows are zero-padded at the end up to a
# multiple of ROUND_ROWS (at most T / ROUND_ROWS graphs per T; padded queries have dO = 0, so P·dO = 0 and
# dS = 0, and padded keys come after every real query, which never sees them).
EXACT_SIZES = 8
ROUND_ROWS = 256
_DENSE_ROWS: dict[tuple, set[int]] = {}  # (device, dtype, H, Hkv, D) -> row counts of the calls made so far


def _dense_rows(key: tuple, M: int) -> int:
    """Rows of the dense cuDNN call for M kept rows: M itself for the first EXACT_SIZES distinct counts (and for
    any count seen before), then M rounded up to a multiple of ROUND_ROWS."""
    seen = _DENSE_ROWS.setdefault(key, set())
    m = M if M in seen or len(seen) < EXACT_SIZES else -(-M // ROUND_ROWS) * ROUND_ROWS
    seen.add(m)
    return m


def _kept_pairs_backward(impl: str, do_k, q, k_k, v_k, o, lse, rows: int, scale: float):
    """Causal attention backward on the compacted kept rows of one plain causal row.

    Args:
        do_k, q, o: [M, H, D] kept rows (o from the full forward); k_k, v_k: [M, Hkv, D] the kept rows' keys
        and values; lse: [M, H] fp32 of the full forward; rows: m >= M, the call's sequence length (rows past M
        are zero padding); impl: "cudnn", or "flash_cpu" (tests: PyTorch's CPU flash kernel, same contract).
    Returns:
        dq [M, H, D] contiguous (the part from kept keys), dk, dv [M, Hkv, D] (the whole kept-key gradients).
    """
    M, H, D = q.shape
    m = rows

    def heads_first(x):  # [M, h(, D)] -> [1, h, m(, D)] (a view when m == M), zero rows appended
        if m > M:
            x = torch.cat([x, x.new_zeros(m - M, *x.shape[1:])])
        return x.unsqueeze(0).transpose(1, 2)

    def kept_rows(x):  # [1, h, m, D] -> [M, h, D]: a view of the first M rows (BSHD strides from heads_first)
        return x.transpose(1, 2)[0, :M]

    args = (heads_first(do_k), heads_first(q), heads_first(k_k), heads_first(v_k), heads_first(o))
    lse_b = heads_first(lse).contiguous()  # [1, H, m] fp32
    if impl == "cudnn":
        no_rng = torch.empty((), dtype=torch.int64, device=q.device)  # philox seed / offset: unused, no dropout
        out = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            *args, lse_b.unsqueeze(-1), no_rng, no_rng, None, None, None, m, m, 0.0, True, scale=scale)
    elif impl == "flash_cpu":
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, lse_b, 0.0, True,
                                                                                  scale=scale)
    else:
        raise ValueError(f"unknown kept-pairs backward {impl!r}; choose from {KEPT_BACKWARDS} or flash_cpu")
    return kept_rows(out[0]).contiguous(), kept_rows(out[1]).contiguous(), kept_rows(out[2]).contiguous()


def _backward_hybrid(impl: str, do_k, q, k, v, o, lse, keep, layout: TokenLayout, scale: float,
                     cfg: tuple[int, int, int, int], rows: int | None = None,
                     stream: torch.cuda.Stream | None = None):
    """Kept-token backward of one plain causal row: the kept × kept pairs through ``_kept_pairs_backward``,
    kept queries × filtered keys through ``_dqf``.

    Args:
        do_k, q, o: [M, H, D] contiguous kept rows; lse: [M, H] of the full forward; k, v: [N, Hkv, D]
        contiguous, all rows; keep: [M] sorted unique row ids; layout: one plain causal row (B = 1);
        cfg: the ``dqf`` tile; rows: the dense call's length (default ``_dense_rows``);
        stream: None: ``_dqf`` runs after the dense backward and adds its part to that dQ in place; a CUDA
        stream: ``_dqf`` runs on it, overlapping the dense backward, into its own buffer, added at the end.
    Returns:
        dq [M, H, D], dk [M, Hkv, D], dv [M, Hkv, D].
    """
    M, H, D = q.shape
    N, Hkv = layout.num_rows, k.shape[1]
    if layout.batch != 1:
        raise ValueError(f"the hybrid backward takes one batch row, got {layout.batch}")
    if rows is None:
        rows = _dense_rows((str(q.device), q.dtype, H, Hkv, D), M)
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)  # [0, N]
    kcu = torch.searchsorted(keep, cu.to(keep.dtype)).to(torch.int32)  # [0, M], without a host sync
    keep32 = keep.to(torch.int32).contiguous()
    BM, BN, warps, stages = cfg
    nqb = triton_cdiv(M, BM)
    prec, acc = _precision_args(q.dtype)
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32

    def filtered_key_dq(dq, add: bool):  # dq += (or =) kept queries × filtered keys
        drop = filtered_rows(keep32, N)
        delta = torch.empty(M, H, dtype=acc_t, device=q.device)  # D_i, written by the kernel, unused here
        _kernels(interpreting())["dqf"][(nqb, H)](
            q, k, v, o, do_k, lse, delta, dq, keep32, drop, cu, kcu, scale, scale * _LOG2E, k.stride(0),
            k.stride(1), H, H // Hkv, 1, nqb, HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=prec, ACC=acc, ADD_DQ=add,
            num_warps=warps, num_stages=stages,
        )
        return drop, delta

    k_k, v_k = k.index_select(0, keep), v.index_select(0, keep)
    if stream is None:
        dq, dk, dv = _kept_pairs_backward(impl, do_k, q, k_k, v_k, o, lse, rows, scale)
        filtered_key_dq(dq, add=True)
        return dq.to(do_k.dtype), dk, dv
    main = torch.cuda.current_stream(q.device)
    stream.wait_stream(main)  # inputs ready
    with torch.cuda.stream(stream):
        dq_f = torch.empty(M, H, D, dtype=q.dtype, device=q.device)
        side_tensors = (dq_f, *filtered_key_dq(dq_f, add=False))
    dq, dk, dv = _kept_pairs_backward(impl, do_k, q, k_k, v_k, o, lse, rows, scale)
    main.wait_stream(stream)
    for t in (*side_tensors, q, k, v, o, do_k, lse, keep32, cu, kcu):
        t.record_stream(stream)  # allocator: no reuse before the side stream's work is done
    for t in side_tensors:
        t.record_stream(main)
    return dq.add_(dq_f).to(do_k.dtype), dk, dv


def kept_backward_status() -> dict[tuple, str]:
    """Self-check results so far: (impl, device, dtype, H, Hkv, D) → "ok" or why the hybrid is not used."""
    return dict(_KEPT_STATUS)


def _kept_backward_self_check(impl: str, device: torch.device, dtype: torch.dtype, H: int, Hkv: int,
                              D: int) -> str:
    """Run the hybrid backward with ``impl`` once on small random problems against a float64 reference: "ok"
    or why not (an exception, or gradients off: a build that misreads the log-sum-exp would give wrong
    gradients without an error)."""
    return _cached_check(_KEPT_STATUS, _kept_check_once, impl, device, dtype, H, Hkv, D)


def _kept_check_once(impl: str, device: torch.device, dtype: torch.dtype, H: int, Hkv: int, D: int) -> str:
    from centrifuge.ops.attention import MathAttention  # here: ops.attention imports this module

    math_b = MathAttention()
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)
    gen = torch.Generator(device="cpu").manual_seed(4321)
    T = 150  # not a multiple of any tile
    layout = TokenLayout.build(batch=1, seqlen=T, device=device)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64)
    keep = torch.nonzero(torch.rand(T, generator=gen) < 0.5).flatten().to(device)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    scale = D ** -0.5
    o, lse = math_b.forward(q.double(), k.double(), v.double(), layout, scale)
    lse = lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
    do = torch.randn(keep.numel(), H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    q_k, o_k, lse_k = q[keep].contiguous(), o[keep].to(dtype).contiguous(), lse[keep].contiguous()
    ref = math_b.backward_kept(do.double(), q=q_k.double(), k=k.double(), v=v.double(), o=o_k.double(),
                               aux=lse_k.double(), keep=keep, layout=layout, scale=scale, queries_compact=True)
    M = keep.numel()
    for rows in (M, M + 37):  # exact, and zero-padded as after EXACT_SIZES distinct counts
        got = _backward_hybrid(impl, do, q_k, k, v, o_k, lse_k, keep, layout, scale, DEFAULT_CONFIGS[D]["dqf"],
                               rows=rows)
        for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            err = ((g.double() - r).norm() / r.norm()).item()
            if g.shape != r.shape or not err < tol:  # NaN fails too
                return f"self-check failed ({rows} rows for {M}): {name} rel err {err:.2e}, shape {tuple(g.shape)}"
    return "ok"


class TritonKeptAttention:
    """Triton backend: varlen causal forward on all rows, fused backward on the kept rows only.

    ``needs_full_queries = False``: the backward reads q / o / lse of kept rows only (it gathers them when
    given full rows). Inputs fp16 / bf16 (fp32 accumulation), fp32 (full-precision dots) or fp64 (tests,
    interpreter); head dim in ``SUPPORTED_HEAD_DIMS``; contiguous segments.

    The forward of plain causal rows (``plain_causal_rows``) on CUDA in fp16 / bf16 runs the dense model's own
    SDPA kernels (cuDNN or FlashAttention-2, through the private aten ops that also return the log-sum-exp);
    other layouts and dtypes run our varlen Triton forward. ``last_forward`` names the path the latest
    ``forward`` took ("triton" or one of ``SDPA_FORWARDS``).

    Args:
        configs: optional override of ``DEFAULT_CONFIGS`` entries, ``{head_dim: {"fwd"|"dq"|"dkdv"|"dqf"|"kk":
            (BLOCK_OUT, BLOCK_INNER, num_warps, num_stages)}}`` (tests use 16-wide tiles, benchmarks sweep).
        sdpa_forward: "auto" (the first of ``SDPA_FORWARDS`` that passes a one-time self-check against an
            fp32 reference, else Triton), one of ``SDPA_FORWARDS`` (that one or a ``RuntimeError`` where it
            applies), or "off" (always the Triton forward). "flash_cpu" (tests): PyTorch's CPU flash kernel,
            any device check skipped.
        kept_backward: the backward of one plain causal row (B = 1, ``plain_causal_rows``) in fp16 / bf16 on
            CUDA: "auto" (the hybrid, ``_backward_hybrid``: kept × kept pairs through cuDNN's causal backward
            on the compacted rows + ``_dqf`` for kept queries × filtered keys, with the first of
            ``KEPT_BACKWARDS`` that passes a one-time self-check against a float64 reference, else the Triton
            kernels), one of ``KEPT_BACKWARDS`` (that one or a ``RuntimeError`` where it applies), or "off"
            (always the Triton kernels). "flash_cpu" (tests): the hybrid through PyTorch's CPU flash backward,
            device check skipped. "auto" takes the hybrid from ``HYBRID_MIN_ROWS`` kept rows on (smaller calls
            are host-bound); an explicit impl at any size. ``last_backward`` names the path the latest
            ``backward_kept`` took ("triton" or an impl). ``overlap_dqf`` (attribute, default True): the
            hybrid's ``_dqf`` runs on a side CUDA stream, overlapping cuDNN, into its own dQ buffer added at the
            end (H100, 16k, κ = 0.5: 2.72 / 2.65 ms in two runs against 2.84 / 2.91 with ``_dqf`` after cuDNN
            adding in place); False: the in-place order (one rounding of dQ instead of two).
    """

    name = "triton"
    needs_full_queries = False

    def __init__(self, configs: dict[int, dict[str, tuple[int, int, int, int]]] | None = None,
                 sdpa_forward: str = "auto", kept_backward: str = "auto"):
        self.configs = {d: dict(c) for d, c in DEFAULT_CONFIGS.items()}
        for d, c in (configs or {}).items():
            self.configs.setdefault(d, {}).update(c)
        if sdpa_forward not in ("auto", "off", "flash_cpu", *SDPA_FORWARDS):
            raise ValueError(f"sdpa_forward must be auto, off or one of {SDPA_FORWARDS}, got {sdpa_forward!r}")
        self.sdpa_forward = sdpa_forward
        self.last_forward: str | None = None
        if kept_backward not in ("auto", "off", "flash_cpu", *KEPT_BACKWARDS):
            raise ValueError(f"kept_backward must be auto, off or one of {KEPT_BACKWARDS}, got {kept_backward!r}")
        self.kept_backward = kept_backward
        self.last_backward: str | None = None
        self.overlap_dqf = True
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        # True: the split backward (kept queries × filtered keys, then kept pairs once with dQ atomics).
        # Measured slower on an H100 (16k, κ = 0.5: 5.5 ms against 4.6 ms for the version-1 backward, whose
        # dK/dV pass recomputes S and dP of kept pairs but needs no atomics), so version 1 is the default.
        self.split_backward = False

    # ---------------------------------------------------------------------------------------------------
    @staticmethod
    def supports(q: torch.Tensor, layout: TokenLayout, *, allow_interpreter: bool = False) -> bool:
        """CUDA tensor of fp16/bf16/fp32, head dim in ``SUPPORTED_HEAD_DIMS``, contiguous segments, Triton.

        ``allow_interpreter``: also accept CPU tensors (fp64 too) when ``TRITON_INTERPRET=1`` (tests)."""
        if allow_interpreter and not q.is_cuda and interpreting():
            device_ok = q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        else:
            device_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return device_ok and q.shape[-1] in SUPPORTED_HEAD_DIMS and layout.contiguous and triton_available()

    @staticmethod
    def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> None:
        if not layout.contiguous:
            raise ValueError("the triton backend needs contiguous segments (see TokenLayout.contiguous)")
        D = q.shape[-1]
        if D not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"the triton backend supports head_dim in {SUPPORTED_HEAD_DIMS}, got {D}")
        if q.shape[1] % k.shape[1] != 0 or k.shape != v.shape:
            raise ValueError(f"bad GQA shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    def _cfg(self, D: int, kernel: str) -> tuple[int, int, int, int]:
        return self.configs[D][kernel]

    @staticmethod
    def _window(layout: TokenLayout) -> tuple[bool, int]:
        if layout.sliding_window is None:
            return False, 1
        return True, int(layout.sliding_window)

    # ---------------------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: float):
        """q [N, H, D], k/v [N, Hkv, D] → o [N, H, D] (q's dtype), lse [N, H] (fp32; fp64 for fp64 q)."""
        self._check(q, k, v, layout)
        N, H, D = q.shape
        Hkv = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if (self.sdpa_forward != "off" and N > 0 and plain_causal_rows(layout)
                and (self.sdpa_forward == "flash_cpu" or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)))):
            impls = SDPA_FORWARDS if self.sdpa_forward == "auto" else (self.sdpa_forward,)
            why = {}
            for impl in impls:
                status = _sdpa_self_check(impl, q.device, q.dtype, H, Hkv, D)
                if status == "ok":
                    try:
                        o, lse = _sdpa_forward(impl, q, k, v, layout.batch, layout.seqlen, scale)
                    except Exception as e:
                        if self.sdpa_forward != "auto":
                            raise
                        why[impl] = f"{type(e).__name__}: {str(e)[:200]}"
                        continue
                    self.last_forward = impl
                    return o, lse
                why[impl] = status
            if self.sdpa_forward != "auto":
                raise RuntimeError(f"SDPA forward {self.sdpa_forward!r} unavailable: {why}")
        self.last_forward = "triton"
        o = torch.empty_like(q)
        lse = torch.empty(N, H, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
        if N == 0:
            return o, lse
        kern = _kernels(interpreting())["fwd"]
        BM, BN, warps, stages = self._cfg(D, "fwd")
        cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
        S = cu.numel() - 1
        nmb = triton_cdiv(layout.max_seqlen, BM)
        has_window, window = self._window(layout)
        prec, acc = _precision_args(q.dtype)
        kern[(S * nmb, H)](
            q, k, v, o, lse, cu, scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            o.stride(0), o.stride(1), H, H // Hkv, nmb, window,
            HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, HAS_WINDOW=has_window, PREC=prec, ACC=acc,
            num_warps=warps, num_stages=stages,
        )
        return o, lse

    def backward_kept(self, do_k: torch.Tensor, *, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, aux: torch.Tensor, keep: torch.Tensor, layout: TokenLayout, scale: float,
                      queries_compact: bool):
        """Kept-token backward.

        Args:
            do_k: [M, H, D] gradient of the kept rows' output.
            q, o: [M, H, D] (``queries_compact``) or [N, H, D]; aux: lse [M, H] or [N, H] from ``forward``.
            k, v: [N, Hkv, D], all rows.
            keep: [M] int64 sorted unique kept row ids.
        Returns:
            dq_k [M, H, D], dk_k [M, Hkv, D], dv_k [M, Hkv, D] (dtypes of do_k, k, v).
        """
        M, H, D = do_k.shape
        Hkv = k.shape[1]
        if M == 0:
            return do_k.new_empty(0, H, D), k.new_empty(0, Hkv, D), v.new_empty(0, Hkv, D)
        self._check(do_k, k, v, layout)
        lse = aux
        if not queries_compact:
            q, o, lse = q.index_select(0, keep), o.index_select(0, keep), lse.index_select(0, keep)
        if q.shape != (M, H, D) or o.shape != (M, H, D) or lse.shape != (M, H):
            raise ValueError(f"kept q/o/lse shapes {tuple(q.shape)}, {tuple(o.shape)}, {tuple(lse.shape)} "
                             f"do not match do_k {tuple(do_k.shape)}")
        q, o, do_k, lse = q.contiguous(), o.contiguous(), do_k.contiguous(), lse.contiguous()
        k, v = k.contiguous(), v.contiguous()
        if layout.num_rows >= 2**31:
            raise ValueError("the triton backend indexes rows with int32")
        if (self.kept_backward != "off" and layout.batch == 1 and plain_causal_rows(layout)
                and q.dtype == do_k.dtype == k.dtype and (self.kept_backward != "auto" or M >= HYBRID_MIN_ROWS)
                and (self.kept_backward == "flash_cpu"
                     or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)))):
            auto = self.kept_backward == "auto"
            why = {}
            stream = None
            if self.overlap_dqf and q.is_cuda:
                if q.device not in self._side_streams:
                    self._side_streams[q.device] = torch.cuda.Stream(q.device)
                stream = self._side_streams[q.device]
            for impl in KEPT_BACKWARDS if auto else (self.kept_backward,):
                status = _kept_backward_self_check(impl, q.device, q.dtype, H, Hkv, D)
                if status == "ok":
                    try:
                        out = _backward_hybrid(impl, do_k, q, k, v, o, lse, keep, layout, scale,
                                               self._cfg(D, "dqf"), stream=stream)
                    except Exception as e:
                        if not auto:
                            raise
                        why[impl] = f"{type(e).__name__}: {str(e)[:200]}"
                        continue
                    self.last_backward = impl
                    return out
                why[impl] = status
            if not auto:
                raise RuntimeError(f"kept backward {self.kept_backward!r} unavailable: {why}")
        self.last_backward = "triton"
        cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
        kcu = torch.searchsorted(keep, cu.to(keep.dtype)).to(torch.int32)
        keep = keep.to(torch.int32).contiguous()
        S = cu.numel() - 1
        G = H // Hkv
        has_window, window = self._window(layout)
        prec, acc = _precision_args(q.dtype)
        kernels = _kernels(interpreting())
        acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
        delta = torch.empty(M, H, dtype=acc_t, device=q.device)
        dk = torch.empty(M, Hkv, D, dtype=k.dtype, device=q.device)
        dv = torch.empty(M, Hkv, D, dtype=v.dtype, device=q.device)
        most = min(layout.max_seqlen, M)  # kept rows of one segment, an upper bound known without a sync

        if not has_window and self.split_backward:
            return self._backward_split(do_k, q, k, v, o, lse, keep, cu, kcu, layout, scale, most, kernels,
                                        prec, acc, acc_t, delta, dk, dv)
        # Sliding window: dQ over all visible keys, then dK / dV recomputing S and dP of kept pairs.
        dq = torch.empty(M, H, D, dtype=do_k.dtype, device=q.device)
        BM, BN, warps, stages = self._cfg(D, "dq")
        nqb = triton_cdiv(most, BM)
        kernels["dq"][(S * nqb, H)](
            q, k, v, o, do_k, lse, delta, dq, keep, cu, kcu, scale, scale * _LOG2E, k.stride(0), k.stride(1),
            H, G, nqb, window, HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, HAS_WINDOW=has_window, PREC=prec, ACC=acc,
            num_warps=warps, num_stages=stages,
        )
        BN, BM, warps, stages = self._cfg(D, "dkdv")
        if BN % BM:
            raise ValueError(f"dkdv tile: BLOCK_N {BN} must be a multiple of BLOCK_M {BM}")
        nkb = triton_cdiv(most, BN)
        kernels["dkdv"][(S * nkb, Hkv)](
            q, k, v, do_k, lse, delta, dk, dv, keep, kcu, scale, scale * _LOG2E, k.stride(0), k.stride(1),
            H, Hkv, G, nkb, window, HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, HAS_WINDOW=has_window, PREC=prec,
            ACC=acc, num_warps=warps, num_stages=stages,
        )
        return dq, dk, dv


    def _backward_split(self, do_k, q, k, v, o, lse, keep, cu, kcu, layout, scale, most, kernels, prec, acc,
                        acc_t, delta, dk, dv):
        """No window: ``_dqf`` (kept queries × filtered keys, dQ only) then ``_kk`` (kept × kept, dK, dV and
        dQ by atomics): every visible pair's S and dP computed once (3·Pq + 2·Pkk GEMMs, no recompute)."""
        M, H, D = do_k.shape
        N, Hkv = layout.num_rows, k.shape[1]
        S, G = cu.numel() - 1, H // Hkv
        drop = filtered_rows(keep, N)
        dq_acc = torch.empty(M, H, D, dtype=acc_t, device=q.device)
        BM, BN, warps, stages = self._cfg(D, "dqf")
        nqb = triton_cdiv(most, BM)
        kernels["dqf"][(S * nqb, H)](
            q, k, v, o, do_k, lse, delta, dq_acc, keep, drop, cu, kcu, scale, scale * _LOG2E, k.stride(0),
            k.stride(1), H, G, S, nqb, HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=prec, ACC=acc, num_warps=warps,
            num_stages=stages,
        )
        BN, BM, warps, stages = self._cfg(D, "kk")
        if BN % BM:
            raise ValueError(f"kk tile: BLOCK_N {BN} must be a multiple of BLOCK_M {BM}")
        nkb = triton_cdiv(most, BN)
        kernels["kk"][(S * nkb, Hkv)](
            q, k, v, do_k, lse, delta, dq_acc, dk, dv, keep, kcu, scale, scale * _LOG2E, k.stride(0), k.stride(1),
            H, Hkv, G, S, nkb, HEAD_D=D, BLOCK_M=BM, BLOCK_N=BN, DQ_TRANS=BM < 64, PREC=prec, ACC=acc,
            num_warps=warps, num_stages=stages,
        )
        return dq_acc.to(do_k.dtype), dk, dv


def filtered_rows(keep: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The rows not in ``keep`` (sorted unique row ids), sorted, as int32 [num_rows - M], without a host sync.

    A filtered row r goes to slot r - #(kept rows <= r); kept rows all write one spare slot, cut off."""
    M = keep.numel()
    kept = torch.zeros(num_rows, dtype=torch.int32, device=keep.device)
    kept.index_fill_(0, keep.long(), 1)
    rows = torch.arange(num_rows, dtype=torch.int32, device=keep.device)
    slot = torch.where(kept.bool(), num_rows - M, rows - torch.cumsum(kept, 0, dtype=torch.int32))
    out = torch.empty(num_rows - M + 1, dtype=torch.int32, device=keep.device)
    out.scatter_(0, slot.long(), rows)
    return out[: num_rows - M]

def triton_cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)
