"""``centrifuge.apply`` / ``centrifuge.revert``: patch one model instance, and undo it exactly.

``apply`` rebinds the instance's ``forward`` (the class and every other instance stay untouched) and, in the
fast mode, each decoder layer's (``install_layer_dispatch``: the token-sparse step calls every layer through
its own module call, so wrappers that hook modules, such as FSDP2, see it). The
patched forward takes the per-step selection explicitly — ``keep_mask=`` or ``select=`` — and runs the
chosen token-filtering mode; a call with neither (evaluation, generation) runs the original forward.
Parameters and buffers are never replaced, so ``revert`` gives back the original model bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
import weakref

import torch
import torch.nn as nn

from centrifuge.models.dispatch import install_layer_dispatch, remove_layer_dispatch
from centrifuge.models.reference_attention import REFERENCE_ATTENTION
from centrifuge.models.registry import spec_for
from centrifuge.tokens.forward import MODES, fast_forward, reference_forward

log = logging.getLogger("centrifuge")
_STATE_ATTR = "_centrifuge_patch"
# Inputs the token-filtering forward tolerates only when None (what wrappers such as PEFT's pass along).
_NONE_ONLY = ("inputs_embeds", "output_attentions", "output_hidden_states", "return_dict")


# model -> handle of the forward pre-hook ``revert`` leaves behind: a reverted model refuses ``keep_mask=`` /
# ``select=`` (its original forward would take them into **kwargs and silently train densely).
_REVERT_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refuse_selection_after_revert(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("keep_mask") is not None or kwargs.get("select") is not None:
        raise TypeError("keep_mask= / select= given to a model that centrifuge.revert un-patched; its original "
                        "forward would ignore them; call centrifuge.apply(model) again to filter tokens")


def _check_selection_inputs(keep_mask, select, kwargs: dict) -> None:
    """Refuse ``keep_mask`` and ``select`` together (the forward saves activations of the mask's rows only,
    so a selection after it could pick rows that saved nothing) and a mask on another device than the
    inputs (torch's own error would come from deep inside the step)."""
    if keep_mask is not None and select is not None:
        raise ValueError("pass keep_mask= (known before the forward) or select= (chosen after it), not both")
    ids = kwargs.get("input_ids")
    if isinstance(keep_mask, torch.Tensor) and isinstance(ids, torch.Tensor) and keep_mask.device != ids.device:
        raise ValueError(f"keep_mask is on {keep_mask.device} but input_ids on {ids.device}; "
                         "pass keep_mask.to(input_ids.device)")


def _is_peft(model: nn.Module) -> bool:
    """A PEFT ``PeftModel`` (duck-typed: peft is optional): patch its ``get_base_model()`` instead."""
    return callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "peft_config")


@dataclasses.dataclass
class PatchState:
    mode: str
    attention: str
    had_instance_forward: bool
    original_forward: object
    original_attn_implementation: str | None = None  # restored by revert (reference mode switches it)
    patched_forward: object = None  # the bound forward apply installed (to detect a later replacement)
    guard: object = None  # handle of the forward pre-hook that refuses keep_mask once the forward is replaced

    def replaced(self, model: nn.Module) -> bool:
        """Whether something (e.g. Liger-Kernel's instance patch) replaced the forward apply installed."""
        return vars(model).get("forward") is not self.patched_forward


class ForwardReplacedError(RuntimeError):
    """The forward ``centrifuge.apply`` installed was replaced afterwards: token filtering would be off."""


def _replaced_message(model: nn.Module) -> str:
    now = vars(model).get("forward")
    who = getattr(getattr(now, "__func__", now), "__module__", None) or "another patch"
    return (f"the forward of this Centrifuge-patched {type(model).__name__} was replaced after centrifuge.apply "
            f"(now {who}), so keep_mask / select would be ignored; call centrifuge.apply(model) again after the "
            "other patch (Liger-Kernel: apply it first — centrifuge.apply accepts Liger-patched models; in a "
            "Trainer with use_liger_kernel=True, enable_token_filtering applies Liger itself)")


def _guard(model: nn.Module, args, kwargs):
    """Forward pre-hook (it survives a forward replacement): refuse a token-filtering call that would run a
    forward other than Centrifuge's."""
    if kwargs.get("keep_mask") is None and kwargs.get("select") is None:
        return None
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and state.replaced(model):
        raise ForwardReplacedError(_replaced_message(model))
    return None


BACKWARDS = ("auto", "replay")


def apply(model: nn.Module, *, mode: str = "fast", attention: str = "auto", compile: bool | None = None,
          backward: str = "auto") -> nn.Module:
    """Patch ``model`` (an HF causal LM of a supported ``model_type``) in place and return it.

    Args:
        mode: "fast" (token-sparse backward), "reference" (plain autograd with filtered tokens' keys and
            values detached in every attention layer: the oracle), or "loss_only" (masked loss, full
            backward).
        attention: attention backend of the fast path: "auto" (on CUDA the dense model's own SDPA kernels
            for plain causal rows, else FlashAttention varlen; the math path on the CPU), or one of
            ``centrifuge.ops.attention.BACKENDS`` by name ("math", "flash", "sdpa", ...).
        compile: fast mode: run RMSNorm, RoPE and SwiGLU of the token-sparse layers as fused kernels
            (``centrifuge.ops.elementwise``: hand-written Triton kernels where no autograd is recorded,
            ``torch.compile`` elsewhere — one graph for every kept count, no graph breaks). The GEMMs and
            attention are already single kernels and stay as they are. None (the default): fused for CUDA
            inputs, eager on the CPU.
        backward: fast mode: "auto" (the default) computes each layer's kept-rows backward with explicit
            formulas (``centrifuge.tokens.direct``) where the layer allows it — plain ``nn.Linear``
            projections, RMSNorm, SiLU, no autocast — and replays a small autograd graph elsewhere (PEFT
            layers, autocast); "replay" always replays (the general path, heavier on the host).

    After ``apply``: ``model(input_ids=..., labels=..., keep_mask=keep)`` or ``model(..., select=fn)``
    returns a ``TokenFilterOutput``; without either it is the original forward.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; choose one of {', '.join(BACKWARDS)}")
    if _is_peft(model):  # PEFT (LoRA): patch the wrapped causal LM; PeftModel.forward passes keep_mask through
        apply(model.get_base_model(), mode=mode, attention=attention, compile=compile, backward=backward)
        return model
    from centrifuge.ops.attention import BACKENDS

    if attention != "auto" and attention not in BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r}; choose auto, {', '.join(BACKENDS)}")
    spec = spec_for(model)
    if hasattr(model, _STATE_ATTR):
        revert(model)
    guard = _REVERT_GUARDS.pop(model, None)
    if guard is not None:
        guard.remove()
    had_instance_forward = "forward" in vars(model)
    original = model.forward
    state = PatchState(mode, attention, had_instance_forward, original)
    if mode == "reference":
        state.original_attn_implementation = model.config._attn_implementation
        model.config._attn_implementation = REFERENCE_ATTENTION
    setattr(model, _STATE_ATTR, state)
    elementwise = "auto" if compile is None else ("compiled" if compile else "eager")
    if mode == "fast":
        run = functools.partial(fast_forward, attention=attention, elementwise=elementwise, backward=backward)
    else:
        run = functools.partial(reference_forward, detach_filtered_kv=(mode == "reference"))

    def forward(self, *args, keep_mask=None, select=None, num_items_in_batch=None,
                return_token_loss: bool = False, **kwargs):
        if keep_mask is None and select is None:
            # the class's forward looked up now, so a class patch made after apply (Liger's) serves evaluation
            dense = original if had_instance_forward else types.MethodType(type(self).forward, self)
            return dense(*args, num_items_in_batch=num_items_in_batch, **kwargs) \
                if num_items_in_batch is not None else dense(*args, **kwargs)
        if args:
            raise TypeError("pass input_ids and the other inputs by keyword to a Centrifuge-patched model")
        _check_selection_inputs(keep_mask, select, kwargs)
        for name in _NONE_ONLY:  # PeftModelForCausalLM.forward passes these as None
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        kwargs = _padding_free(kwargs)
        unknown = set(kwargs) - {"input_ids", "attention_mask", "position_ids", "labels", "use_cache"}
        if unknown:
            raise TypeError(f"unsupported arguments with token filtering: {', '.join(sorted(unknown))}")
        return run(self, spec, keep_mask=keep_mask, select=select, num_items_in_batch=num_items_in_batch,
                   return_token_loss=return_token_loss, **kwargs)

    forward.__signature__ = _patched_signature(original)
    model.forward = types.MethodType(forward, model)
    state.patched_forward = model.forward
    state.guard = model.register_forward_pre_hook(_guard, with_kwargs=True)
    if mode == "fast":  # the token-sparse step runs each decoder layer through its own module call (FSDP2 hooks)
        for layer in model.model.layers:
            install_layer_dispatch(layer)
    log.info("centrifuge: patched %s (model_type=%s, mode=%s, %d layers)", type(model).__name__,
             spec.model_type, mode, len(model.model.layers))
    return model


# Padding-free packing (TRL ``padding_free`` / ``packing=True``, HF ``DataCollatorWithFlattening``): one row of
# concatenated documents, position ids restarting at 0 per document, plus these for varlen kernels.
PADDING_FREE = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _padding_free(kwargs: dict) -> dict:
    """Consume padding-free packing's arguments: the documents of the row are given by ``position_ids``
    (restarting at 0), which the token-sparse layout and the reference's HF mask already keep apart; without
    ``position_ids`` they are derived from ``cu_seq_lens_q``. ``cu_seq_lens_*`` must mark the same documents
    as ``position_ids`` (checked; a mismatch raises ValueError)."""
    if not any(k in kwargs for k in PADDING_FREE):
        return kwargs
    kwargs = dict(kwargs)
    packing = {k: kwargs.pop(k, None) for k in PADDING_FREE}
    cu = packing["cu_seq_lens_q"] if packing["cu_seq_lens_q"] is not None else packing["cu_seq_lens_k"]
    ids = kwargs.get("input_ids")
    if cu is None or ids is None:
        return kwargs
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q / cu_seq_lens_k describe one flattened row; input_ids is {tuple(ids.shape)}")
    if packing["cu_seq_lens_k"] is not None and packing["cu_seq_lens_q"] is not None and not torch.equal(
            packing["cu_seq_lens_k"].to(cu.device), cu):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: only self-attention packing is supported")
    T = ids.shape[1]
    cu = cu.to(device=ids.device, dtype=torch.long)
    positions = torch.arange(T, device=ids.device)
    starts = cu[:-1]
    doc = torch.searchsorted(starts, positions, right=True) - 1  # [T] document of each position
    derived = (positions - starts[doc.clamp_min(0)])[None]
    given = kwargs.get("position_ids")
    if given is None:
        kwargs["position_ids"] = derived
    elif int(cu[-1]) != T or not torch.equal(given.to(derived.device).expand_as(derived) == 0, derived == 0):
        raise ValueError("cu_seq_lens_q does not mark the same documents as position_ids (restarts at 0)")
    return kwargs


_ADDED = ("keep_mask", "select", "num_items_in_batch", "return_token_loss")


def _patched_signature(original) -> inspect.Signature:
    """The original forward's signature plus the keyword-only selection arguments, with ``self`` first.

    Tools that read a model's inputs from its forward's signature (HF ``Trainer`` drops dataset columns the
    forward does not name) then still see ``input_ids``, ``labels``, ... ."""
    kind = inspect.Parameter
    params = list(inspect.signature(original).parameters.values())
    named = {p.name for p in params}
    var_kw = [p for p in params if p.kind is kind.VAR_KEYWORD]
    head = [p for p in params if p.kind is not kind.VAR_KEYWORD]
    added = [kind(n, kind.KEYWORD_ONLY, default=False if n == "return_token_loss" else None)
             for n in _ADDED if n not in named]
    return inspect.Signature([kind("self", kind.POSITIONAL_OR_KEYWORD), *head, *added, *var_kw])


def revert(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the instance's forward is the original again. A no-op for unpatched models.

    The reverted model refuses ``keep_mask=`` / ``select=`` (``TypeError``) through a forward pre-hook, which
    the next ``apply`` removes: its original forward would take them into ``**kwargs`` and ignore them."""
    if _is_peft(model):
        revert(model.get_base_model())
        return model
    state: PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if state.original_attn_implementation is not None:
        model.config._attn_implementation = state.original_attn_implementation
    if state.guard is not None:
        state.guard.remove()
    if state.replaced(model):
        pass  # replaced after apply (e.g. by Liger): leave the newer forward in place
    elif state.had_instance_forward:
        model.forward = state.original_forward
    else:
        del model.forward
    for layer in model.model.layers:
        remove_layer_dispatch(layer)
    delattr(model, _STATE_ATTR)
    # The original forward is back (not wrapped); a pre-hook refuses the selection arguments it would ignore.
    _REVERT_GUARDS[model] = model.register_forward_pre_hook(_refuse_selection_after_revert, with_kwargs=True)
    return model


def patch_mode(model: nn.Module) -> str | None:
    """The mode ``model`` is patched with, or None — also when the forward ``apply`` installed was replaced
    afterwards (token filtering is then off: calls with ``keep_mask`` raise ``ForwardReplacedError``)."""
    if _is_peft(model):
        model = model.get_base_model()
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None or state.replaced(model) else state.mode
