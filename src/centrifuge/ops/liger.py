"""Liger-Kernel seen from the ops: which Liger-patched modules compute exactly our formulas.

Liger-Kernel (``liger_kernel.transformers``) replaces a Llama-family model's RMSNorm, MLP and RoPE by its own
(class patch: new classes; instance patch: ``forward`` bound on the existing modules). The token-sparse layer
never calls those modules' forwards (it computes the formulas of ``centrifuge.ops.elementwise`` itself, so
the CPU path stays a torch reference), so it only needs to know that a patched module computes exactly the
formula of the module it replaced. And it wraps Liger's fused kernels for the dense-row work Centrifuge does
itself (``LigerDenseOps``, with ``TorchDenseOps`` as its reference), importing liger_kernel only when used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def from_liger(fn: Any) -> bool:
    """Whether a function (or bound method) comes from the liger_kernel package."""
    fn = getattr(fn, "__func__", fn)
    return str(getattr(fn, "__module__", "") or "").startswith("liger_kernel")


def forward_of(module: nn.Module) -> Any:
    """The forward a module runs: its instance-bound one (Liger's instance patch), else its class's."""
    own = vars(module).get("forward") if hasattr(module, "__dict__") else None
    return own if own is not None else getattr(type(module), "forward", None)


def is_liger_rms_norm(module: nn.Module) -> bool:
    """A Liger RMSNorm (class ``LigerRMSNorm`` or a norm whose forward Liger rebound) computing exactly HF's
    ``LlamaRMSNorm``: weight · (x / rms(x) in fp32, cast back), i.e. offset 0 and the "llama" casting mode."""
    if not from_liger(forward_of(module)):
        return False
    return (float(getattr(module, "offset", 0.0) or 0.0) == 0.0
            and getattr(module, "casting_mode", "llama") == "llama"
            and getattr(module, "weight", None) is not None and hasattr(module, "variance_epsilon"))


def is_liger_swiglu(mlp: nn.Module) -> bool:
    """A Liger SwiGLU MLP (``LigerSwiGLUMLP`` class or a Llama MLP whose forward Liger rebound):
    down(silu(gate(x)) · up(x))."""
    if not from_liger(forward_of(mlp)):
        return False
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    return act in ("silu", "swish") and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def is_liger_rope(fn: Any) -> bool:
    """Whether a modeling module's ``apply_rotary_pos_emb`` is Liger's (its layout is [B, H, T, D]; the
    token-sparse layer then uses the same formula on token rows, ``centrifuge.ops.elementwise.rope``)."""
    return from_liger(fn)




# --------------------------------------------------------------------------------------------------------
# Liger-Kernel's fused kernels, with their torch reference (the CPU path and the tests' oracle)
# --------------------------------------------------------------------------------------------------------


def liger_kernels_usable(device: torch.device) -> bool:
    """Whether Liger-Kernel's Triton kernels can run here: CUDA and ``liger_kernel`` importable."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:
        return False
    return True


class TorchDenseOps:
    """Reference formulas (``centrifuge.ops.elementwise``, HF Llama's) with autograd, on [B, H, T, D] heads.

    ``rms_norm(x [..., d], module)``, ``rope(q [B, H, T, D], k [B, Hkv, T, D], cos, sin [B or 1, T, D])``,
    ``swiglu(gate, up [..., m])``, ``ce_sum(hidden [R, d], weight [V, d], targets [R], bias) -> scalar`` (sum
    of CE over rows whose target is not -100; chunked, no [R, V] fp32 logits at once)."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        from centrifuge.ops.elementwise import rms_norm

        return rms_norm(x, module.weight, module.variance_epsilon)

    def rope(self, q, k, cos, sin):
        from centrifuge.ops.elementwise import rope

        return rope(q, k, cos, sin)  # cos [B, T, D] -> [B, 1, T, D] inside

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from centrifuge.ops.elementwise import swiglu

        return swiglu(gate, up)

    def ce_sum(self, hidden, weight, targets, bias=None) -> torch.Tensor:
        from centrifuge.ops.cross_entropy import chunked_token_loss

        return chunked_token_loss(hidden, weight, targets, bias).sum()


class LigerDenseOps(TorchDenseOps):
    """The same with Liger-Kernel's Triton kernels (CUDA): RMSNorm ("llama" casting), RoPE, SwiGLU, and the
    fused linear cross-entropy (sum reduction: logits computed chunk by chunk, gradients in the forward)."""

    name = "liger"

    def rms_norm(self, x, module):
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, module.weight, module.variance_epsilon, 0.0, "llama", True)

    def rope(self, q, k, cos, sin):
        from liger_kernel.transformers.functional import liger_rope

        return liger_rope(q, k, cos, sin)

    def swiglu(self, gate, up):
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)

    def ce_sum(self, hidden, weight, targets, bias=None):
        return liger_ce_sum(hidden, weight, targets, bias)


class _RMSNormFn(torch.autograd.Function):
    """``elementwise.rms_norm`` with autograd through Centrifuge's Triton kernels (``elementwise_triton``)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from centrifuge.ops import elementwise_triton

        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return elementwise_triton.rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        from centrifuge.ops import elementwise_triton

        x, weight = ctx.saved_tensors
        dx, dweight = elementwise_triton.rms_norm_backward(dy.contiguous(), x, weight, ctx.eps)
        return dx, dweight.to(weight.dtype), None


class _SwiGLUFn(torch.autograd.Function):
    """``elementwise.swiglu`` with autograd through Centrifuge's Triton kernels."""

    @staticmethod
    def forward(ctx, gate, up):
        from centrifuge.ops import elementwise_triton

        ctx.save_for_backward(gate, up)
        return elementwise_triton.swiglu(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from centrifuge.ops import elementwise_triton

        gate, up = ctx.saved_tensors
        return elementwise_triton.swiglu_backward(dy.contiguous(), gate, up)


class FusedDenseOps(LigerDenseOps):
    """The dense route's ops on CUDA: RMSNorm and SwiGLU through Centrifuge's Triton kernels (their backward
    measured faster than Liger's on the H200: RMSNorm 4.24 vs 6.13 ms, SwiGLU 4.67 vs 4.92 ms per TinyLlama
    step, ``benchmarks/results/2026-12-04-h200-liger-baseline/profile.txt``), RoPE and the fused linear
    cross-entropy through Liger's. Falls back to Liger's where our kernels do not take the tensors."""

    name = "fused"

    def rms_norm(self, x, module):
        from centrifuge.ops import elementwise_triton

        w = module.weight
        if x.dtype == w.dtype and x.is_contiguous() and elementwise_triton.supported(x, w):
            return _RMSNormFn.apply(x, w, module.variance_epsilon)
        return super().rms_norm(x, module)

    def swiglu(self, gate, up):
        from centrifuge.ops import elementwise_triton

        if (gate.dtype == up.dtype and gate.is_contiguous() and up.is_contiguous()
                and elementwise_triton.supported(gate, up)):
            return _SwiGLUFn.apply(gate, up)
        return super().swiglu(gate, up)


def liger_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token CE over rows of hidden [R, d] (targets [R], -100 ignored) through Liger's fused linear
    cross-entropy (CUDA), differentiable; fp32 scalar. Never more than a chunk of [R, V] logits at once."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(hidden.contiguous(), weight, targets.contiguous(), bias,
                                           ignore_index=-100, reduction="sum")
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "loss", out).float()
