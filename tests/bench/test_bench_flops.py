"""Work checks on the CPU: FlopCounterMode counts of each variant's forward and backward."""

from __future__ import annotations

import pytest
import torch

from centrifuge.bench.flops import (
    attention_flops,
    count_flops,
    dense_work,
    linear_params,
    measure_variant_flops,
    peak_tflops,
)
from centrifuge.bench.harness import Group, build_group_model, make_run
from centrifuge.bench.variants import VARIANTS, parse_variant

B, T = 4, 32


@pytest.fixture(scope="module")
def dense():
    return measure_variant_flops("dense", batch=B, seq=T)


def test_counted_dense_matches_the_analytic_formula(dense):
    spec = parse_variant("dense")
    model = build_group_model(Group("tiny", None, B, T), spec, omit=0.5, device=torch.device("cpu"),
                              dtype=torch.float32, seed=0)
    work = dense_work(model, B, T, causal=False)  # the counter counts attention as non-causal
    assert dense.fwd == pytest.approx(work.fwd, rel=1e-9)
    assert dense.bwd == pytest.approx(work.bwd, rel=1e-9)
    assert dense.bwd == 2 * dense.fwd
    attn = attention_flops(model.config, B, T, causal=False)
    assert attn == 2 * attention_flops(model.config, B, T)
    assert dense.fwd == 2 * linear_params(model) * B * T + attn
    # parts: every layer's MLP, attention (projections + kernel), the LM head; together nearly everything
    assert sum(dense.fwd_parts.values()) == dense.fwd
    assert dense.fwd_parts["lm_head"] == 2 * 128 * 4096 * B * T


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_ideal_backward_is_kappa_of_dense(dense, keep):
    ideal = measure_variant_flops("ideal", batch=B, seq=T, keep=keep)
    assert ideal.fwd == dense.fwd  # forward on all B sequences
    assert ideal.bwd == pytest.approx(keep * dense.bwd, rel=1e-12)  # κ·B = 2 or 1 sequences
    for part in ("mlp", "attention", "lm_head"):
        assert ideal.bwd_parts[part] == pytest.approx(keep * dense.bwd_parts[part], rel=1e-12)


def test_ideal_with_short_sequences_when_kappa_b_is_fractional(dense):
    ideal = measure_variant_flops("ideal", batch=B, seq=T, keep=0.3)  # κ·B = 1.2: B × round(0.3·32) = 10
    linear = dense.bwd_parts["mlp"] + dense.bwd_parts["lm_head"]
    assert ideal.bwd_parts["mlp"] + ideal.bwd_parts["lm_head"] == pytest.approx(10 / 32 * linear, rel=1e-12)
    assert ideal.bwd < 10 / 32 * dense.bwd  # attention falls quadratically with the sequence length


def test_loss_only_does_the_full_backward(dense):
    masked = measure_variant_flops("loss_only", batch=B, seq=T, keep=0.25)
    assert (masked.fwd, masked.bwd) == (dense.fwd, dense.bwd)


def test_narrow_shapes_cut_mlp_then_attention(dense):
    narrow = measure_variant_flops("narrow", batch=B, seq=T)
    heads = measure_variant_flops("narrow_heads", batch=B, seq=T)
    for count in (narrow, heads):
        assert count.fwd_parts["mlp"] == dense.fwd_parts["mlp"] // 2  # 352 -> 176 channels
        assert count.bwd_parts["mlp"] == dense.bwd_parts["mlp"] // 2
        assert count.fwd_parts["lm_head"] == dense.fwd_parts["lm_head"]
    assert narrow.fwd_parts["attention"] == dense.fwd_parts["attention"]
    assert heads.fwd_parts["attention"] == dense.fwd_parts["attention"] // 2  # 4/2 -> 2/1 heads, head_dim 32
    assert heads.bwd_parts["attention"] == dense.bwd_parts["attention"] // 2
    assert heads.fwd < narrow.fwd < dense.fwd


def test_checkpointing_recompute_is_counted_and_falls_with_kappa():
    dense_ckpt = measure_variant_flops("dense+ckpt", batch=B, seq=T)
    dense = measure_variant_flops("dense", batch=B, seq=T)
    assert dense_ckpt.fwd == dense.fwd
    assert dense_ckpt.bwd > dense.bwd  # the backward re-runs the layers' forward
    ideal_ckpt = measure_variant_flops("ideal+ckpt", batch=B, seq=T, keep=0.5)
    assert ideal_ckpt.bwd == pytest.approx(0.5 * dense_ckpt.bwd, rel=1e-12)  # recompute on kept rows only


def test_count_flops_separates_phases():
    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    counted = count_flops(lambda: lin(x).sum(), lambda loss: loss.backward())
    assert counted.fwd == 2 * 4 * 8 * 16
    assert counted.bwd == 2 * 4 * 8 * 16  # weight grad only (x needs no grad)


@pytest.mark.skipif(VARIANTS["centrifuge"].unavailable() is not None, reason="centrifuge.apply missing")
def test_centrifuge_backward_flops_fall_with_kappa(dense):
    half = measure_variant_flops("centrifuge", batch=B, seq=T, keep=0.5)
    quarter = measure_variant_flops("centrifuge", batch=B, seq=T, keep=0.25)
    assert quarter.bwd < half.bwd < dense.bwd


def test_analytic_work_of_variants():
    group = Group("tiny", None, B, T)
    spec = parse_variant("ideal")
    model = build_group_model(group, spec, omit=0.5, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    run = make_run(group, spec, model, keep_ratio=0.5, omit=0.5, seed=0)
    ideal = spec.instantiate()
    ideal.prepare(run)
    dense = parse_variant("dense").instantiate().work(run)
    work = ideal.work(run)
    assert work.fwd == dense.fwd and work.bwd == pytest.approx(0.5 * dense.bwd)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0
    assert peak_tflops("cpu") is None
