"""Per-token cross-entropy of an LM head without [tokens, vocab] fp32 logits in memory at once.

Reference: ``reference_token_loss`` (full logits, plain autograd).
Fast path on the CPU: ``chunked_token_loss`` (rows in chunks; each chunk's logits are recomputed in the
backward instead of saved, so memory is O(chunk × vocab)). Scores without gradient (selection, reference
models) go through ``token_loss_no_grad``, which on CUDA uses liger-kernel's fused linear cross-entropy when
it is installed (``fused_token_loss``) and the chunked path otherwise; tests compare the paths.

Conventions: ``hidden`` [N, d] rows are *prediction positions*; ``targets`` [N] holds the next token id
or ``IGNORE_INDEX`` (-100). Losses of ignored rows are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: ``labels`` [B, T] align with ``input_ids``; position t predicts labels[t+1].

    Returns the targets per prediction position [B, T] (last position ignored)."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exactness tests); everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _softcap(logits: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits soft-capped ``c · tanh(z / c)`` (Gemma 2's final_logit_softcapping) and the derivative
    ``1 - tanh²`` for the backward; unchanged and None without a cap."""
    if cap is None:
        return logits, None
    t = torch.tanh(logits / cap)
    return cap * t, 1 - t * t


def reference_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    *, softcap: float | None = None,
) -> torch.Tensor:
    """[N] per-token CE computed from full fp32 logits (the reference)."""
    logits = _softcap(F.linear(hidden, weight, bias).to(_accumulation_dtype(hidden)), softcap)[0]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of ``hidden @ weight.T`` computed chunk by chunk; backward recomputes chunk logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap=None):
        acc = _accumulation_dtype(hidden)
        losses = hidden.new_zeros(hidden.shape[0], dtype=acc)
        lse_all = hidden.new_zeros(hidden.shape[0], dtype=acc)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _softcap(F.linear(hidden[rows], weight, bias).to(acc), softcap)[0]
            lse = torch.logsumexp(logits, dim=-1)
            tgt = targets[rows]
            valid = tgt != IGNORE_INDEX
            picked = logits.gather(1, tgt.clamp_min(0)[:, None]).squeeze(1)
            losses[rows] = torch.where(valid, lse - picked, 0.0)
            lse_all[rows] = lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        acc = _accumulation_dtype(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            tgt = targets[rows]
            # no skipping of all-ignored chunks: asking would synchronise host and GPU once per chunk, and the
            # training step's backward starts here — the host could not queue the layers' backward ahead
            scale = torch.where(tgt != IGNORE_INDEX, grad_losses[rows].to(acc), 0.0)
            logits, dcap = _softcap(F.linear(hidden[rows], weight, bias).to(acc), ctx.softcap)
            dlogits = torch.exp(logits - lse_all[rows, None])
            dlogits.scatter_add_(1, tgt.clamp_min(0)[:, None], -torch.ones_like(dlogits[:, :1]))
            dlogits *= scale[:, None]
            if dcap is not None:
                dlogits *= dcap
            dlogits = dlogits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ hidden[rows]).to(acc)
            if grad_bias is not None:
                grad_bias += dlogits.to(acc).sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 2048,
    softcap: float | None = None,
) -> torch.Tensor:
    """[N] per-token CE (fp32) of ``hidden`` [N, d] against ``weight`` [V, d]; differentiable.

    At most ``chunk_size`` × V logits exist at once, in the forward and in the backward. ``softcap``: logits
    soft-capped ``c · tanh(z / c)`` before the CE (Gemma 2), or None."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap)


def _liger_available() -> bool:
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except Exception:
        return False
    return True


def token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 2048,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token CE [N] through the best available path (chunked everywhere; see module docstring)."""
    return chunked_token_loss(hidden, weight, targets, bias, chunk_size=chunk_size, softcap=softcap)


# --------------------------------------------------------------------------------------------------------
# Per-token loss without gradient (selection scores, reference models): chunked, or fused on CUDA
# --------------------------------------------------------------------------------------------------------

LOSS_BACKENDS = ("auto", "chunked", "liger")


def fused_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[N] per-token CE (fp32, no grad) through liger-kernel's fused linear cross-entropy (CUDA, Triton).

    Needs ``liger_kernel`` (``pip install centrifuge-llm[gpu]``) and CUDA tensors. Used for scores only:
    inputs are detached, so no gradient is computed or returned (liger's ``reduction="none"`` backward is
    not correct in every released version, and training losses go through ``chunked_token_loss``)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if hidden.device.type != "cuda":
        raise ValueError("fused_token_loss needs CUDA tensors (liger-kernel runs Triton kernels)")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    with torch.no_grad():
        out = liger_fused_linear_cross_entropy(
            hidden.detach().contiguous(), weight.detach(), targets.contiguous(),
            None if bias is None else bias.detach(), ignore_index=IGNORE_INDEX, reduction="none",
        )
    if isinstance(out, tuple):
        out = out[0]
    out = getattr(out, "loss", out)  # newer versions return a CrossEntropyOutput
    return out.float().masked_fill(targets == IGNORE_INDEX, 0.0)


def token_loss_no_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 2048,
    backend: str = "auto",
    softcap: float | None = None,
) -> torch.Tensor:
    """[N] per-token CE (fp32, 0 where ignored), without gradient, for selection or reference scores.

    ``backend``: "chunked" (``chunked_token_loss``, everywhere), "liger" (``fused_token_loss``; raises if
    unavailable), or "auto" (liger on CUDA when installed, else chunked; chunked with a ``softcap``). Either
    way no [N, V] fp32 logits exist at once."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(LOSS_BACKENDS)}")
    if softcap is not None and backend == "liger":
        raise ValueError("the liger score path takes no logit soft-cap; use backend='chunked' or 'auto'")
    use_liger = backend == "liger" or (backend == "auto" and softcap is None and hidden.device.type == "cuda"
                                       and _liger_available())
    if use_liger:
        return fused_token_loss(hidden, weight, targets, bias)
    with torch.no_grad():
        loss = chunked_token_loss(hidden.detach(), weight.detach(), targets,
                                  None if bias is None else bias.detach(), chunk_size=chunk_size, softcap=softcap)
    return loss.float()
