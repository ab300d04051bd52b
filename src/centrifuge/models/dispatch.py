"""The decoder layers' dispatching forward: how ``centrifuge.apply`` routes the token-sparse step through each
layer's own module call, and how ``revert`` takes it out again.

Part of the patching that ``models/`` owns (``patch.py`` installs and removes it with the model's forward).
A layer whose forward was replaced after ``apply`` (another library patching the instance) is detected when
the step calls it, instead of running the replacement without the token-sparse backward.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn

from centrifuge.models.registry import ArchSpec
from centrifuge.tokens.layer import StepState, token_sparse_layer
from centrifuge.tokens.layout import TokenLayout

LAYER_CALL_KW = "_centrifuge_step"  # private keyword of a decoder layer's dispatching forward
_DISPATCH_ATTR = "_centrifuge_layer_dispatch"  # on a layer: (had an instance forward, that forward, ours)


@dataclasses.dataclass
class LayerCall:
    """What a decoder layer needs to run its token-sparse step (passed as ``layer(h, _centrifuge_step=...)``)."""

    spec: ArchSpec
    step: StepState
    layout: TokenLayout  # this layer's attention geometry (its own window and score soft-cap)
    rope: tuple[torch.Tensor, torch.Tensor]  # this layer's rotary tables cos, sin [N, D]


def install_layer_dispatch(layer: nn.Module) -> None:
    """Give decoder ``layer`` an instance-level forward that runs ``token_sparse_layer`` when called with
    ``_centrifuge_step=LayerCall(...)`` and the layer's own forward otherwise.

    Why through the layer's ``__call__``: wrappers hook modules, not functions. FSDP2 (``fully_shard`` per
    decoder layer) all-gathers a layer's weights in its forward pre-hook, frees them in its post-hook, and
    registers the pre-/post-backward hooks that re-gather them for the backward and reduce-scatter their
    gradients. Calling the layer's submodules directly would skip all of that. ``remove_layer_dispatch``
    restores the layer exactly."""
    if _DISPATCH_ATTR in vars(layer):
        return
    had_instance_forward = "forward" in vars(layer)
    own = vars(layer).get("forward")

    def forward(self, *args, _centrifuge_step: LayerCall | None = None, **kwargs):
        if _centrifuge_step is None:
            # The class's forward looked up now (not bound at install time), so a class swap after
            # ``apply`` — FSDP2 makes each sharded layer an ``FSDP<Layer>`` subclass — still runs it.
            return own(*args, **kwargs) if had_instance_forward else type(self).forward(self, *args, **kwargs)
        (h,) = args
        call = _centrifuge_step
        if not isinstance(call, LayerCall):  # the all-kept dense route's layer (tokens.dense_route.DenseCall)
            return call(self, h)
        return token_sparse_layer(h, self, call.spec, call.step, call.layout, call.rope)

    setattr(layer, _DISPATCH_ATTR, (had_instance_forward, own, forward))
    layer.forward = types.MethodType(forward, layer)


def _ours(layer: nn.Module) -> bool:
    """Whether the layer's instance forward is still the dispatch ``install_layer_dispatch`` put there."""
    saved, current = vars(layer).get(_DISPATCH_ATTR), vars(layer).get("forward")
    return saved is not None and getattr(current, "__func__", None) is saved[2]


def remove_layer_dispatch(layer: nn.Module) -> None:
    """Undo ``install_layer_dispatch`` (a no-op for a layer without it). A forward set on the layer after
    ``apply`` is left in place (it is not ours to remove)."""
    saved = vars(layer).get(_DISPATCH_ATTR)
    if saved is None:
        return
    had_instance_forward, own, _ = saved
    if _ours(layer):
        if had_instance_forward:
            layer.forward = own
        else:
            del layer.forward
    delattr(layer, _DISPATCH_ATTR)


def call_layer(layer: nn.Module, h: torch.Tensor, call: LayerCall) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run one token-sparse decoder layer on h [N, d] through the layer's module call (hooks included).

    ``nn.Module.__call__`` rather than ``layer(...)``: transformers versions whose
    ``GradientCheckpointingLayer`` overrides ``__call__`` would wrap the whole token-sparse layer in
    ``torch.utils.checkpoint``; the token-sparse layer does its own, kept-rows-only, checkpointing."""
    if _DISPATCH_ATTR not in vars(layer):
        raise RuntimeError("this decoder layer was not patched by centrifuge.apply (was the layer replaced after "
                           "apply?); call centrifuge.apply(model) again")
    if not _ours(layer):
        raise RuntimeError(f"the forward of decoder layer {type(layer).__name__} was replaced after "
                           "centrifuge.apply (another library patching the model?); apply such patches first, "
                           "then centrifuge.apply(model)")
    return nn.Module.__call__(layer, h, **{LAYER_CALL_KW: call})
