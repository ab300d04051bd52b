"""FLOPs: the analytic model-FLOPs formulas behind MFU, and a FLOP counter that checks work on the CPU.

Analytic (what MFU divides by): a step over ``B × T`` tokens costs

    forward  = 2 · N_lin · B·T + A(B, T)
    backward = 4 · N_lin · B·T + 2 · A(B, T)

where ``N_lin`` is the number of weights inside ``nn.Linear`` modules (every projection, the MLP and the LM
head; not the input embedding, which is a lookup) and ``A`` the attention forward FLOPs
``A = 2 (QKᵀ, PV) · 2 · B · heads · head_dim · T² · layers / 2`` (causal: half the score matrix). This is
the usual ``6 · N · tokens + attention`` count. Recomputation under activation checkpointing is not model
work and is not counted (MFU, not hardware FLOPs utilisation).

Counted (``count_flops``): ``torch.utils.flop_counter.FlopCounterMode`` over a real forward and backward,
the two phases counted separately, with a split by part (``mlp``, ``attention`` = q/k/v/o projections plus
the attention kernel, ``lm_head``). It counts matrix products only and the attention kernel as
non-causal; on the CPU it also counts PyTorch's CPU flash-attention kernel, which the stock counter skips.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched as substrings of
# ``torch.cuda.get_device_name()``; the longest matching key wins ("H100 PCIe" before "H100").
PEAK_TFLOPS_BF16: dict[str, float] = {
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s of ``device_name`` (``override`` wins); None when unknown (no MFU then)."""
    if override is not None:
        return float(override)
    matches = [key for key in PEAK_TFLOPS_BF16 if key.lower() in device_name.lower()]
    if not matches:
        return None
    return PEAK_TFLOPS_BF16[max(matches, key=len)]


# --------------------------------------------------------------------------------------------------------
# Analytic model FLOPs
# --------------------------------------------------------------------------------------------------------


def linear_params(model: nn.Module) -> int:
    """Number of weights in the model's ``nn.Linear`` modules (a tied LM head counts once, as a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_dims(config: Any) -> tuple[int, int, int]:
    """(layers, query heads, head_dim) of an HF decoder config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), heads, int(head_dim)


def attention_flops(config: Any, batch: int, seq: int, *, causal: bool = True) -> float:
    """Forward FLOPs of the attention kernels (QKᵀ and PV) over ``batch`` sequences of ``seq`` tokens."""
    layers, heads, head_dim = attention_dims(config)
    full = 2 * 2 * batch * heads * head_dim * seq * seq * layers
    return full / 2 if causal else float(full)


@dataclasses.dataclass(frozen=True)
class Work:
    """Model FLOPs of one training step, split into forward and backward (optimizer not counted)."""

    fwd: float
    bwd: float

    @property
    def total(self) -> float:
        return self.fwd + self.bwd


def dense_work(model: nn.Module, batch: int, seq: int, *, causal: bool = True) -> Work:
    """Model FLOPs of a dense step of ``model`` over [batch, seq] tokens."""
    n = linear_params(model)
    tokens = batch * seq
    attn = attention_flops(model.config, batch, seq, causal=causal)
    return Work(fwd=2 * n * tokens + attn, bwd=4 * n * tokens + 2 * attn)


# --------------------------------------------------------------------------------------------------------
# FLOP counter (the CPU work check)
# --------------------------------------------------------------------------------------------------------

PARTS: dict[str, re.Pattern[str]] = {
    "mlp": re.compile(r"\.layers\.\d+\.mlp$"),
    "attention": re.compile(r"\.layers\.\d+\.self_attn$"),
    "lm_head": re.compile(r"\.lm_head$"),
}


def _sdpa_fwd_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ + PV of ``query`` [B, Hq, Tq, D] against ``key`` [B, Hkv, Tk, D] (non-causal count)."""
    b, hq, tq, d = query_shape
    tk, dv = key_shape[2], value_shape[3]
    return 2 * b * hq * tq * tk * d + 2 * b * hq * tq * tk * dv


def _sdpa_bwd_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                      **kwargs) -> int:
    """dV, dP, dQ, dK: twice the forward's products."""
    return 2 * _sdpa_fwd_formula(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for ops the stock counter misses (PyTorch's CPU flash attention)."""
    aten = torch.ops.aten
    extra: dict[Any, Callable[..., int]] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd_formula),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd_formula)):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = formula
    return extra


@dataclasses.dataclass
class FlopCount:
    """Counted FLOPs of one step: totals and per-part splits of the forward and of the backward."""

    fwd: int
    bwd: int
    fwd_parts: dict[str, int]
    bwd_parts: dict[str, int]

    def as_dict(self) -> dict[str, int]:
        out = {"flops_fwd": self.fwd, "flops_bwd": self.bwd}
        for part in PARTS:
            out[f"flops_fwd_{part}"] = self.fwd_parts.get(part, 0)
            out[f"flops_bwd_{part}"] = self.bwd_parts.get(part, 0)
        return out


def _snapshot(counter: Any) -> dict[str, int]:
    """Totals per module name (summed over ops) at this moment."""
    return {name: int(sum(ops.values())) for name, ops in copy.deepcopy(counter.get_flop_counts()).items()}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


def _parts(per_module: dict[str, int]) -> dict[str, int]:
    return {part: sum(v for name, v in per_module.items() if pattern.search(name))
            for part, pattern in PARTS.items()}


def count_flops(
    forward: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    backward_graph: Callable[[], torch.Tensor] | None = None,
) -> FlopCount:
    """Count the FLOPs of ``loss = forward(); backward(loss)``, forward and backward separately.

    ``backward_graph``, when given, is called (uncounted) after the forward's loss is dropped and returns
    the loss whose backward is counted (the ``ideal`` variant's separately built κ·B graph). One counter
    stays active throughout so that backward FLOPs are attributed to modules too.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        s0 = _snapshot(counter)
        loss = forward()
        s1 = _snapshot(counter)
        if backward_graph is not None:
            del loss
            loss = backward_graph()
        s2 = _snapshot(counter)
        backward(loss)
        s3 = _snapshot(counter)
    fwd, bwd = _diff(s1, s0), _diff(s3, s2)
    return FlopCount(fwd=fwd.get("Global", 0), bwd=bwd.get("Global", 0), fwd_parts=_parts(fwd),
                     bwd_parts=_parts(bwd))


def measure_variant_flops(
    spec: str,
    *,
    preset: str = "tiny",
    batch: int = 2,
    seq: int = 64,
    keep: float | None = 0.5,
    omit: float = 0.5,
    layers: int | None = None,
    seed: int = 0,
) -> FlopCount:
    """Counted FLOPs of one step of variant ``spec`` (e.g. "ideal", "narrow", "dense+ckpt") on the CPU.

    Builds the preset's model in float32 and runs the variant's own prepare / forward / backward pieces.
    """
    from centrifuge.bench.harness import Group, build_group_model, make_run
    from centrifuge.bench.variants import parse_variant

    vspec = parse_variant(spec)
    group = Group(preset=preset, layers=layers, batch=batch, seq=seq)
    model = build_group_model(group, vspec, omit=omit, device=torch.device("cpu"), dtype=torch.float32,
                              seed=seed)
    variant = vspec.instantiate()
    run = make_run(group, vspec, model, keep_ratio=keep if variant.uses_keep else None, omit=omit,
                   seed=seed)
    vspec.enable(run, variant)
    try:
        graph = (lambda: variant.backward_graph(run)) if variant.separate_backward_graph else None
        return count_flops(lambda: variant.forward(run), lambda loss: variant.backward(run, loss), graph)
    finally:
        vspec.disable(run, variant)
