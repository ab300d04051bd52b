"""Neuron omission inside `centrifuge train`: the `neurons` config section and its plug-in."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.neurons import omitter_of
from centrifuge.train import checkpoint as ckpt
from centrifuge.train.config import load_config
from centrifuge.train.errors import CheckpointError, ConfigError
from centrifuge.train.loop import execute_run, prepare_run, run_training

# intermediate 128 with multiple 16: rate 0.5 keeps 64 channels; 2 KV groups: one kept
NEURONS = ["neurons.rate=0.5", "neurons.multiple=16", "neurons.schedule=ladder", "neurons.rungs=2",
           "model.overrides={vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
           "num_attention_heads: 4, num_key_value_heads: 2}"]


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, ckpt.MODEL_FILE))


def test_neurons_with_tokens_train_and_report_the_rate(tmp_path, fast_overrides, capsys):
    result = run_training(load_config(None, fast_overrides("train.steps=8", "eval.every=4", "log.every=1",
                                                           *NEURONS)))
    out = capsys.readouterr().out
    assert "neuron omission: on" in out and "token filtering: on" in out and "run average 0.3" in out
    with open(os.path.join(result.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    rates = [r["omit"] for r in records if "omit" in r]
    assert rates[:4] == [0.5] * 4 and rates[-1] == 0.0  # LORS: hold, then down to dense
    assert result.last_eval.loss < result.first_eval.loss
    assert os.path.isfile(os.path.join(result.checkpoint, ckpt.PLUGINS_FILE))


def test_omitted_rows_do_not_move(fast_overrides):
    """One step at a constant rate: weights of the omitted MLP channels are exactly unchanged."""
    run = prepare_run(load_config(None, fast_overrides("train.steps=1", "tokens.keep_ratio=1.0", *NEURONS,
                                                       "neurons.schedule=constant", "neurons.metric=uniform")))
    model = run.context.model
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = execute_run(run)
    plan = omitter_of(model).current.get(0)
    after = weights(result.checkpoint)["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(after[plan.dropped_channels], before[plan.dropped_channels])
    assert not torch.equal(after[plan.channels], before[plan.channels])


def test_resume_continues_exactly_with_omission_statistics(tmp_path, fast_overrides):
    """Activation statistics live in the checkpoint: resuming from step 3 lands where the straight run lands."""
    sets = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep=3", "eval.every=0", *NEURONS]
    straight = run_training(load_config(None, fast_overrides(*sets, out_dir=str(tmp_path / "a"))))
    resumed_dir = str(tmp_path / "b")
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, ckpt.CHECKPOINTS, ckpt.checkpoint_name(6)))
    resumed = run_training(load_config(None, fast_overrides(*sets, out_dir=resumed_dir)), resume=True)
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert resumed.step == 6 and all(torch.equal(a[k], b[k]) for k in a)

    # the same checkpoint under a config without omission is refused before anything changes
    with pytest.raises(CheckpointError, match="neurons"):
        prepare_run(load_config(None, fast_overrides(*sets, "neurons.rate=0", out_dir=resumed_dir)), resume=True)


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["neurons.rate=1.0"], "omission rate"),
        (["neurons.rate=0.5", "neurons.metric=loudness"], "neurons.metric"),
        (["neurons.rate=0.5", "neurons.layers=[7]"], "neurons.layers"),
        (["neurons.ratee=0.5"], "rate"),
    ],
)
def test_bad_neuron_settings_are_one_clear_error(sets, fragment, fast_overrides, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        run_training(load_config(None, fast_overrides(*sets)))
    assert not (tmp_path / "run").exists()


def test_checkpointing_tokens_and_neurons_together_equal_the_plain_run(tmp_path, fast_overrides):
    """train.activation_checkpointing recomputes instead of saving; the weights land where they land without."""
    runs = {}
    for ckpt_on in (False, True):
        sets = ["train.steps=3", f"train.activation_checkpointing={str(ckpt_on).lower()}", *NEURONS,
                "tokens.selector=self_loss"]
        result = run_training(load_config(None, fast_overrides(*sets, out_dir=str(tmp_path / str(ckpt_on)))))
        runs[ckpt_on] = weights(result.checkpoint)
    for name, ref in runs[False].items():
        assert torch.allclose(runs[True][name], ref, rtol=1e-4, atol=1e-6), name
    prepared = prepare_run(load_config(None, fast_overrides("train.activation_checkpointing=true",
                                                            out_dir=str(tmp_path / "check"))))
    assert all(layer.gradient_checkpointing for layer in prepared.context.model.model.layers)
