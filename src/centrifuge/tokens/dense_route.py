"""An all-kept token-filtering step run as the ordinary dense step, through fused kernels.

When every position that can matter is kept (κ = 1.0: every valid position, except perhaps the last of each
row, which no other query attends to and whose prediction has no target), the token-sparse backward's
semantics *are* ordinary dense training: no key or value is held constant for any query that carries
gradient. Then nothing is gained by the token-sparse machinery (gathers, compact saves, a kept-token
attention backward written for κ < 1) and something is lost, so ``fast_forward`` routes such a step here: a
plain autograd forward of the Llama recipe on [B, T] with SDPA's causal flash / cuDNN kernels and, on CUDA
with liger-kernel installed, fused kernels — Liger's RoPE and linear cross-entropy, our Triton RMSNorm and
SwiGLU (whose backward is faster than Liger's): the dense step of ``Trainer(use_liger_kernel=True)`` with
two kernels swapped for faster ones. Each decoder layer still runs through its own
module call (hooks such as FSDP2's see it).

The route is taken only where it is the same computation: plain causal rows (no padding mask, no packed
documents, no sliding window), no q/k norms, RMSNorm + SiLU-gated MLP (``direct.supports``), no neuron
omission, no activation checkpointing, no autocast, the keep set given before the forward. ``TorchDenseOps`` is the
reference (CPU), tested against ``mode="reference"``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from centrifuge.models.registry import ArchSpec
from centrifuge.ops.liger import FusedDenseOps, TorchDenseOps, liger_kernels_usable
from centrifuge.tokens import direct

# Which ops the route uses: "auto" = on CUDA with liger-kernel installed, ``FusedDenseOps`` (our Triton RMSNorm
# and SwiGLU, Liger's RoPE and fused linear CE), else no route; "torch" (tests: the reference formulas, any
# device); "off" = never route.
ROUTE = {"ops": "auto"}


def route_ops(device: torch.device) -> TorchDenseOps | None:
    """The ops of the dense route on ``device``, or None when the route is off there."""
    choice = ROUTE["ops"]
    if choice == "torch":
        return TorchDenseOps()
    if choice == "auto" and liger_kernels_usable(device):
        return FusedDenseOps()
    return None


def eligible(model: nn.Module, spec: ArchSpec, *, attention_mask, position_ids, select, return_token_loss) -> bool:
    """Static conditions of the route (no device sync): see the module docstring."""
    if select is not None or return_token_loss or attention_mask is not None or position_ids is not None:
        return False
    if torch.is_autocast_enabled(model.lm_head.weight.device.type):  # measured and tested without autocast only
        return False
    if spec.qk_norm or getattr(model.config, "sliding_window", None) is not None:
        return False
    from centrifuge.neurons.layers import STATE_ATTR as OMISSION_ATTR

    for layer in model.model.layers[: model.config.num_hidden_layers]:
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            return False
        if getattr(layer.mlp, OMISSION_ATTR, None) is not None or getattr(layer.self_attn, OMISSION_ATTR, None):
            return False
        if not direct.supports(layer, spec):
            return False
    return True


def uncovered(keep_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B·T] bool: the valid positions of valid [B, T] that keep_mask [B, T] drops, except the last of each row
    (which no query reads and whose prediction has no target). None True ⇔ the step is all-kept. No host read:
    the caller counts these with its own (``tokens.forward._resolve_keep``)."""
    need = valid.clone()
    need[:, -1] = False
    return (need & ~keep_mask).reshape(-1)


def dense_layer(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ops: TorchDenseOps) -> torch.Tensor:
    """One Llama-family decoder layer on h [B, T, d] with autograd; cos / sin [1 or B, T, D]. Returns [B, T, d].

    The projections are called as modules (nn.Linear, or PEFT LoRA layers)."""
    attn, mlp = layer.self_attn, layer.mlp
    B, T, _ = h.shape
    D = attn.head_dim
    n = ops.rms_norm(h, layer.input_layernorm)
    q = attn.q_proj(n).view(B, T, -1, D).transpose(1, 2)
    k = attn.k_proj(n).view(B, T, -1, D).transpose(1, 2)
    v = attn.v_proj(n).view(B, T, -1, D).transpose(1, 2)
    q, k = ops.rope(q, k, cos, sin)
    o = F.scaled_dot_product_attention(q, k.to(v.dtype), v, is_causal=True, scale=attn.scaling,
                                       enable_gqa=k.shape[1] != q.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    n2 = ops.rms_norm(h, layer.post_attention_layernorm)
    return h + mlp.down_proj(ops.swiglu(mlp.gate_proj(n2), mlp.up_proj(n2)))


class DenseCall:
    """What a decoder layer's dispatching forward runs for the dense route (``install_layer_dispatch``)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, ops: TorchDenseOps) -> None:
        self.cos, self.sin, self.ops = cos, sin, ops

    def __call__(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return dense_layer(layer, h, self.cos, self.sin, self.ops)


def dense_loss_sum(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, ops: TorchDenseOps,
                   call_layer) -> torch.Tensor:
    """Sum of CE over rows whose target [B·T] is not -100, of the dense model on input_ids [B, T] (autograd).

    ``call_layer(layer, h, call)``: how a decoder layer is called (``tokens.forward.call_layer``)."""
    inner = model.model
    B, T = input_ids.shape
    h = inner.embed_tokens(input_ids)
    positions = torch.arange(T, device=input_ids.device)[None]
    cos, sin = inner.rotary_emb(h, position_ids=positions)
    call = DenseCall(cos, sin, ops)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        h = call_layer(layer, h, call)
    h = ops.rms_norm(h, inner.norm).reshape(B * T, -1)
    head = model.lm_head
    return ops.ce_sum(h, head.weight, targets, head.bias)
