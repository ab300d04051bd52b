"""The variant registry, masks, shapes and the harness's sweep logic (tiny models, one repetition)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from centrifuge.bench import harness
from centrifuge.bench.harness import BenchOptions, Group, build_group_model, make_run, run_bench
from centrifuge.bench.variants import (
    VARIANTS,
    Variant,
    compact_shape,
    hf_loss,
    kept_per_row,
    labels_for_keep,
    narrow_overrides,
    parse_variant,
    parse_variants,
    random_keep_mask,
    register,
    topk_selector,
)
from centrifuge.models.presets import preset_config

CPU = torch.device("cpu")


def _opts(variants: str, **kw) -> BenchOptions:
    base = dict(presets=["tiny"], variants=parse_variants(variants), seqs=[32], batch=2, keeps=[0.5],
                reps=1, warmup=0)
    base.update(kw)
    return BenchOptions(**base)


def test_parse_variants():
    specs = parse_variants("dense, ideal+ckpt,ideal+ckpt,narrow_heads")
    assert [s.label for s in specs] == ["dense", "ideal+ckpt", "narrow_heads"]
    assert parse_variant("ideal+narrow_heads+ckpt").modifiers == ("narrow_heads", "ckpt")
    assert [s.label for s in parse_variants("default")][:5] == ["dense", "loss_only", "ideal", "narrow",
                                                                "narrow_heads"]
    assert all(s.modifiers == ("ckpt",) for s in parse_variants("all+ckpt"))
    assert len(parse_variants("all")) == len(VARIANTS)
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("dens")
    with pytest.raises(ValueError, match="unknown modifier"):
        parse_variant("dense+fast")


def test_keep_mask_is_exact_seeded_and_never_keeps_the_last_position():
    keep = random_keep_mask(3, 40, 0.3, seed=1)
    assert keep.shape == (3, 40) and keep.dtype == torch.bool
    assert keep.sum(1).tolist() == [12, 12, 12]
    assert not keep[:, -1].any()
    assert torch.equal(keep, random_keep_mask(3, 40, 0.3, seed=1))
    assert not torch.equal(keep, random_keep_mask(3, 40, 0.3, seed=2))
    assert kept_per_row(10, 1.0) == 9 and kept_per_row(10, 0.01) == 1


def test_loss_only_labels_average_the_kept_positions():
    config = preset_config("tiny")
    model = build_group_model(Group("tiny", None, 2, 16), parse_variant("dense"), omit=0.5, device=CPU,
                              dtype=torch.float32, seed=0)
    ids = torch.randint(1, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    keep = random_keep_mask(2, 16, 0.25, seed=0)
    loss = hf_loss(model, ids, labels_for_keep(ids, keep))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                reduction="none").view(2, 15)
    assert loss.item() == pytest.approx(per_token[keep[:, :-1]].mean().item(), rel=1e-5)


def test_topk_selector():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[:, -1] = False
    keep = topk_selector(0.5)(scores=scores, valid=valid)
    assert keep.tolist() == [[False, True, True, True, False, False], [False, False, True, True, True, False]]


def test_narrow_overrides_of_the_bench_presets():
    tl = narrow_overrides(preset_config("tinyllama-1.1b"), 0.5, heads=True)
    assert tl == {"intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 64}
    l7 = narrow_overrides(preset_config("llama2-7b"), 0.5, heads=True)
    assert l7 == {"intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "head_dim": 128}
    q3 = narrow_overrides(preset_config("qwen3-0.6b"), 0.5, heads=True)
    assert q3 == {"intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128}
    assert narrow_overrides(preset_config("tinyllama-1.1b"), 0.25, heads=False) == {"intermediate_size": 4224}
    q2 = narrow_overrides(preset_config("qwen2-tiny"), 0.5, heads=True)  # one KV head stays one
    assert (q2["num_attention_heads"], q2["num_key_value_heads"]) == (2, 1)
    model = build_group_model(Group("tiny", None, 2, 16), parse_variant("narrow_heads"), omit=0.5, device=CPU,
                              dtype=torch.float32, seed=0)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (64, 128) and attn.k_proj.weight.shape == (32, 128)
    assert mlp.up_proj.weight.shape == (176, 128)


def test_compact_shape():
    assert compact_shape(8, 2048, 0.5) == (4, 2048, "κ·B sequences")
    b, t, how = compact_shape(8, 2048, 0.3)
    assert (b, t) == (8, 614) and "not an integer" in how
    assert compact_shape(1, 16384, 0.5)[:2] == (1, 8192)


def test_layers_truncation_and_meta_build():
    group = Group("llama2-7b", harness.BENCH_LAYERS["llama2-7b"], 1, 16)
    model = build_group_model(group, parse_variant("dense"), omit=0.5, device=torch.device("meta"),
                              dtype=torch.bfloat16, seed=0)
    assert len(model.model.layers) == 8 and model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    opts = BenchOptions(presets=["llama2-7b", "qwen3-0.6b"], variants=[], seqs=[2048, 16384], batch=8,
                        tokens=16384, layers={"qwen3-0.6b": 4})
    assert [(g.preset, g.layers, g.batch, g.seq) for g in opts.groups()] == [
        ("llama2-7b", 8, 8, 2048), ("llama2-7b", 8, 1, 16384), ("qwen3-0.6b", 4, 8, 2048),
        ("qwen3-0.6b", 4, 1, 16384)]


def test_ckpt_modifier_turns_checkpointing_on_and_off():
    spec = parse_variant("dense+ckpt")
    group = Group("tiny", None, 2, 16)
    model = build_group_model(group, spec, omit=0.5, device=CPU, dtype=torch.float32, seed=0)
    run = make_run(group, spec, model, keep_ratio=None, omit=0.5, seed=0)
    variant = spec.instantiate()
    def on() -> bool:  # transformers >= 5.2x renamed the property
        name = "is_activation_checkpointing"
        return bool(getattr(model, name) if hasattr(model, name) else model.is_gradient_checkpointing)

    spec.enable(run, variant)
    assert on()
    spec.disable(run, variant)
    assert not on()


def test_one_model_per_shape_and_variant_order(monkeypatch):
    built = []
    real = harness.build_group_model

    def counting(group, spec, **kw):
        built.append(spec.label)
        return real(group, spec, **kw)

    monkeypatch.setattr(harness, "build_group_model", counting)
    rows = run_bench(_opts("dense,narrow,loss_only,ideal", keeps=[0.5, 0.25]), say=lambda _: None)
    assert built == ["dense", "narrow"]  # loss_only and ideal reuse the dense model
    assert [(r["variant"], r["keep"]) for r in rows] == [
        ("dense", None), ("narrow", None), ("loss_only", 0.25), ("loss_only", 0.5), ("ideal", 0.25),
        ("ideal", 0.5)]
    assert all(r["status"] == "ok" for r in rows)


def test_a_new_variant_is_a_few_lines_and_failures_do_not_stop_the_run():
    @register
    class HalfLoss(Variant):
        name = "test_half_loss"
        help = "dense forward, loss halved"
        uses_keep = True

        def forward(self, run):
            return 0.5 * super().forward(run)

    @register
    class Broken(Variant):
        name = "test_broken"
        help = "raises"

        def forward(self, run):
            raise RuntimeError("boom")

    try:
        seen = []
        rows = run_bench(_opts("dense,test_broken,test_half_loss", keeps=[0.5, 0.9]),
                         on_row=lambda rs: seen.append(len(rs)), say=lambda _: None)
    finally:
        VARIANTS.pop("test_half_loss")
        VARIANTS.pop("test_broken")
    status = {(r["variant"], r["keep"]): r["status"] for r in rows}
    assert status[("dense", None)] == "ok"
    assert status[("test_broken", None)] == "error: RuntimeError: boom"
    assert status[("test_half_loss", 0.5)] == status[("test_half_loss", 0.9)] == "ok"
    assert seen == [1, 2, 3, 4]  # partial results saved after every measurement
    # the shared model came back clean: no patch, no grads left over
    assert rows[2]["loss"] == pytest.approx(0.5 * rows[0]["loss"], rel=0.05)


def test_time_limit_and_unavailable_variants(monkeypatch):
    monkeypatch.setattr(VARIANTS["centrifuge"], "unavailable", classmethod(lambda cls: "not here"))
    rows = run_bench(_opts("dense,centrifuge", time_limit=0.0), say=lambda _: None)
    assert [r["status"] for r in rows] == ["skipped: time limit", "unavailable: not here"]


@pytest.mark.skipif(VARIANTS["centrifuge"].unavailable() is not None, reason="centrifuge.apply missing")
def test_centrifuge_variants_run_and_revert():
    import centrifuge

    rows = run_bench(_opts("centrifuge,centrifuge_select,centrifuge_loss_only,dense"), say=lambda _: None)
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    # the harness reverted the patch: the dense row ran the plain HF forward on the same cached model
    model = build_group_model(Group("tiny", None, 2, 16), parse_variant("dense"), omit=0.5, device=CPU,
                              dtype=torch.float32, seed=0)
    assert centrifuge.patch_mode(model) is None


@pytest.mark.skipif(VARIANTS["centrifuge"].unavailable() is not None, reason="centrifuge.apply missing")
def test_omission_and_cuda_only_variants():
    """centrifuge_omit runs (plans every step, protects AdamW) and leaves no omitter behind; the Liger variants
    are reported unavailable on the CPU, not failed."""
    from centrifuge import neurons

    rows = run_bench(_opts("centrifuge_omit,dense_liger,centrifuge_liger,dense"), say=lambda _: None)
    status = {r["variant"]: r["status"] for r in rows}
    assert status["centrifuge_omit"] == "ok" and status["dense"] == "ok", rows
    assert status["dense_liger"].startswith("unavailable") and status["centrifuge_liger"].startswith("unavailable")
    model = build_group_model(Group("tiny", None, 2, 16), parse_variant("dense"), omit=0.5, device=CPU,
                              dtype=torch.float32, seed=0)
    assert neurons.omitter_of(model) is None


def test_mixed_precision_runs_forwards_under_autocast_with_fp32_weights(monkeypatch):
    """--dtype amp-bf16: fp32 weights (and optimizer state) and every forward under bf16 autocast, as
    `centrifuge train` trains; the pure-bf16 bench could not see a path slow only under autocast."""
    seen = []
    real_build = harness.build_group_model

    def build(*args, **kw):
        model = real_build(*args, **kw)
        model.lm_head.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
        return model

    monkeypatch.setattr(harness, "build_group_model", build)
    rows = run_bench(_opts("dense,loss_only", dtype="amp-bf16"), say=lambda _: None)
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["dtype"] for r in rows} == {"amp-bf16"}
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}
    assert harness.precision("amp-bf16") == (torch.float32, torch.bfloat16)
    assert harness.precision("bf16") == (torch.bfloat16, None)
