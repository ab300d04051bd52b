"""Liger-Kernel seen from the ops: which Liger-patched modules compute exactly our formulas.

Liger-Kernel (``liger_kernel.transformers``) replaces a Llama-family model's RMSNorm, MLP and RoPE by its own
(class patch: new classes; instance patch: ``forward`` bound on the existing modules). The token-sparse layer
never calls those modules' forwards (it computes the formulas of ``centrifuge.ops.elementwise`` itself, so
the CPU path stays a torch reference), so it only needs to know that a patched module computes exactly the
formula of the module it replaced. Nothing here imports liger_kernel.
"""

from __future__ import annotations

from typing import Any

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


