"""Every supported family beyond Llama: its `centrifuge train` preset builds, patches and trains, and a local
checkpoint directory of it loads through ``model.path`` (random init, no hub)."""

from __future__ import annotations

import pytest
import torch

import centrifuge
from centrifuge.models.presets import PRESETS, build_model, load_model, preset_config
from centrifuge.train.config import load_config
from centrifuge.train.loop import run_training

FAMILY_PRESETS = ["gemma2-tiny", "gemma3-tiny", "olmo2-tiny", "granite-tiny", "phi3-tiny", "qwen3-moe-tiny",
                  "mixtral-tiny", "olmoe-tiny"]
SMALL = dict(num_hidden_layers=2, vocab_size=256)


def test_one_preset_per_family():
    assert {PRESETS[p].model_type for p in FAMILY_PRESETS} | {"llama", "qwen2", "qwen3"} >= set(centrifuge.REGISTRY) - {
        "mistral"}


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_preset_saves_loads_from_a_directory_and_trains(preset, tmp_path):
    model = build_model(preset_config(preset, **SMALL), seed=0)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(model) and loaded.config.model_type == PRESETS[preset].model_type
    before = model.state_dict()
    assert all(torch.equal(t, before[n]) for n, t in loaded.state_dict().items())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 256, (2, 24), generator=gen)
    keep = torch.rand(2, 24, generator=gen) < 0.5
    grads = {}
    for mode in ("reference", "fast"):
        centrifuge.apply(loaded, mode=mode)
        loaded.zero_grad(set_to_none=True)
        loaded(input_ids=ids, labels=ids, keep_mask=keep, use_cache=False).loss.backward()
        centrifuge.revert(loaded)
        grads[mode] = {n: p.grad.clone() for n, p in loaded.named_parameters() if p.grad is not None}
    assert grads["fast"].keys() == grads["reference"].keys()
    for name, ref in grads["reference"].items():  # float32
        assert (grads["fast"][name] - ref).abs().max() <= 1e-4 * max(ref.abs().max().item(), 1e-3), name


@pytest.mark.parametrize("preset", ["gemma2-tiny", "qwen3-moe-tiny"])
def test_train_a_family_preset_then_fine_tune_its_checkpoint(preset, tmp_path, fast_overrides):
    small = "model.overrides={vocab_size: 512, num_hidden_layers: 2}"
    first = run_training(load_config(None, [*fast_overrides("train.steps=2", f"model.preset={preset}"), small]))
    assert first.step == 2 and first.exit_code == 0
    tuned = run_training(load_config(None, fast_overrides("train.steps=2", f"model.path={first.checkpoint}",
                                                          "model.overrides={}", out_dir=str(tmp_path / "tuned"))))
    assert tuned.step == 2
    assert tuned.first_eval.loss == pytest.approx(first.last_eval.loss, rel=1e-5)
