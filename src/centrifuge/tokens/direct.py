"""The kept-rows backward of a plain Llama-family layer, written out by hand.

``centrifuge.tokens.layer`` replays a small autograd graph per layer in the backward. That is general (any
``linear``, PEFT modules, autocast), but on a GPU its host cost — ~8 ``autograd.Function`` applications, four
compiled element-wise graphs with their autograd wrappers and a nested autograd engine run per layer — came
to about as much time as the GPU work of the layer once the GEMMs had shrunk to the kept rows, so the step
waited on Python (measured: ``benchmarks/gpu_host_overhead.py``). This module computes the same gradients
with explicit formulas: 14 GEMMs, a few fused element-wise kernels and the attention backend's kept-token
backward, no graph. The replay stays the fallback (and is what the tests compare this with).

Supported (``supports``): all seven projections plain ``nn.Linear`` (biases allowed), RMSNorm norms (q/k
norms included), SiLU gating; neuron-omission plans (sliced weights, full-size gradients); with or without
autocast. Under autocast (``compute_dtype``, e.g. bf16 with fp32 master weights) every GEMM runs on inputs
cast to the compute dtype, as autocast's linear did in the forward, and a gradient is cast to the dtype of
the tensor it belongs to wherever autograd would cast it (the fp32 residual stream and norm outputs, the
bf16 projection outputs, RoPE's per-term casts) — so the formulas round where the replay rounds.

Parameter gradients are *returned* — the layer's parameters are inputs of the layer's autograd function — so
autograd accumulates them (``AccumulateGrad``): DDP / FSDP hooks and ``register_post_accumulate_grad_hook`` see
them as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from centrifuge.models.registry import ArchSpec
from centrifuge.neurons.layers import full_size_grad, plan_weight
from centrifuge.neurons.plan import LayerPlan
from centrifuge.ops.elementwise import (
    Eager,
    is_rms_norm,
    is_silu,
    rms_norm,
    rms_norm_backward,
    rope_backward,
    swiglu,
    swiglu_backward,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _modules(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    out = {name: getattr(attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp, name)
           for name in LINEARS}
    out["input_layernorm"] = layer.input_layernorm
    out["post_attention_layernorm"] = layer.post_attention_layernorm
    if spec.qk_norm:
        out["q_norm"], out["k_norm"] = attn.q_norm, attn.k_norm
    return out


def _supported(layer: nn.Module, mods: dict[str, nn.Module]) -> bool:
    return (all(type(mods[name]) is nn.Linear for name in LINEARS)
            and all(is_rms_norm(m) for name, m in mods.items() if name not in LINEARS)
            and is_silu(layer.mlp))


def _parameters(mods: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, module in mods.items():
        out.append((f"{name}.weight", module.weight))
        if getattr(module, "bias", None) is not None:
            out.append((f"{name}.bias", module.bias))
    return out


def supports(layer: nn.Module, spec: ArchSpec) -> bool:
    """Whether ``backward`` computes this layer's gradients (else the replay does)."""
    return spec.llama_like and _supported(layer, _modules(layer, spec))


def parameters(layer: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Parameter]]:
    """The layer's parameters in the order ``backward`` returns their gradients: ("<module>.weight", p), ..."""
    return _parameters(_modules(layer, spec))


def prepare(layer: nn.Module, spec: ArchSpec) -> tuple[dict[str, nn.Module], list[tuple[str, nn.Parameter]]] | None:
    """(the layer's modules by name, ``parameters``) when ``backward`` supports the layer, else None — one
    module walk per layer call, kept by the token-sparse layer for its backward (host time: the walk and the
    checks cost ~40 µs a layer on a GPU host, where the step waits on the host)."""
    if not spec.llama_like:  # other families' layers: the autograd replay
        return None
    mods = _modules(layer, spec)
    return (mods, _parameters(mods)) if _supported(layer, mods) else None


def _mm(a: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b, in ``compute_dtype`` when autocast was on (both operands cast, as autocast's GEMMs do)."""
    if compute_dtype is not None:
        a, b = a.to(compute_dtype), b.to(compute_dtype)
    return a @ b


def _full_size(grad: torch.Tensor, param: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """A sliced gradient as ``param``'s gradient (omitted rows / columns: 0)."""
    return grad if index is None else full_size_grad(grad, param.shape, dim, index)


class _Grads:
    """Collects parameter gradients by name, in ``param`` dtypes and full sizes."""

    def __init__(self, mods: dict[str, nn.Module], plan: LayerPlan | None, compute_dtype: torch.dtype | None):
        self.mods, self.plan, self.compute_dtype, self.grads = mods, plan, compute_dtype, {}

    def linear(self, name: str, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Weight (and bias) gradient of linear ``name`` from its output grad dy [M, out'] and input x [M, in']."""
        module = self.mods[name]
        rows, cols = (None, None) if self.plan is None else self.plan.slices(name)
        dw = _mm(dy.t(), x, self.compute_dtype).to(module.weight.dtype)
        # zeros + index_copy_ here, not ops.expand_grad's one-pass kernel: that saves ~10 µs of GPU per weight
        # but costs ~30 µs more host time per launch, and a token-sparse step with omission is host-bound
        # (benchmarks/results/2026-11-24-h100-omission-fast/)
        dw = _full_size(dw, module.weight, rows, 0) if rows is not None else _full_size(dw, module.weight, cols, 1)
        self.grads[f"{name}.weight"] = dw
        if module.bias is not None:
            db = (dy if self.compute_dtype is None else dy.to(self.compute_dtype)).sum(0)
            self.grads[f"{name}.bias"] = _full_size(db.to(module.bias.dtype), module.bias, rows, 0)

    def norm(self, name: str, dweight: torch.Tensor) -> None:
        self.grads[f"{name}.weight"] = dweight.to(self.mods[name].weight.dtype)

    def ordered(self, params: list[tuple[str, nn.Parameter]]) -> tuple[torch.Tensor | None, ...]:
        return tuple(self.grads.get(name) if p.requires_grad else None for name, p in params)


def backward(dy: torch.Tensor, *, layer: nn.Module, spec: ArchSpec, plan: LayerPlan | None,
             saved: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
             attention_backward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             ops: Eager, params: list[tuple[str, nn.Parameter]], compute_dtype: torch.dtype | None = None,
             sliced: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
             mods: dict[str, nn.Module] | None = None):
    """Gradients of one decoder layer on its M kept rows.

    Args:
        dy: [M, d] gradient of the layer output at the kept rows.
        saved: kept rows of the forward: ``x`` [M, d] layer input, ``o`` [M, H', D] attention output, and the
            linear outputs ``o_proj`` [M, d], ``gate_proj`` / ``up_proj`` [M, m'] (and ``q_proj`` / ``k_proj``
            with q/k norms); a missing linear output is recomputed (activation checkpointing).
        cos, sin: [M, D] rotary tables of the kept rows.
        attention_backward: do [M, H', D] → dq [M, H', D], dk, dv [M, Hkv', D] (kept keys).
        ops: ``ELEMENTWISE[...]`` — eager or compiled element-wise formulas.
        params: ``parameters(layer, spec)``; mods: the layer's modules (``prepare``), or None to look them up.
        compute_dtype: the forward's autocast dtype (GEMMs in it, as autocast's linear), or None.
        sliced: name → (weight, bias) the forward sliced under ``plan`` (kept: no second slicing here), or
            None to slice again.

    Returns:
        (dx [M, d], gradients of ``params`` in order, full-sized; None for frozen ones).
    """
    mods = mods if mods is not None else _modules(layer, spec)
    cd = compute_dtype
    grads = _Grads(mods, plan, cd)
    weights = {name: sliced[name] if sliced and name in sliced else plan_weight(mods[name], name, plan)
               for name in LINEARS}
    norm_eps = {name: mods[name].variance_epsilon for name in mods if name not in LINEARS}

    def out_of(name: str, x: torch.Tensor) -> torch.Tensor:  # saved linear output, or recomputed (checkpointing)
        if name in saved:
            return saved[name]
        weight, bias = weights[name]
        if cd is not None:
            x, weight, bias = x.to(cd), weight.to(cd), None if bias is None else bias.to(cd)
        return torch.nn.functional.linear(x, weight, bias)

    def dx_of(name: str, dy: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # input grad, in the input's dtype
        return _mm(dy, weights[name][0], cd).to(like.dtype)

    x, o = saved["x"], saved["o"]
    M = x.shape[0]
    o_flat = o.reshape(M, -1)
    dy = dy.to(x.dtype)

    # ---- MLP: y = h + down(silu(gate(n2)) * up(n2)), n2 = norm2(h), h = x + o_proj(o)
    h = x + out_of("o_proj", o_flat)
    n2 = ops.fn(rms_norm)(h, mods["post_attention_layernorm"].weight, norm_eps["post_attention_layernorm"])
    gate, up = out_of("gate_proj", n2), out_of("up_proj", n2)
    a = ops.fn(swiglu)(gate, up)
    grads.linear("down_proj", dy, a)
    da = dx_of("down_proj", dy, a)
    dgate, dup = ops.fn(swiglu_backward)(da, gate, up)
    del a, da
    grads.linear("gate_proj", dgate, n2)
    grads.linear("up_proj", dup, n2)
    dn2 = dx_of("gate_proj", dgate, n2) + dx_of("up_proj", dup, n2)
    del dgate, dup, gate, up
    dh, dnorm = ops.fn(rms_norm_backward)(dn2, h, mods["post_attention_layernorm"].weight,
                                          norm_eps["post_attention_layernorm"], dy)  # + dy: the residual
    grads.norm("post_attention_layernorm", dnorm)
    del dn2, h, n2

    # ---- attention: h = x + o_proj(attn(rope(q), rope(k), v)), q / k / v = proj(norm1(x))
    grads.linear("o_proj", dh, o_flat)
    do = dx_of("o_proj", dh, o).view_as(o)
    dq, dk, dv = attention_backward(do)
    del do
    n1 = ops.fn(rms_norm)(x, mods["input_layernorm"].weight, norm_eps["input_layernorm"])
    projected = cd if cd is not None else n1.dtype  # dtype of the q / k / v projections' outputs
    if spec.qk_norm:  # norms per head between the projections and RoPE
        D = o.shape[-1]
        q_lin = out_of("q_proj", n1).view(M, -1, D)
        k_lin = out_of("k_proj", n1).view(M, -1, D)
        qn_dtype = torch.promote_types(mods["q_norm"].weight.dtype, q_lin.dtype)  # the norms' output dtype
        kn_dtype = torch.promote_types(mods["k_norm"].weight.dtype, k_lin.dtype)
        dq, dk = ops.fn(rope_backward)(dq, dk, cos, sin, qn_dtype, kn_dtype)
        dq, dqn = ops.fn(rms_norm_backward)(dq, q_lin, mods["q_norm"].weight, norm_eps["q_norm"])
        dk, dkn = ops.fn(rms_norm_backward)(dk, k_lin, mods["k_norm"].weight, norm_eps["k_norm"])
        grads.norm("q_norm", dqn)
        grads.norm("k_norm", dkn)
    else:
        dq, dk = ops.fn(rope_backward)(dq, dk, cos, sin, projected, projected)
    dq, dk, dv = (t.reshape(M, -1).to(projected) for t in (dq, dk, dv))
    grads.linear("q_proj", dq, n1)
    grads.linear("k_proj", dk, n1)
    grads.linear("v_proj", dv, n1)
    dn1 = dx_of("q_proj", dq, n1) + dx_of("k_proj", dk, n1) + dx_of("v_proj", dv, n1)
    del dq, dk, dv
    dx, dnorm = ops.fn(rms_norm_backward)(dn1, x, mods["input_layernorm"].weight, norm_eps["input_layernorm"],
                                          dh)  # + dh: the residual
    grads.norm("input_layernorm", dnorm)
    return dx, grads.ordered(params)
