"""The token-sparse decoder layer: full-row forward, backward on kept rows only.

One recipe (``attention_inputs`` + ``layer_output``) describes a decoder layer of every registered family on
token rows [R, d] (where the families differ — norm placement, fused projections, multipliers, mixture-of-
experts blocks — is read from the ``ArchSpec``). It runs twice with different ways of doing a linear layer
and attention:

* forward (``_TokenSparseLayer.forward``): on all N rows without autograd, exactly the dense forward,
  saving what the backward needs — all rows when the keep set is decided after the forward (exact Rho-1
  selection), only the kept rows when it is known before (the activation-memory saving);
* backward: a small autograd graph over the M kept rows is *replayed* from the saved tensors. Linear layers
  do not recompute their GEMMs (``_SavedLinear`` returns the saved output and does only dX = dY·W and
  dW = dYᵀ·X on M rows); norms, RoPE and the gated activation recompute cheaply on M rows; attention returns
  its saved output and its backward is the backend's kept-token backward. So every GEMM of the backward
  has M = kept rows.

Between layers the gradient travels as a row-sparse COO tensor (indices = kept rows, values [M, d]), so no
zero-filled [N, d] gradient is ever built between layers.

Activation checkpointing (the layer's Hugging Face ``gradient_checkpointing`` flag, set by
``model.gradient_checkpointing_enable()``): the forward then saves only the layer input and attention output
rows (plus full-row K / V, which kept queries read), and the backward *recomputes* the linear outputs whose
values it needs (``o_proj``, ``gate_proj``, ``up_proj``; ``q`` / ``k`` with q/k-norm) on the kept rows
only — so the recompute, like the backward, costs M rows, not N.

Neuron omission composes with this: when an ``Omitter`` (``centrifuge.neurons``) has set a plan on the layer,
every linear layer of both passes uses the plan's sliced weights (kept MLP channels, kept KV groups' heads),
so the backward GEMMs shrink in both M (kept tokens) and N or K (kept neurons); attention runs on the kept
heads only. The layer's importance statistics are gathered from the full-row forward, as the omission
path's own forwards would.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from centrifuge.models.registry import ArchSpec
from centrifuge.neurons.layers import STATE_ATTR as OMISSION_ATTR
from centrifuge.neurons.layers import LayerOmission, plan_weight
from centrifuge.neurons.plan import LayerPlan
from centrifuge.ops.attention import choose_backend
from centrifuge.ops.elementwise import EAGER, ELEMENTWISE, Eager
from centrifuge.tokens import direct
from centrifuge.tokens.layout import TokenLayout

Linear = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]

# Our row-sparse gradients are built sorted and unique by construction (``check_invariants=False`` on purpose);
# torch >= 2.11 still warns once per process that invariant checks are off. Silence exactly that message.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


# --------------------------------------------------------------------------------------------------------
# The layer recipe, on token rows
# --------------------------------------------------------------------------------------------------------


def _norm(layer: nn.Module, name: str | None, x: torch.Tensor, ops: Eager) -> torch.Tensor:
    """The layer's norm ``name`` applied to x (the HF module's own formula, e.g. Gemma's ``(1 + w)``), or x
    unchanged where the family has no norm at that place (``ArchSpec.norms``)."""
    return x if name is None else ops.norm(getattr(layer, name), x)


def _scaled(t: torch.Tensor, factor: float | None) -> torch.Tensor:
    return t if factor is None else t * factor


def attention_inputs(layer: nn.Module, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, linear: Linear, ops: Eager = EAGER):
    """x [R, d] → q [R, H, D], k [R, Hkv, D], v [R, Hkv, D] after (q/k norm and) RoPE."""
    attn = layer.self_attn
    D, R = attn.head_dim, x.shape[0]
    n = _norm(layer, spec.norms[0], x, ops)
    if spec.fused_qkv:  # [q; k; v] rows of one projection (Phi-3); slicing a linear's output is exact
        qkv = linear(getattr(attn, spec.fused_qkv), n, spec.fused_qkv)
        kv = (qkv.shape[-1] - attn.config.num_attention_heads * D) // 2  # (kept) K / V width
        q, k, v = qkv.split([qkv.shape[-1] - 2 * kv, kv, kv], dim=-1)
    else:
        q, k, v = (linear(getattr(attn, name), n, name) for name in ("q_proj", "k_proj", "v_proj"))
    if spec.qk_norm and spec.qk_norm_flat:  # OLMo 2: one norm over all heads of the projection
        q, k = ops.norm(attn.q_norm, q), ops.norm(attn.k_norm, k)
    q, k, v = (t.reshape(R, -1, D) for t in (q, k, v))
    if spec.qk_norm and not spec.qk_norm_flat:
        q, k = ops.norm(attn.q_norm, q), ops.norm(attn.k_norm, k)
    q, k = ops.rope(spec, q, k, cos, sin)
    # Under autocast the projections are bf16 but fp32 RoPE tables promote q / k to fp32; attention then
    # runs in the projections' dtype, as autocast's SDPA does in the dense model.
    return q.to(v.dtype), k.to(v.dtype), v


def layer_output(layer: nn.Module, spec: ArchSpec, x: torch.Tensor, o: torch.Tensor, linear: Linear,
                 ops: Eager = EAGER) -> torch.Tensor:
    """x [R, d], attention output o [R, H, D] → layer output [R, d]."""
    pre_attn, post_attn, pre_mlp, post_mlp = spec.norms
    del pre_attn  # (attention_inputs')
    residual = spec.scalar(layer.self_attn.config, spec.residual_multiplier)  # Granite
    a = _norm(layer, post_attn, linear(layer.self_attn.o_proj, o.reshape(o.shape[0], -1), "o_proj"), ops)
    h = x + _scaled(a, residual)
    n2 = _norm(layer, pre_mlp, h, ops)
    mlp = layer.mlp
    if spec.moe and hasattr(mlp, "experts"):  # a mixture-of-experts block, whole (see ArchSpec.moe); [1, R, d]
        out = linear(mlp, n2[None], "moe")
        out = out[0] if isinstance(out, tuple) else out  # (older transformers also return the router logits)
        return h + _scaled(_norm(layer, post_mlp, out[0], ops), residual)
    if spec.fused_gate_up:  # [gate; up] rows of one projection (Phi-3)
        gate, up = linear(getattr(mlp, spec.fused_gate_up), n2, spec.fused_gate_up).chunk(2, dim=-1)
    else:
        gate, up = linear(mlp.gate_proj, n2, "gate_proj"), linear(mlp.up_proj, n2, "up_proj")
    m = _norm(layer, post_mlp, linear(mlp.down_proj, ops.gated(mlp, gate, up, spec.activation), "down_proj"), ops)
    return h + _scaled(m, residual)


# Linear outputs whose *values* the replayed graph needs (their consumers' backward reads them).
def _value_outputs(spec: ArchSpec) -> tuple[str, ...]:
    names = ("o_proj", spec.fused_gate_up) if spec.fused_gate_up else ("o_proj", "gate_proj", "up_proj")
    if spec.qk_norm:
        names += (spec.fused_qkv,) if spec.fused_qkv else ("q_proj", "k_proj")
    if spec.norms[3] is not None:  # a norm reads the MLP's output
        names += ("down_proj",)
    return names


# --------------------------------------------------------------------------------------------------------
# Per-step state shared by the layers of one forward
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepState:
    """What every layer of one forward needs, fixed for the whole step (frozen: nothing here changes after the
    step starts, so a backward can never read a value another layer's forward left behind).

    What differs between layers — the attention geometry (``TokenLayout``: window, segments) — is *not* here:
    each layer gets its own (``token_sparse_layer``'s ``layout``) and its autograd context saves it.

    Attributes:
        keep: [M] int64 sorted kept row ids when the keep set is known before the forward, else None: then the
            selection after the forward makes it, and it reaches each layer's backward with the gradient
            itself (the row indices of the row-sparse gradient, ``kept_rows``) — one way, no shared state.
        attention: backend name ("auto", "math", "flash").
        elementwise: "eager" (the HF modules) or "compiled" (``centrifuge.ops.elementwise``).
        backward: "auto" (the hand-written backward where it applies) or "replay" (always the autograd replay).
        router_logits: mixture-of-experts layers also return their router logits [N, E] (a second output whose
            gradient — the auxiliary load-balancing loss's — the layer's backward takes on its kept rows).
        kept_rope: the per-step memo of the kept rows' rotary tables (``KeptRope``; the full-row tables are
            per layer: Gemma 3's local and global layers use different ones).
    """

    keep: torch.Tensor | None
    attention: str = "auto"
    elementwise: str = "eager"
    backward: str = "auto"
    router_logits: bool = False
    kept_rope: KeptRope = dataclasses.field(default_factory=lambda: KeptRope())


class KeptRope:
    """cos / sin of the kept rows [M, D], gathered once per step and table for all layers (host time: two
    gathers per layer saved). A memo of a pure function of the (table, kept rows) it is given — not state a
    backward depends on: a different keep tensor simply gathers again. It holds the tensors it gathered
    from and for, so their storage cannot be freed and reused while the memo compares against it."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self._memo.get(id(cos))
        if memo is not None and memo[0] is cos and memo[1].shape == keep.shape and (
                memo[1] is keep or memo[1].data_ptr() == keep.data_ptr()):
            return memo[2], memo[3]
        kept = (cos.index_select(0, keep), sin.index_select(0, keep))
        self._memo[id(cos)] = (cos, keep, *kept)
        return kept


def kept_rows(grad: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """The step's kept rows [M] in a layer's backward: ``known`` (saved by the layer's forward when the keep
    set was known before it), else the row indices of the incoming row-sparse gradient — the selection made
    after the forward travels down the backward with the gradient (``GatherRows`` starts it)."""
    if known is not None:
        return known
    if not grad.is_sparse:
        raise RuntimeError("the token-sparse layer's backward got a dense gradient while the keep set was chosen "
                           "after the forward; the layer output must reach the loss only through the "
                           "token-sparse step (centrifuge's patched forward)")
    if not grad.is_coalesced():
        grad = grad.coalesce()
    return grad._indices()[0]


# --------------------------------------------------------------------------------------------------------
# Autograd pieces
# --------------------------------------------------------------------------------------------------------


def sparse_rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A row-sparse COO gradient: ``values`` [M, d] at sorted unique ``rows`` [M] of an [N, d] tensor."""
    return torch.sparse_coo_tensor(
        rows[None], values, (num_rows, *values.shape[1:]), is_coalesced=True, check_invariants=False
    )


def dense_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The [M, d] rows ``rows`` of a gradient that is either dense or row-sparse COO."""
    if grad.is_sparse:
        indices = grad._indices()
        if indices.shape[1] == rows.shape[0] and indices.data_ptr() == rows.data_ptr():
            return grad._values()  # our own compact gradient, passed through untouched
        grad = grad.to_dense()
    return grad.index_select(0, rows)


class GatherRows(torch.autograd.Function):
    """h [N, d] → h[rows] [M, d]; the backward returns a row-sparse gradient (no [N, d] zeros)."""

    @staticmethod
    def forward(ctx, h, rows):
        ctx.rows, ctx.num_rows = rows, h.shape[0]
        return h.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        return sparse_rows(grad, ctx.rows, ctx.num_rows), None


class DensifyGrad(torch.autograd.Function):
    """Identity whose backward turns a row-sparse gradient dense (for ops such as the embedding)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


class _SavedLinear(torch.autograd.Function):
    """A linear layer whose output is already known: backward only, on the rows it is given.

    forward(x [M, in], weight [out, in], bias, out_values [M, out] or None) returns ``out_values``
    itself (no copy), or an uninitialised tensor when nothing in the replayed graph reads the values
    (RoPE, residual adds and the attention replay need only gradients, never these values)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_values):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if out_values is None:  # in the dtype the real linear would give (autocast's, if on)
            dtype = _autocast_state(x.device.type) or torch.promote_types(x.dtype, weight.dtype)
            return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype)
        return out_values

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dt = dy.dtype
        dx = dy @ weight.to(dt) if ctx.needs_input_grad[0] else None
        dw = (dy.t() @ x.to(dt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dy.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class _SavedAttention(torch.autograd.Function):
    """Attention of the kept rows whose output is already known; backward = backend.backward_kept."""

    @staticmethod
    def forward(ctx, q_k, k_k, v_k, o_k, attn):
        ctx.attn = attn
        return o_k

    @staticmethod
    def backward(ctx, do_k):
        dq, dk, dv = ctx.attn(do_k.contiguous())
        return dq, dk, dv, None, None


def _saved_linear(outputs: dict[str, torch.Tensor], plan: LayerPlan | None,
                  recompute: tuple[str, ...] = ()) -> Linear:
    """The replay's linear: the saved output (``_SavedLinear``), or for names in ``recompute`` (activation
    checkpointing) a real GEMM on the kept rows."""
    def linear(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        if type(module) is nn.Linear:
            weight, bias = plan_weight(module, name, plan)
            if name in recompute:
                return F.linear(x, weight, bias)
            return _SavedLinear.apply(x, weight, bias, outputs.get(name))
        return module(x)  # e.g. a PEFT LoRA layer: recompute on the kept rows (row-wise, so exact)
    return linear


def _omission(layer: nn.Module) -> LayerOmission | None:
    """The layer's neuron-omission state when an ``Omitter`` is attached and the layer is training."""
    om = getattr(layer.mlp, OMISSION_ATTR, None) or getattr(layer.self_attn, OMISSION_ATTR, None)
    return om if om is not None and layer.training else None


@torch.no_grad()
def _observe(om: LayerOmission, layer: nn.Module, inputs: dict[str, torch.Tensor], o: torch.Tensor) -> None:
    """Feed the omission statistics from the full-row forward (inputs of the linears, attention output)."""
    plan = om.plan
    if om.original_mlp is not None:
        om.observe_mlp(layer.mlp, inputs["gate_proj"], inputs["down_proj"], None if plan is None else plan.channels)
    if om.original_attn is not None:
        om.observe_attn(layer.self_attn, inputs["q_proj"], o[None], None if plan is None else plan.groups)


# --------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------


class _RouterLogits:
    """Captures the router logits of a mixture-of-experts block while it runs (a forward hook on its ``gate``:
    the HF router returns (logits, weights, indices), or the logits alone in older versions)."""

    def __init__(self, layer: nn.Module, spec: ArchSpec, enabled: bool):
        self.logits: torch.Tensor | None = None
        on = enabled and spec.moe and hasattr(layer.mlp, "experts")
        self.handle = layer.mlp.gate.register_forward_hook(self._hook) if on else None

    def _hook(self, module, args, out):
        self.logits = out[0] if isinstance(out, tuple) else out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _TokenSparseLayer(torch.autograd.Function):
    """forward(x, layer, spec, step, layout, rope, prepared, *params): ``layout`` = this layer's attention
    geometry and ``rope`` = its rotary tables (cos, sin [N, D]), both saved in the context (the backward reads
    nothing the step shares); ``prepared`` = ``direct.prepare``'s
    (modules, parameters) for the hand-written backward (``centrifuge.tokens.direct``), which returns the
    gradients of ``params`` (the layer's parameters, in ``direct.parameters`` order); None = the replay, with
    ``params`` empty (it accumulates them itself)."""

    @staticmethod
    def forward(ctx, x, layer, spec: ArchSpec, step: StepState, layout: TokenLayout, rope, prepared, *params):
        device_type = x.device.type
        use_direct = prepared is not None
        ctx.autocast = _autocast_state(device_type)
        ctx.direct = prepared
        ctx.num_params = len(params)
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        value_names = _value_outputs(spec)
        om = _omission(layer)
        plan = None if om is None else om.plan
        checkpointed = bool(getattr(layer, "gradient_checkpointing", False)) and layer.training
        # the direct backward reuses the forward's weight slices (one index_select per projection less, each
        # ~10-20 µs of GPU and host time), held till then: half a layer's weights at rate 0.5, so not with
        # activation checkpointing, whose point is memory
        sliced: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = (
            {} if use_direct and plan is not None and not checkpointed else None)

        def record(module, inp, name):
            if plan is None or type(module) is not nn.Linear:
                out = module(inp)
            else:
                weight, bias = plan_weight(module, name, plan)
                if sliced is not None:
                    sliced[name] = (weight, bias)
                out = F.linear(inp, weight, bias)
            if name in value_names:
                outputs[name] = out
            inputs[name] = inp
            return out

        ops = ELEMENTWISE[step.elementwise]
        q, k, v = attention_inputs(layer, spec, x, *rope, record, ops)
        backend = choose_backend(step.attention, q, layout)
        scale = layer.self_attn.scaling
        with torch.autocast(device_type, enabled=False):  # backends pick their own precision
            o, aux = backend.forward(q, k, v, layout, scale)
        with _RouterLogits(layer, spec, step.router_logits) as router:
            y = layer_output(layer, spec, x, o, record, ops)
        if om is not None and om.gathers:
            _observe(om, layer, inputs, o)
        inputs.clear()

        # What to keep: row-wise tensors (all rows, or kept rows when the keep set is known already),
        # full-row K / V (kept queries read every key), and q / o / lse per the backend's needs.
        compact = step.keep is not None
        rowwise = {"x": x, "o": o} if checkpointed else {"x": x, "o": o, **outputs}
        queries = {"q": q, "aux": aux} if isinstance(aux, torch.Tensor) else {"q": q}
        if compact:
            keep = step.keep
            rowwise = {n: t.index_select(0, keep) for n, t in rowwise.items()}
            if not backend.needs_full_queries:
                queries = {n: t.index_select(0, keep) for n, t in queries.items()}
        if not compact or backend.needs_full_queries:
            queries["o_full"] = o
        ctx.rowwise_names = list(rowwise)
        ctx.query_names = list(queries)
        ctx.save_for_backward(*rowwise.values(), *queries.values(), k, v)
        ctx.aux_other = None if isinstance(aux, torch.Tensor) else aux
        # The layer's own geometry and the step's fixed inputs travel in the context; the kept rows too when
        # known now (else they arrive with the gradient: ``kept_rows``).
        ctx.layer, ctx.spec, ctx.step, ctx.backend, ctx.scale = layer, spec, step, backend, scale
        ctx.layout, ctx.rope, ctx.keep = layout, rope, step.keep
        ctx.compact = compact
        ctx.plan, ctx.sliced = plan, sliced
        ctx.recompute = value_names if checkpointed else ()
        return y if router.handle is None else (y, router.logits)

    @staticmethod
    def backward(ctx, grad_y, grad_router=None):
        step: StepState = ctx.step
        keep = kept_rows(grad_y, ctx.keep)
        layout: TokenLayout = ctx.layout
        saved = list(ctx.saved_tensors)
        n_row, n_q = len(ctx.rowwise_names), len(ctx.query_names)
        rowwise = dict(zip(ctx.rowwise_names, saved[:n_row], strict=True))
        queries = dict(zip(ctx.query_names, saved[n_row:n_row + n_q], strict=True))
        k_full, v_full = saved[n_row + n_q:]
        if not ctx.compact:
            rowwise = {n: t.index_select(0, keep) for n, t in rowwise.items()}
        backend = ctx.backend
        compact_queries = ctx.compact and not backend.needs_full_queries
        aux = queries.get("aux", ctx.aux_other)
        q_for_bwd = queries["q"]
        o_for_bwd = queries["o_full"] if "o_full" in queries else rowwise["o"]
        if compact_queries:
            o_for_bwd = rowwise["o"]

        def attention_backward(do_k):
            with torch.autocast(do_k.device.type, enabled=False):  # backends pick their own precision
                return backend.backward_kept(
                    do_k.to(v_full.dtype), q=q_for_bwd, k=k_full, v=v_full, o=o_for_bwd, aux=aux, keep=keep,
                    layout=layout, scale=ctx.scale, queries_compact=compact_queries,
                )

        dy = dense_rows(grad_y, keep)
        layer, spec = ctx.layer, ctx.spec
        cos_k, sin_k = step.kept_rope.get(*ctx.rope, keep)
        if ctx.direct is not None:
            mods, params = ctx.direct
            with torch.autocast(dy.device.type, enabled=False):  # it casts for itself, to ctx.autocast
                dx, param_grads = direct.backward(
                    dy, layer=layer, spec=spec, plan=ctx.plan, saved=rowwise, cos=cos_k,
                    sin=sin_k, attention_backward=attention_backward,
                    ops=ELEMENTWISE[step.elementwise], params=params, compute_dtype=ctx.autocast,
                    sliced=ctx.sliced, mods=mods)
            ctx.sliced = ctx.direct = None
            return sparse_rows(dx, keep, grad_y.shape[0]), None, None, None, None, None, None, *param_grads
        device_type = dy.device.type
        autocast = (torch.autocast(device_type, dtype=ctx.autocast) if ctx.autocast is not None
                    else torch.autocast(device_type, enabled=False))
        with torch.enable_grad(), autocast:
            x = rowwise["x"].detach().requires_grad_(True)
            linear = _saved_linear(rowwise, ctx.plan, ctx.recompute)
            ops = ELEMENTWISE[step.elementwise]
            q, k, v = attention_inputs(layer, spec, x, cos_k, sin_k, linear, ops)
            o = _SavedAttention.apply(q, k, v, rowwise["o"], attention_backward)
            with _RouterLogits(layer, spec, grad_router is not None) as router:
                y = layer_output(layer, spec, x, o, linear, ops)
            outputs, grads = [y], [dy.to(y.dtype)]
            if router.logits is not None:  # the auxiliary loss's gradient at the kept rows' router logits
                outputs.append(router.logits)
                grads.append(grad_router.index_select(0, keep).to(router.logits.dtype))
            torch.autograd.backward(outputs, grads)
        return (sparse_rows(x.grad, keep, grad_y.shape[0]), None, None, None, None, None, None,
                *([None] * ctx.num_params))


def token_sparse_layer(x: torch.Tensor, layer: nn.Module, spec: ArchSpec, step: StepState,
                       layout: TokenLayout, rope: tuple[torch.Tensor, torch.Tensor]
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run decoder ``layer`` on token rows x [N, d] with a kept-rows-only backward. Returns [N, d] — and, for a
    mixture-of-experts layer when ``step.router_logits``, its router logits [N, E] too (a tuple).

    ``layout``: this layer's attention geometry (its own sliding window and score soft-cap; layers may
    differ) and ``rope``: its rotary tables (cos, sin [N, D]), saved by the layer's autograd context.

    The backward is the hand-written one (``centrifuge.tokens.direct``) where it applies and ``step.backward``
    allows it, else the autograd replay."""
    prepared = direct.prepare(layer, spec) if step.backward != "replay" else None
    params = [p for _, p in prepared[1]] if prepared is not None else []
    return _TokenSparseLayer.apply(x, layer, spec, step, layout, rope, prepared, *params)


