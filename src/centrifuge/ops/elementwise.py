"""The element-wise pieces of a decoder layer (RMSNorm, RoPE, SwiGLU), eager or compiled.

The token-sparse layer (``centrifuge.tokens.layer``) runs these twice: on all rows in the forward, and again
under autograd on the kept rows in the backward's replay. Eagerly, each is a handful of small kernels plus
autograd bookkeeping per call — on a GPU a visible part of the step once the GEMMs have shrunk.
``ELEMENTWISE["compiled"]`` runs each as one fused kernel: where no autograd is recorded (the layer's forward
and its hand-written backward) a hand-written Triton kernel (``ops.elementwise_triton``, CUDA), since the
step is host-bound there and a call costs 33–54 µs of host time against 85 µs for a dynamic-shape
``torch.compile`` call (measured on an H100 host); elsewhere (the autograd replay, the CPU)
``torch.compile`` (``fullgraph=True``: no graph breaks by construction; ``dynamic=True``: one graph for every
row count, so varying kept counts do not recompile).

Both follow the Hugging Face Llama-family modules exactly (RMSNorm computes in float32 and multiplies the
weight in the input dtype; RoPE rotates halves); modules of another kind fall back to calling the module.

    ops = ELEMENTWISE["compiled"]
    n = ops.norm(layer.input_layernorm, x)           # x [R, d] → [R, d]
    q, k = ops.rope(spec, q, k, cos, sin)             # q [R, H, D], k [R, Hkv, D], cos/sin [R, D]
    a = ops.gated(layer.mlp, gate, up)                # gate, up [R, m] → [R, m]
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from centrifuge.ops import elementwise_triton
from centrifuge.ops.liger import is_liger_rms_norm, is_liger_rope, is_liger_swiglu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm``: x [..., d] normalised in float32, cast back, times weight [d]."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1`` on token rows: q [R, H, D], k [R, Hkv, D],
    cos / sin [R, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, both [R, m]."""
    return F.silu(gate) * up


# ---- their backward formulas, for the hand-written kept-rows backward (``centrifuge.tokens.direct``). Each
# follows autograd's own decomposition of the forward above, op by op and in the same precisions, so that in
# float64 the two agree to rounding of the last bit.


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                      add: torch.Tensor | None = None):
    """Backward of ``rms_norm``: grad, x [R, ..., d] → (dx [like x], dweight [d] in grad's opmath dtype).
    ``add`` (like x): a gradient added to dx (the residual branch's, saving the caller one kernel)."""
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = h * r
    acc = _opmath(grad.dtype)
    dweight = (grad.to(acc) * normed.to(x.dtype).to(acc)).flatten(0, -2).sum(0)
    dn = (grad * weight).to(x.dtype).to(torch.float32)
    d_var = -0.5 * (dn * h).sum(-1, keepdim=True) * r.pow(3)
    dh = dn * r + (d_var.expand_as(h) / h.shape[-1]) * (2 * h)
    dx = dh.to(x.dtype)
    return (dx if add is None else dx + add), dweight


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_rotate_half`` (its backward)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def rope_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_dtype: torch.dtype, k_dtype: torch.dtype):
    """Backward of ``rope``: dq [R, H, D], dk [R, Hkv, D], cos / sin [R, D] → (dq, dk) before rotation, in
    the dtypes q / k had entering ``rope``. Each term is cast before the sum, as autograd casts each product's
    gradient to its input's dtype (under autocast, bf16 q times fp32 tables)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def back(d, dtype):
        return (d * cos).to(dtype) + _rotate_half_t((d * sin).to(dtype))

    return back(dq, q_dtype), back(dk, k_dtype)


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Backward of ``swiglu``: grad, gate, up [R, m] → (dgate, dup)."""
    dup = grad * F.silu(gate)
    dsilu = grad * up
    acc = _opmath(gate.dtype)
    g = gate.to(acc)
    s = torch.sigmoid(g)
    return (dsilu.to(acc) * s * (1 + g * (1 - s))).to(gate.dtype), dup


# The RMSNorm classes known to compute exactly ``rms_norm`` (other models' norms differ, e.g. Gemma's 1 + w).
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes ``rms_norm`` — a known class whose forward was not replaced on the instance,
    or a Liger-Kernel RMSNorm with HF Llama's semantics (``ops.liger.is_liger_rms_norm``)."""
    if (type(module).__name__ in _RMS_NORMS and "forward" not in vars(module)
            and hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)):
        return True
    return is_liger_rms_norm(module)


def is_silu(mlp: nn.Module) -> bool:
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    return act == "silu" or isinstance(getattr(mlp, "act_fn", None), nn.SiLU)


def _gate_act(mlp: nn.Module, activation: str = "act_fn"):
    """The MLP's gate activation: its ``activation`` module, or SiLU for Liger's SwiGLU MLP (which has no
    ``act_fn``)."""
    act = getattr(mlp, activation, None)
    if act is None and is_liger_swiglu(mlp):
        return F.silu
    return act


class Eager:
    """The modules' own forwards (HF code, unchanged)."""

    name = "eager"

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if is_liger_rms_norm(module):  # Liger's kernel needs CUDA and its layout: the same formula, in torch
            return rms_norm(x, module.weight, module.variance_epsilon)
        return module(x)

    def rope(self, spec, q, k, cos, sin):
        fn = spec.apply_rotary_pos_emb
        if is_liger_rope(fn):  # Liger's wants [B, H, T, D] (and CUDA): the same formula on token rows
            return rope(q, k, cos, sin)
        return fn(q, k, cos, sin, unsqueeze_dim=1)

    def gated(self, mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, activation: str = "act_fn") -> torch.Tensor:
        """act(gate) * up with the MLP's activation module (attribute ``activation``: Phi-3's "activation_fn")."""
        return _gate_act(mlp, activation)(gate) * up

    # Plain formulas for the hand-written backward (which checks ``is_rms_norm`` / ``is_silu`` first).
    def fn(self, f):
        """``f`` itself (eager) — ``Compiled`` returns it compiled."""
        return f


def _recompile_limit_hit(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) is dynamo refusing to compile ``fn`` once more."""
    while err is not None:
        if type(err).__name__ == "FailOnRecompileLimitHit" or "recompile limit" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


@functools.cache
def _compiled(fn):
    """``fn`` through ``torch.compile``; past dynamo's recompile limit for ``fn`` (``recompile_limit``, 8 by
    default — each new dtype / rank / requires-grad / autocast combination of the inputs is one more
    compilation, and one process can meet many: fp32 and bf16 models, autocast, evaluation), the calls that
    would need another compilation run ``fn`` eagerly (same formulas, same results) with one warning,
    instead of failing the step."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    warned = []

    def call(*args):
        try:
            return compiled(*args)
        except Exception as err:
            if not _recompile_limit_hit(err):
                raise
            if not warned:
                warned.append(True)
                warnings.warn(f"centrifuge: torch.compile of {fn.__name__} reached dynamo's recompile limit; "
                              "new input kinds run it eagerly", RuntimeWarning, stacklevel=2)
            return fn(*args)

    return call


def _no_autograd(tensors) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _triton_takes(args) -> bool:
    """Whether ``elementwise_triton`` takes ``args``: no autograd recording (the kernels have no backward),
    tensors the kernels support, and one dtype throughout. Mixed dtypes (autocast: bf16 activations, fp32
    norm weights and rotary tables) go through torch.compile: the kernels follow the promotions (tested in
    the interpreter), but on the GPU only the one-dtype case is checked against the formulas."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    dtypes = {t.dtype for t in tensors} | {a for a in args if isinstance(a, torch.dtype)}
    return len(dtypes) == 1 and _no_autograd(tensors) and elementwise_triton.supported(*tensors)


@functools.cache
def _fused(f):
    """Formula ``f`` run by its Triton kernel where ``_triton_takes`` says so, else through torch.compile."""
    triton_f = getattr(elementwise_triton, f.__name__)
    compiled_f = _compiled(f)

    def call(*args):
        return triton_f(*args) if _triton_takes(args) else compiled_f(*args)

    return call


class Compiled(Eager):
    """The same formulas as fused kernels: without autograd recording (the token-sparse layer's forward and
    hand-written backward) on CUDA, hand-written Triton kernels (``ops.elementwise_triton``: 33–54 µs of host
    time a call against 85 µs for a dynamic-shape ``torch.compile`` call, and this step is host-bound);
    elsewhere (the autograd replay, CPU) through ``torch.compile`` (compiled lazily, once per process)."""

    name = "compiled"

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not is_rms_norm(module):
            return module(x)
        return _fused(rms_norm)(x, module.weight, module.variance_epsilon)

    def rope(self, spec, q, k, cos, sin):
        if cos.shape[-1] != q.shape[-1]:  # partial rotary (e.g. Phi-3 variants): the model's own function
            return super().rope(spec, q, k, cos, sin)
        return _fused(rope)(q, k, cos, sin)

    def gated(self, mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, activation: str = "act_fn") -> torch.Tensor:
        if activation != "act_fn" or not is_silu(mlp):
            return super().gated(mlp, gate, up, activation)
        return _fused(swiglu)(gate, up)

    def fn(self, f):
        return _fused(f) if f in _FORMULAS else _compiled(f)


_FORMULAS = (rms_norm, rope, swiglu, rms_norm_backward, rope_backward, swiglu_backward)


EAGER = Eager()
ELEMENTWISE: dict[str, Eager] = {"eager": EAGER, "compiled": Compiled()}
