"""Token filtering inside `centrifuge train`: the `tokens` config section and its plug-in."""

from __future__ import annotations

import pytest
import torch

import centrifuge
from centrifuge.train.config import load_config
from centrifuge.train.errors import ConfigError
from centrifuge.train.loop import run_training


def final_weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{result.checkpoint}/model.safetensors")


def test_default_trains_with_token_filtering_and_says_so(fast_overrides, capsys):
    config = load_config(None, fast_overrides("train.steps=12", "eval.every=6"))
    assert config.tokens.keep_ratio == 0.5 and config.tokens.mode == "fast"
    result = run_training(config)
    out = capsys.readouterr().out
    assert "token filtering: on" in out and "keep ratio 0.5" in out
    assert result.last_eval.loss < result.first_eval.loss


def test_keep_ratio_one_is_ordinary_dense_training(tmp_path, fast_overrides, capsys):
    dense = run_training(load_config(None, fast_overrides("train.steps=4", "tokens.keep_ratio=1.0",
                                                          out_dir=str(tmp_path / "a"))))
    assert "token filtering: off" in capsys.readouterr().out
    plain = run_training(load_config(None, fast_overrides("train.steps=4", out_dir=str(tmp_path / "b"))),
                         plugins=[])
    a, b = final_weights(dense), final_weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("selector", ["self_loss", "label_mask"])
def test_other_selectors_run(selector, fast_overrides):
    config = load_config(None, fast_overrides("train.steps=3", f"tokens.selector={selector}",
                                              "tokens.scope=batch", "tokens.keep_ratio=0.4"))
    result = run_training(config)
    assert result.step == 3


def test_fast_equals_reference_mode_in_training(tmp_path, fast_overrides):
    """Three optimizer steps through the token-sparse path land where the oracle lands (float32)."""
    runs = {}
    for mode in ("fast", "reference"):
        cfg = load_config(None, fast_overrides("train.steps=3", f"tokens.mode={mode}", out_dir=str(tmp_path / mode)))
        runs[mode] = final_weights(run_training(cfg))
    for name, ref in runs["reference"].items():
        assert torch.allclose(runs["fast"][name], ref, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["tokens.selector=rho"], "tokens.selector"),
        (["tokens.keep_ratio=0"], "tokens.keep_ratio"),
        (["tokens.selector=excess_loss"], "reference_scores"),
        (["tokens.mode=faster"], "tokens.mode"),
        (["tokens.keep_ratoi=0.3"], "keep_ratio"),
    ],
)
def test_bad_token_settings_are_one_clear_error(sets, fragment, fast_overrides):
    with pytest.raises(ConfigError, match=fragment):
        run_training(load_config(None, fast_overrides(*sets)))


def test_patched_model_is_reverted_cleanly(fast_overrides):
    from centrifuge.train.loop import prepare_run

    prepared = prepare_run(load_config(None, fast_overrides("train.steps=1")))
    model = prepared.context.model
    assert centrifuge.patch_mode(model) == "fast"
    centrifuge.revert(model)
    assert centrifuge.patch_mode(model) is None


def test_rho1_recipe_offline_scores_then_excess_loss_training(tmp_path, fast_overrides):
    from centrifuge.cli.main import main as cli_main

    sets = fast_overrides("train.steps=3")
    scores = tmp_path / "scores"
    argv = ["score-reference", "--model", "tiny", "--out", str(scores), "--no-progress", "--batch", "16",
            "--shard-size", "1024", "--device", "cpu"]
    for item in sets:
        argv += ["--set", item]
    assert cli_main(argv) == 0
    rho1 = ["tokens.selector=excess_loss", f"tokens.reference_scores={scores}", "tokens.scope=batch"]
    result = run_training(load_config(None, [*sets, *rho1]))
    assert result.step == 3
    # scores of other data (another sequence length) are refused before anything is written
    other = fast_overrides("train.steps=1", "data.seq_len=32", out_dir=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="seq"):
        run_training(load_config(None, [*other, *rho1]))
    assert not (tmp_path / "other").exists()
