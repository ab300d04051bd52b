"""Which key each query may see, for a batch flattened to N = B × T token rows.

The token-sparse path works on flattened rows [N, ...] (row r = b·T + t), so attention needs per-token
metadata instead of a [B, T] layout. ``TokenLayout`` holds it and follows the masking rules of Hugging
Face's ``create_causal_mask`` so that the fast path computes the same function as the dense model:

* with ``attention_mask is None``: a new attention *segment* (document) starts wherever ``position_ids``
  do not increase by exactly 1 (HF's packed-sequence detection), so packed documents never see each other;
* with an ``attention_mask``: one segment per batch row, and padded keys are invisible (HF does no packed
  detection when a 2-D mask is given);
* causal by the original row index ``t``; an optional sliding window keeps keys with ``t_q - t_k < window``;
* an optional score soft-cap ``c`` (Gemma 2: scores become ``c · tanh(s / c)`` before the softmax) — part of
  a layer's attention geometry like its window, though not of visibility.

Padding tokens become one-token segments of their own: they see only themselves, never appear as keys
to real tokens, and are never kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class TokenLayout:
    """Per-token attention metadata of a flattened batch.

    Attributes:
        batch, seqlen: B and T of the original [B, T] batch (N = B × T rows).
        segment: [N] int64, id of the attention segment of each row; keys are visible only within a segment.
        index: [N] int64, position t of each row inside its batch row (causality and sliding window).
        valid: [N] bool, False for padding.
        sliding_window: window length or None.
        softcap: attention score soft-cap or None (only the math backend computes it; others refuse it).
        contiguous: True when every segment is one contiguous run of rows (what varlen kernels need).
        cu_seqlens: [S + 1] int32 segment boundaries in row order (valid when ``contiguous``).
        max_seqlen: longest segment (valid when ``contiguous``).
    """

    batch: int
    seqlen: int
    segment: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    sliding_window: int | None
    contiguous: bool
    cu_seqlens: torch.Tensor
    max_seqlen: int
    softcap: float | None = None

    @property
    def num_rows(self) -> int:
        return self.batch * self.seqlen

    @classmethod
    def build(
        cls,
        *,
        batch: int,
        seqlen: int,
        device: torch.device,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sliding_window: int | None = None,
    ) -> TokenLayout:
        """Build the layout of a [B, T] batch (``attention_mask`` / ``position_ids`` as given to HF).

        Host reads (each a GPU synchronisation, and the token-sparse step is host-bound): none for plain rows
        (no mask, no position ids: one segment per row, known from the shape); otherwise one copy of the [N]
        segment keys to the host, where the runs, the contiguity and the segment lengths are counted."""
        B, T = batch, seqlen
        t = torch.arange(T, device=device).expand(B, T)
        row = torch.arange(B, device=device)[:, None].expand(B, T)
        if attention_mask is None and position_ids is None:  # one causal segment per row, nothing to read
            return cls(
                batch=B, seqlen=T, segment=row.reshape(-1), index=t.reshape(-1),
                valid=torch.ones(B * T, dtype=torch.bool, device=device), sliding_window=sliding_window,
                contiguous=True, cu_seqlens=torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device),
                max_seqlen=T,
            )
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
            valid = attention_mask.to(torch.bool)
            doc = torch.zeros(B, T, dtype=torch.long, device=device)
        else:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            pos = position_ids.expand(B, T)
            diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
            doc = (diff != 1).long().cumsum(-1)
        # Segment key: (row, doc) for real tokens; every padding token its own singleton segment.
        key = row * (T + 1) + doc
        key = torch.where(valid, key, B * (T + 1) + row * T + t)
        flat_key = key.reshape(-1)
        # Runs of equal keys in row order; contiguous iff no segment key appears in two runs. Counted on the host
        # (numpy) from one copy of the keys; the run ids themselves are made on the device (no copy back).
        host_key = flat_key.cpu().numpy()
        run_starts = np.flatnonzero(np.concatenate([[True], host_key[1:] != host_key[:-1]]))
        contiguous = run_starts.size == np.unique(host_key).size
        cu_host = np.append(run_starts, host_key.size)
        max_seqlen = int(np.diff(cu_host).max())
        cu = torch.from_numpy(cu_host.astype(np.int32))
        if contiguous:
            starts = torch.ones_like(flat_key, dtype=torch.bool)
            starts[1:] = flat_key[1:] != flat_key[:-1]
            segment = starts.long().cumsum(0) - 1
        else:
            segment = flat_key
        return cls(
            batch=B, seqlen=T, segment=segment, index=t.reshape(-1), valid=valid.reshape(-1),
            sliding_window=sliding_window, contiguous=contiguous, cu_seqlens=cu.to(device, non_blocking=True),
            max_seqlen=max_seqlen,
        )

    def visible(self, q_rows: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
        """[len(q_rows), len(k_rows)] bool: may query row i see key row j?"""
        same = self.segment[q_rows][:, None] == self.segment[k_rows][None, :]
        dq = self.index[q_rows][:, None] - self.index[k_rows][None, :]
        ok = same & (dq >= 0)
        if self.sliding_window is not None:
            ok &= dq < self.sliding_window
        return ok
