"""Attention for the token-sparse backward: a full forward, and a backward for kept tokens only.

Layout: token rows, ``q`` [N, H, D], ``k``/``v`` [N, Hkv, D] (GQA when Hkv < H, never repeated in memory
by the math path), visibility from a ``TokenLayout``. Every backend provides

* ``forward(q, k, v, layout, scale) -> (o [N, H, D], aux)``: ordinary attention over all rows, plus what
  its backward needs (``aux``: the log-sum-exp, in the backend's own layout);
* ``backward_kept(do_k, ...) -> (dq_k, dk_k, dv_k)``: the reference semantics of the token-sparse
  backward for the kept rows ``keep`` [M]: dQ of kept queries against *all* visible keys (the full-row
  log-sum-exp and D = rowsum(dO ∘ O) keep it exact), and dK / dV of kept keys from kept queries only
  (filtered keys are constants).

Backends: ``MathAttention`` (any device and dtype, the CPU path and the reference for the others) and
``FlashVarlenAttention`` (CUDA: PyTorch's FlashAttention-2 varlen kernels; its backward runs on all rows with
dO = 0 on filtered queries, which gives exactly the kept-token gradients at the cost of a full backward).
``TritonKeptAttention`` (``ops.attention_triton``, name "triton") does only the needed work: dQ of kept
queries and dK / dV of kept keys from kept queries, in fused Triton kernels; "auto" prefers it on CUDA. Its
forward runs the dense model's SDPA kernels (cuDNN / FlashAttention) on plain causal rows, else its own.
"""

from __future__ import annotations

import itertools

import torch

from centrifuge.ops.attention_triton import SUPPORTED_HEAD_DIMS, TritonKeptAttention, plain_causal_rows
from centrifuge.tokens.layout import TokenLayout


def _softcapped(s: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores after soft-capping ``c · tanh(s / c)`` and its derivative ``1 - tanh²`` (None without a cap)."""
    if cap is None:
        return s, None
    t = torch.tanh(s / cap)
    return cap * t, 1 - t * t


class MathAttention:
    """Explicit softmax attention, one batch row at a time (segments never cross rows).

    Computes in float32 (float64 for float64 inputs); memory O(H × T²) per row, so meant for the CPU,
    tests and small shapes."""

    name = "math"
    needs_full_queries = False  # backward_kept reads q / o / lse of kept rows only

    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @staticmethod
    def _row_slices(layout: TokenLayout):
        T = layout.seqlen
        for b in range(layout.batch):
            yield torch.arange(b * T, (b + 1) * T, device=layout.segment.device)

    def forward(self, q, k, v, layout: TokenLayout, scale: float):
        N, H, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        ct = self._compute_dtype(q)
        o = torch.empty_like(q)
        lse = torch.empty(N, H, dtype=torch.float32 if ct == torch.float32 else ct, device=q.device)
        for rows in self._row_slices(layout):
            qb = q[rows].to(ct).view(-1, Hkv, G, D)
            kb, vb = k[rows].to(ct), v[rows].to(ct)
            s = _softcapped(torch.einsum("qhgd,khd->hgqk", qb, kb) * scale, layout.softcap)[0]
            s = s.masked_fill(~layout.visible(rows, rows), float("-inf"))
            m = torch.logsumexp(s, dim=-1)  # [Hkv, G, T]
            p = torch.exp(s - m[..., None])
            ob = torch.einsum("hgqk,khd->qhgd", p, vb)
            o[rows] = ob.reshape(-1, H, D).to(q.dtype)
            lse[rows] = m.permute(2, 0, 1).reshape(-1, H).to(lse.dtype)
        return o, lse

    def backward_kept(self, do_k, *, q, k, v, o, aux, keep, layout: TokenLayout, scale: float,
                      queries_compact: bool):
        """``q``/``o``/``aux`` are [M, ...] when ``queries_compact`` else [N, ...]."""
        M, H, D = do_k.shape
        Hkv = k.shape[1]
        G = H // Hkv
        ct = self._compute_dtype(do_k)
        if not queries_compact:
            q, o, aux = q[keep], o[keep], aux[keep]
        dq = torch.zeros(M, H, D, dtype=ct, device=do_k.device)
        dk = torch.zeros(M, Hkv, D, dtype=ct, device=do_k.device)
        dv = torch.zeros(M, Hkv, D, dtype=ct, device=do_k.device)
        T = layout.seqlen
        # keep is sorted: batch row b's kept rows are one slice [lo, hi) of the compact [M] arrays (one host read)
        bounds = torch.searchsorted(keep, torch.arange(0, (layout.batch + 1) * T, T, device=keep.device)).tolist()
        for b, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if lo == hi:
                continue
            sel = slice(lo, hi)
            rows = torch.arange(b * T, (b + 1) * T, device=do_k.device)
            kq = keep[sel]  # flat row ids of kept queries / keys in this batch row
            qb = q[sel].to(ct).view(-1, Hkv, G, D)
            dob = do_k[sel].to(ct).view(-1, Hkv, G, D)
            ob = o[sel].to(ct).view(-1, Hkv, G, D)
            lb = aux[sel].to(ct).view(-1, Hkv, G).permute(1, 2, 0)  # [Hkv, G, m]
            kb, vb = k[rows].to(ct), v[rows].to(ct)
            s, dcap = _softcapped(torch.einsum("qhgd,khd->hgqk", qb, kb) * scale, layout.softcap)
            vis = layout.visible(kq, rows)
            p = torch.exp(s - lb[..., None]).masked_fill(~vis, 0.0)  # [Hkv, G, m, T]
            dp = torch.einsum("qhgd,khd->hgqk", dob, vb)
            delta = (dob * ob).sum(-1).permute(1, 2, 0)  # D = rowsum(dO ∘ O): [Hkv, G, m]
            ds = p * (dp - delta[..., None])
            if dcap is not None:  # through the soft-cap: d(c·tanh(s/c))/ds = 1 - tanh²(s/c)
                ds = ds * dcap
            dq[sel] = (torch.einsum("hgqk,khd->qhgd", ds, kb) * scale).reshape(-1, H, D)
            # dK / dV of kept keys from kept queries only: restrict the key axis to kept rows.
            key_cols = kq - b * T
            dk[sel] = torch.einsum("hgqk,qhgd->khd", ds[..., key_cols], qb) * scale
            dv[sel] = torch.einsum("hgqk,qhgd->khd", p[..., key_cols], dob)
        return dq.to(do_k.dtype), dk.to(do_k.dtype), dv.to(do_k.dtype)


class FlashVarlenAttention:
    """CUDA FlashAttention-2 (PyTorch's built-in varlen kernels), fp16/bf16, head_dim ≤ 256, GQA native.

    Needs contiguous segments (packed documents and right/left padding are; padding in the middle of a
    row is not). The backward computes on all rows with dO zero on filtered queries: exact for the kept
    rows, no saving in attention work (the fused kernel removes that)."""

    name = "flash"
    needs_full_queries = True

    @staticmethod
    def supports(q: torch.Tensor, layout: TokenLayout) -> bool:
        return (
            q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and layout.contiguous
        )

    @staticmethod
    def _window(layout: TokenLayout) -> dict:
        if layout.sliding_window is None:
            return {}
        return {"window_size_left": layout.sliding_window - 1, "window_size_right": 0}

    def forward(self, q, k, v, layout: TokenLayout, scale: float):
        cu = layout.cu_seqlens
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, 0.0, True, False, scale=scale,
            **self._window(layout),
        )
        return out, (lse, rng_state, unused)

    def backward_kept(self, do_k, *, q, k, v, o, aux, keep, layout: TokenLayout, scale: float,
                      queries_compact: bool):
        if queries_compact:
            raise ValueError("the flash backend needs the full-row q / o / lse")
        lse, rng_state, unused = aux
        do = torch.zeros_like(o)
        do.index_copy_(0, keep, do_k)
        cu = layout.cu_seqlens
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, o, lse, cu, cu, layout.max_seqlen, layout.max_seqlen, 0.0, True, rng_state, unused,
            scale=scale, **self._window(layout),
        )
        return dq[keep], dk[keep], dv[keep]


class SdpaAttention:
    """PyTorch SDPA, whichever kernel it picks (cuDNN or FlashAttention on Hopper): the same attention
    kernels the dense model runs, with native GQA.

    The forward records a small autograd graph of its own (q, k, v → o); ``backward_kept`` runs that
    graph's backward with dO = 0 on filtered queries, which is exact for the kept rows (full attention
    work, like the flash path). Batches whose rows are plain causal sequences (no packing, no padding, no
    sliding window) use ``is_causal``; other layouts an explicit [B, 1, T, T] mask (CPU only: on CUDA a
    mask sends SDPA to slow kernels)."""

    name = "sdpa"
    needs_full_queries = False  # keeps its own graph; the layer need not save q / o

    @staticmethod
    def plain_causal(layout: TokenLayout) -> bool:
        return plain_causal_rows(layout)  # without a host sync

    @classmethod
    def supports(cls, q: torch.Tensor, layout: TokenLayout) -> bool:
        return cls.plain_causal(layout) or not q.is_cuda

    def forward(self, q, k, v, layout: TokenLayout, scale: float):
        B, T = layout.batch, layout.seqlen
        N, H, D = q.shape

        def heads_first(t):
            return t.detach().view(B, T, t.shape[1], D).transpose(1, 2).requires_grad_(True)

        qb, kb, vb = heads_first(q), heads_first(k), heads_first(v)
        if self.plain_causal(layout):
            mask, causal = None, True
        else:
            rows = torch.arange(N, device=q.device).view(B, T)
            mask = torch.stack([layout.visible(r, r) for r in rows])[:, None]
            causal = False
        with torch.enable_grad():
            ob = torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != H)
        o = ob.detach().transpose(1, 2).reshape(N, H, D)
        return o, (ob, qb, kb, vb)

    def backward_kept(self, do_k, *, q, k, v, o, aux, keep, layout: TokenLayout, scale: float,
                      queries_compact: bool):
        ob, qb, kb, vb = aux
        B, T = layout.batch, layout.seqlen
        N, H, D = layout.num_rows, ob.shape[1], ob.shape[-1]
        do = torch.zeros(N, H, D, dtype=ob.dtype, device=ob.device)
        do.index_copy_(0, keep, do_k.to(ob.dtype))
        dq, dk, dv = torch.autograd.grad(ob, (qb, kb, vb), do.view(B, T, H, D).transpose(1, 2))

        def kept_rows(t):
            return t.transpose(1, 2).reshape(N, t.shape[1], D).index_select(0, keep)

        return kept_rows(dq), kept_rows(dk), kept_rows(dv)


_MATH = MathAttention()
_FLASH = FlashVarlenAttention()
_SDPA = SdpaAttention()
_TRITON = TritonKeptAttention()
BACKENDS = {"math": _MATH, "flash": _FLASH, "sdpa": _SDPA, "triton": _TRITON}


def choose_backend(name: str, q: torch.Tensor, layout: TokenLayout):
    """``name``: "auto" (triton, else sdpa / flash where they apply, else math) or a key of ``BACKENDS``."""
    if name == "auto":
        if layout.softcap is not None:  # only the math backend soft-caps scores
            return _MATH
        # The fused kept-token kernels (ops.attention_triton) wherever they apply.
        if TritonKeptAttention.supports(q, layout):
            return _TRITON
        # The dense model's own SDPA kernels where the batch is plain causal rows; else varlen flash on
        # CUDA; the math path on the CPU.
        if q.is_cuda and SdpaAttention.plain_causal(layout):
            return _SDPA
        return _FLASH if FlashVarlenAttention.supports(q, layout) else _MATH
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    if layout.softcap is not None and backend is not _MATH:
        raise ValueError(f"attention score soft-capping (Gemma 2's attn_logit_softcapping) is computed by the math "
                         f"backend only, not {name!r}; use attention='math' or 'auto', or set the cap to None")
    if backend is _FLASH and not FlashVarlenAttention.supports(q, layout):
        raise ValueError("the flash backend needs CUDA, fp16/bf16, head_dim ≤ 256 and contiguous segments")
    if backend is _SDPA and not SdpaAttention.supports(q, layout):
        raise ValueError("the sdpa backend on CUDA needs plain causal rows (no packing, padding or window)")
    if backend is _TRITON and not TritonKeptAttention.supports(q, layout, allow_interpreter=True):
        raise ValueError("the triton backend needs triton, CUDA (or TRITON_INTERPRET=1), fp16/bf16/fp32, "
                         f"head_dim in {SUPPORTED_HEAD_DIMS} and contiguous segments")
    return backend
