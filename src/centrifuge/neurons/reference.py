"""The reference semantics of neuron omission, implemented the obvious way (the oracle for the tests).

The dense layer, with the gated activation of each omitted MLP channel and the attention output of each
omitted head multiplied by zero — i.e. the inputs of ``down_proj`` and ``o_proj`` masked by forward
pre-hooks. Everything else (weights, GEMM sizes, attention) stays dense. Use it on a model without an
attached ``Omitter`` (or with ``omitter.clear()``), e.g.

    with reference_omission(model, plan):
        model(**batch).loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from centrifuge.neurons.plan import OmissionPlan


def _mask(kept: torch.Tensor, total: int, repeat: int = 1) -> torch.Tensor:
    m = torch.zeros(total, device=kept.device)
    m[kept] = 1.0
    return m.repeat_interleave(repeat)


def _multiply_input(mask: torch.Tensor):
    def hook(module: nn.Module, args):
        (x, *rest) = args
        return (x * mask.to(x.dtype), *rest)
    return hook


@contextlib.contextmanager
def reference_omission(model: nn.Module, plan: OmissionPlan) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes the omission reference of ``plan`` (any mode, train or eval)."""
    handles = []
    try:
        for i, layer in enumerate(model.model.layers):
            lp = plan.get(i)
            if lp is None:
                continue
            if lp.channels is not None:
                m = layer.mlp.down_proj.in_features
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(_multiply_input(_mask(lp.channels, m))))
            if lp.groups is not None:
                attn = layer.self_attn
                n_groups = attn.k_proj.out_features // attn.head_dim
                mask = _mask(lp.groups, n_groups, repeat=lp.heads_per_group * lp.head_dim)  # [H·D]
                handles.append(attn.o_proj.register_forward_pre_hook(_multiply_input(mask)))
        yield model
    finally:
        for h in handles:
            h.remove()
