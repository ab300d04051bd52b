"""Omission inside one decoder layer: sliced projections and the patched ``mlp`` / ``self_attn`` forwards.

The kept weights are sliced (``index_select``) *inside* the forward of the layer's ``mlp`` / ``self_attn``,
so autograd's backward is the same small GEMM (dX = dY·W_kept, dW_kept = dYᵀ·X) and the full-size weight
gradient is zero outside the kept rows / columns. Weights are never read outside these forwards, which run
inside the decoder layer's forward, where FSDP (wrapping per decoder layer) has them gathered.

``sliced_weight`` / ``sliced_linear`` and ``omission_linear`` are the function-level pieces: the latter is a
``linear(module, x, name)`` callback for the shared layer recipe (``centrifuge.tokens.layer``), so the
token-sparse path can run the same omission. The slices' backward copies into zeroed full-size gradients
(``gather``) instead of index_select's adding.

The patches are instance-level (``module.forward`` rebound on the one module; the class and every other
instance are untouched) and read the per-step ``LayerPlan`` that the ``Omitter`` sets on the layer's
``LayerOmission`` before each step. In eval mode the plan is ignored and the original forward runs.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from centrifuge.models.registry import ArchSpec, UnsupportedModelError
from centrifuge.neurons import importance, statistics
from centrifuge.neurons.plan import LayerPlan
from centrifuge.ops.expand_grad import expand_slice, expand_slice_reference

Linear = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]
STATE_ATTR = "_centrifuge_omission"


class _Gather(torch.autograd.Function):
    """``source.index_select(dim, index)`` for distinct ``index`` entries; the backward writes the full-size
    gradient in one pass (``full_size_grad``) where index_select's own backward zero-fills and then adds
    (``index_add_``: atomics, about 4 ms of a TinyLlama step at rate 0.5 on an H100). Equal results: each
    entry is written once."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, dim: int, index: torch.Tensor, dropped: torch.Tensor | None):
        ctx.dim, ctx.shape = dim, source.shape
        ctx.save_for_backward(index, dropped)
        return source.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, dropped = ctx.saved_tensors
        return full_size_grad(grad, ctx.shape, ctx.dim, index, dropped), None, None, None


def full_size_grad(grad: torch.Tensor, shape: torch.Size, dim: int, index: torch.Tensor,
                   dropped: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of a slice (``grad``: ``shape`` with ``len(index)`` entries along ``dim``) as a gradient
    of the whole tensor: zeros outside ``index`` (the omitted rows / columns). With ``dropped`` (the
    complement of ``index``) in one pass on the GPU (``ops.expand_grad``), else zeros + ``index_copy_``."""
    if dropped is None:
        return expand_slice_reference(grad, dim=dim, kept=index, size=shape[dim])
    return expand_slice(grad, dim=dim, kept=index, dropped=dropped, size=shape[dim])


def gather(source: torch.Tensor, dim: int, index: torch.Tensor, dropped: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``source.index_select(dim, index)`` (``index``: distinct ids; ``dropped``: their complement, optional)
    with the one-pass backward of ``_Gather``."""
    if not (torch.is_grad_enabled() and source.requires_grad):
        return source.index_select(dim, index)
    return _Gather.apply(source, dim, index, dropped)


def sliced_weight(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, *,
                  dropped_rows: torch.Tensor | None = None, dropped_cols: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``nn.Linear``'s (weight [r, c], bias [r] or None) restricted to output ``rows`` and input ``cols``
    (int64 ids; None = all). ``dropped_rows`` / ``dropped_cols``, their complements, let the backward write
    the full-size gradients in one pass."""
    weight, bias = module.weight, module.bias
    if rows is not None:
        weight = gather(weight, 0, rows, dropped_rows)
        bias = None if bias is None else gather(bias, 0, rows, dropped_rows)
    if cols is not None:
        weight = gather(weight, 1, cols, dropped_cols)
    return weight, bias


def plan_weight(module: nn.Module, name: str, plan: LayerPlan | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the projection ``module`` called ``name`` (e.g. "gate_proj") under ``plan``: its kept
    rows / columns with the one-pass backward (``sliced_weight``), or the whole weight when ``plan`` is None."""
    if plan is None:
        return module.weight, module.bias
    (rows, cols), (dropped_rows, dropped_cols) = plan.slices(name), plan.dropped(name)
    return sliced_weight(module, rows, cols, dropped_rows=dropped_rows, dropped_cols=dropped_cols)


def sliced_linear(module: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None, *, dropped_rows: torch.Tensor | None = None,
                  dropped_cols: torch.Tensor | None = None) -> torch.Tensor:
    """``module``'s linear map restricted to output ``rows`` and input ``cols``.

    Args:
        module: an ``nn.Linear`` with weight [out, in] (and bias [out]).
        x: [..., in] when ``cols`` is None, else [..., len(cols)].
        rows: [r] int64 kept output features, or None for all.
        cols: [c] int64 kept input features, or None for all.
        dropped_rows, dropped_cols: the complements of ``rows`` / ``cols`` (optional: a faster backward).

    Returns:
        [..., r] (or [..., out]). With neither, exactly ``module(x)``.
    """
    if rows is None and cols is None:
        return module(x)
    return F.linear(x, *sliced_weight(module, rows, cols, dropped_rows=dropped_rows, dropped_cols=dropped_cols))


def omission_linear(plan: LayerPlan | None) -> Linear:
    """A ``linear(module, x, name)`` callback for ``centrifuge.tokens.layer`` and the patched forwards below
    that applies ``plan``.

    q / k / v then return only the kept groups' heads ([R, g·G·D] / [R, g·D]), ``o_proj`` expects them, the
    MLP runs on the kept channels.
    """
    def linear(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        if plan is None:
            return module(x)
        (rows, cols), (dropped_rows, dropped_cols) = plan.slices(name), plan.dropped(name)
        return sliced_linear(module, x, rows, cols, dropped_rows=dropped_rows, dropped_cols=dropped_cols)
    return linear


# --------------------------------------------------------------------------------------------------------
# Per-layer state: plan, originals, importance statistics
# --------------------------------------------------------------------------------------------------------


class LayerOmission:
    """Omission state of one decoder layer, stored on its ``mlp`` and ``self_attn`` as ``_centrifuge_omission``.

    Attributes:
        plan: the current ``LayerPlan`` (set by the ``Omitter`` before each step) or None = dense.
        mlp_score: [m] float32 channel importance from earlier training forwards, or None.
        group_score: [Hkv] float32 KV-group importance, or None.
        mlp_x_ms, attn_x_ms: [d] float32 EMA of the squared input features (``wanda``), or None.
        version: how many times the statistics were updated.
        pending: kind ("mlp" / "group") → ``statistics.Pending``, activation statistics not yet in the scores
            (applied by ``statistics.flush``, which the ``Omitter`` runs for all layers at once; reading a
            score applies its own first).
    """

    def __init__(self, layer: nn.Module, spec: ArchSpec, layer_idx: int, *, metric: str, ema: float,
                 stat_tokens: int = 0):
        attn = layer.self_attn
        self.layer_idx = layer_idx
        self.spec = spec
        self.metric = metric
        self.ema = ema
        self.stat_tokens = stat_tokens  # tokens read per forward for the statistics (0 = all)
        self.version = 0  # counts statistics updates (a prefetched plan is valid while it stays)
        self.probe = layer.mlp.gate_proj.weight  # where the layer lives (Omitter._device)
        self.num_channels = layer.mlp.gate_proj.out_features
        self.head_dim = attn.head_dim
        self.heads_per_group = attn.num_key_value_groups
        self.num_groups = attn.k_proj.out_features // attn.head_dim
        self.plan: LayerPlan | None = None
        self.scores: dict[str, torch.Tensor | None] = {"mlp": None, "group": None}
        self.pending: dict[str, statistics.Pending] = {}
        self.mlp_x_ms: torch.Tensor | None = None
        self.attn_x_ms: torch.Tensor | None = None
        self.original_mlp: Callable | None = None
        self.original_attn: Callable | None = None
        self.had_mlp_forward = self.had_attn_forward = False

    @property
    def gathers(self) -> bool:
        """Whether training forwards gather statistics (every metric but ``uniform``)."""
        return self.metric != "uniform"

    # ---- statistics, gathered in training forwards (no autograd)

    mlp_score = property(lambda self: self._score("mlp"), lambda self, value: self._set_score("mlp", value))
    group_score = property(lambda self: self._score("group"), lambda self, value: self._set_score("group", value))

    def has_score(self, kind: str) -> bool:
        """Whether the ``kind`` ("mlp" / "group") score exists or a pending statistic will make it."""
        return self.scores[kind] is not None or kind in self.pending

    def _score(self, kind: str) -> torch.Tensor | None:
        if kind in self.pending:
            statistics.flush([self], kind)
        return self.scores[kind]

    def _set_score(self, kind: str, value: torch.Tensor | None) -> None:  # replaces any pending statistic
        self.pending.pop(kind, None)
        self.scores[kind] = value

    def _defer(self, kind: str, norms: torch.Tensor, kept: torch.Tensor | None, tokens: int) -> None:
        if kind in self.pending:  # a second forward before a flush (accumulation): apply the first one first
            statistics.flush([self], kind)
        self.pending[kind] = statistics.Pending(norms, kept, tokens)

    @torch.no_grad()
    def observe_mlp(self, mlp: nn.Module, x: torch.Tensor, a: torch.Tensor | None, kept: torch.Tensor | None):
        """x [..., d] MLP input; a [..., k] gated activation of the ``kept`` channels (all when None)."""
        self.version += 1
        if self.metric == "magnitude":
            self.mlp_score = importance.mlp_magnitude(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        elif self.metric == "wanda":
            self.mlp_x_ms = statistics.ema(self.mlp_x_ms, importance.feature_rms(x, self.stat_tokens).square(),
                                           self.ema)
            self.mlp_score = importance.mlp_wanda(mlp.gate_proj.weight, mlp.up_proj.weight, self.mlp_x_ms.sqrt())
        elif self.metric == "activation":
            norms, tokens = importance.feature_norms(a, self.stat_tokens)
            self._defer("mlp", norms, kept, tokens)

    @torch.no_grad()
    def observe_attn(self, attn: nn.Module, x: torch.Tensor, o: torch.Tensor | None, groups: torch.Tensor | None):
        """x [B, S, d] attention input; o [B, S, h, D] attention output of the kept ``groups`` (all when None)."""
        self.version += 1
        kw = dict(heads_per_group=self.heads_per_group, head_dim=self.head_dim)
        if self.metric == "magnitude":
            self.group_score = importance.group_magnitude(
                attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, **kw)
        elif self.metric == "wanda":
            self.attn_x_ms = statistics.ema(self.attn_x_ms, importance.feature_rms(x, self.stat_tokens).square(),
                                            self.ema)
            self.group_score = importance.group_wanda(
                attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, self.attn_x_ms.sqrt(), **kw)
        elif self.metric == "activation":
            norms, tokens = importance.head_feature_norms(o, self.stat_tokens)
            self._defer("group", norms, groups, tokens)


# --------------------------------------------------------------------------------------------------------
# Patched forwards
# --------------------------------------------------------------------------------------------------------


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP on the plan's kept channels: x [..., d] → [..., d]."""
    om: LayerOmission = getattr(self, STATE_ATTR)
    training = self.training
    kept = om.plan.channels if training and om.plan is not None else None
    if kept is None and not (training and om.metric == "activation"):
        y = om.original_mlp(x)
        if training and om.gathers:
            om.observe_mlp(self, x, None, None)
        return y
    linear = omission_linear(om.plan)  # training here: a plan that keeps every channel slices nothing
    a = self.act_fn(linear(self.gate_proj, x, "gate_proj")) * linear(self.up_proj, x, "up_proj")
    y = linear(self.down_proj, a, "down_proj")
    if training and om.gathers:
        om.observe_mlp(self, x, a, kept)
    return y


@functools.cache
def _eager_attention(modeling_module: str) -> Callable:
    return importlib.import_module(modeling_module).eager_attention_forward


def _attention_interface(attn: nn.Module, spec: ArchSpec) -> Callable:
    """The attention function HF's own forward would call (``config._attn_implementation``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = _eager_attention(spec.modeling_module)
    impl = attn.config._attn_implementation
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get is not None:
        return get(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def _attn_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                  past_key_values=None, **kwargs):
    """Attention on the plan's kept KV groups: hidden_states [B, S, d] → ([B, S, d], attention weights or None).

    Mirrors the HF attention forward of the registry's families with separate projections (Llama, Mistral,
    Qwen2 / 3, Gemma 2 / 3, Granite; OLMo 2's all-head q/k norm is refused) with sliced q / k / v / o projections;
    keeping whole KV groups leaves ``num_key_value_groups`` valid for every attention backend."""
    om: LayerOmission = getattr(self, STATE_ATTR)
    training = self.training
    groups = om.plan.groups if training and om.plan is not None else None
    if groups is None and not (training and om.metric == "activation"):
        if past_key_values is not None:  # forwarded only when given: transformers >= 5.2x calls it `cache` and
            kwargs["past_key_values"] = past_key_values  # warns on every call that passes both names
        out = om.original_attn(hidden_states, position_embeddings=position_embeddings,
                               attention_mask=attention_mask, **kwargs)
        if training and om.gathers:
            om.observe_attn(self, hidden_states, None, None)
        return out
    spec = om.spec
    linear = omission_linear(om.plan)  # training here: a plan that keeps every head slices nothing
    for name in ("cache", "past_key_value"):  # the KV cache's other names across transformers versions
        if past_key_values is None:
            past_key_values = kwargs.pop(name, None)
        else:
            kwargs.pop(name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = linear(self.q_proj, hidden_states, "q_proj").view(hidden_shape)
    k = linear(self.k_proj, hidden_states, "k_proj").view(hidden_shape)
    v = linear(self.v_proj, hidden_states, "v_proj").view(hidden_shape).transpose(1, 2)
    if spec.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = spec.apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    if hasattr(self, "sliding_window"):
        kwargs.setdefault("sliding_window", self.sliding_window)
    elif spec.model_type in ("mistral", "phi3"):
        kwargs.setdefault("sliding_window", getattr(self.config, "sliding_window", None))
    softcap = spec.scalar(self.config, spec.attn_softcap)  # Gemma 2
    if softcap is not None:
        kwargs.setdefault("softcap", softcap)
    o, weights = _attention_interface(self, spec)(
        self, q, k, v, attention_mask, dropout=0.0 if not training else self.attention_dropout,
        scaling=self.scaling, **kwargs)
    if training and om.gathers:
        om.observe_attn(self, hidden_states, o, groups)
    o = o.reshape(*input_shape, -1).contiguous()
    return linear(self.o_proj, o, "o_proj"), weights


# --------------------------------------------------------------------------------------------------------
# Install / remove
# --------------------------------------------------------------------------------------------------------

_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_linears(module: nn.Module, names: tuple[str, ...], where: str) -> None:
    for name in names:
        sub = getattr(module, name)
        if type(sub) is not nn.Linear:
            raise UnsupportedModelError(
                f"neuron omission slices plain nn.Linear weights; {where}.{name} is {type(sub).__name__} "
                "(PEFT / quantised layers are not supported)"
            )


def install(layer: nn.Module, om: LayerOmission, *, mlp: bool, heads: bool) -> None:
    """Patch ``layer.mlp`` (when ``mlp``) and ``layer.self_attn`` (when ``heads``) to run ``om.plan``."""
    where = f"layers[{om.layer_idx}]"
    if mlp:
        _check_linears(layer.mlp, _MLP_LINEARS, f"{where}.mlp")
    if heads:
        _check_linears(layer.self_attn, _ATTN_LINEARS, f"{where}.self_attn")
    for on, module, fn in ((mlp, layer.mlp, _mlp_forward), (heads, layer.self_attn, _attn_forward)):
        if not on:
            continue
        had = "forward" in vars(module)
        original = module.forward
        if module is layer.mlp:
            om.original_mlp, om.had_mlp_forward = original, had
        else:
            om.original_attn, om.had_attn_forward = original, had
        setattr(module, STATE_ATTR, om)
        module.forward = types.MethodType(fn, module)


def uninstall(layer: nn.Module, om: LayerOmission) -> None:
    """Give ``layer.mlp`` / ``layer.self_attn`` their original forwards back."""
    for module, original, had in ((layer.mlp, om.original_mlp, om.had_mlp_forward),
                                  (layer.self_attn, om.original_attn, om.had_attn_forward)):
        if original is None:
            continue
        if had:
            module.forward = original
        else:
            del module.forward
        if hasattr(module, STATE_ATTR):
            delattr(module, STATE_ATTR)
    om.original_mlp = om.original_attn = None
