"""Checkpoints: exact round trip (model, AdamW state, scheduler, RNG), atomic keep-last-K, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from centrifuge.models.presets import build_model, preset_config
from centrifuge.train import checkpoint as ckpt
from centrifuge.train.config import load_config
from centrifuge.train.errors import CheckpointError
from centrifuge.train.loop import build_optimizer, build_scheduler
from centrifuge.train.step import train_step

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
CONFIG = load_config(None, ["train.steps=10", "train.warmup_steps=2"])


def make(seed=0, preset="tiny", **overrides):
    model = build_model(preset_config(preset, **{**SMALL, **overrides}), seed=seed)
    optimizer = build_optimizer(model, CONFIG)
    return model, optimizer, build_scheduler(optimizer, CONFIG)


def batch(seed):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).repeat(2, 1),
            "attention_mask": torch.ones_like(ids)}  # fmt: skip


def steps(model, optimizer, scheduler, seeds):
    for s in seeds:
        train_step(model, [batch(s)], optimizer, scheduler, step=s)


def snapshot(run_dir):
    """Every file under run_dir with its bytes: to prove a failed load changed nothing."""
    out = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), run_dir)] = f.read()
    return out


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny"])  # qwen2-tiny ties embeddings and lm_head
def test_round_trip_continues_exactly(tmp_path, preset):
    model, optimizer, scheduler = make(preset=preset)
    steps(model, optimizer, scheduler, [1, 2, 3])
    random.seed(5)
    np.random.seed(5)
    path = ckpt.save_checkpoint(str(tmp_path), step=3, model=model, optimizer=optimizer, scheduler=scheduler,
                                extra={"sampler": {"epoch": 1}})  # fmt: skip
    expected_rng = (torch.rand(3), random.random(), np.random.rand())
    steps(model, optimizer, scheduler, [4, 5])

    other, other_opt, other_sched = make(seed=1, preset=preset)
    state = ckpt.load_checkpoint(path, other, other_opt, other_sched)
    ckpt.restore_rng(state)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        expected_rng[0].tolist(), expected_rng[1], expected_rng[2],
    )  # fmt: skip
    assert state["step"] == 3 and state["sampler"] == {"epoch": 1}
    assert other_sched.last_epoch == 3 and other_opt.param_groups[0]["lr"] == pytest.approx(
        CONFIG.train.lr * scheduler.lr_lambdas[0](3)
    )
    steps(other, other_opt, other_sched, [4, 5])
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_opt.state[q][key])
    # the checkpoint is also a Hugging Face model directory
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_keep_last_k_and_ignore_partial_writes(tmp_path):
    model, optimizer, scheduler = make()
    os.makedirs(tmp_path / "checkpoints" / ".tmp-step-0000009-xyz")  # left by a killed writer
    for step in range(1, 5):
        ckpt.save_checkpoint(str(tmp_path), step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                             extra={}, keep=2)  # fmt: skip
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000003", "step-0000004"]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-0000004")


def _saved(tmp_path):
    model, optimizer, scheduler = make()
    steps(model, optimizer, scheduler, [1])
    return ckpt.save_checkpoint(str(tmp_path), step=1, model=model, optimizer=optimizer, scheduler=scheduler,
                                extra={})  # fmt: skip


def _truncate(path, name):
    with open(os.path.join(path, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, name)) // 2)


def _overwrite_same_size(path, name):
    """4 KB of 0xFF in the middle of the file, size unchanged: only the content hash can tell."""
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, name)) // 2)
        f.write(b"\xff" * 4096)


def _symlink_instead(path, name):
    """The listed file replaced by a symlink to an identical copy elsewhere (same size and hash)."""
    outside = os.path.join(os.path.dirname(os.path.dirname(path)), "elsewhere-" + name)
    shutil.copy(os.path.join(path, name), outside)
    os.remove(os.path.join(path, name))
    os.symlink(outside, os.path.join(path, name))


def _escape_list(path, name):
    """state.json lists a file outside the checkpoint."""
    with open(os.path.join(path, ckpt.STATE_FILE)) as f:
        state = json.load(f)
    state["files"]["../" + name] = state["files"].pop(name)
    with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
        json.dump(state, f)


def _drop(path, name):
    os.remove(os.path.join(path, name))


def _garble_state(path, name):
    with open(os.path.join(path, name), "w") as f:
        f.write("{not json")


def _fake_size(path, name):
    """A truncated file whose recorded size and hash were made to match: the header check must still catch it."""
    _truncate(path, name)
    with open(os.path.join(path, ckpt.STATE_FILE)) as f:
        state = json.load(f)
    with open(os.path.join(path, name), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    state["files"][name] = {"size": os.path.getsize(os.path.join(path, name)), "sha256": digest}
    with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
        json.dump(state, f)


@pytest.mark.parametrize(
    ("damage", "name", "fragment"),
    [
        (_truncate, ckpt.MODEL_FILE, "corrupt: model.safetensors has"),
        (_fake_size, ckpt.MODEL_FILE, "corrupt: cannot read model.safetensors"),
        (_overwrite_same_size, ckpt.MODEL_FILE, "corrupt: model.safetensors does not match the sha256"),
        (_overwrite_same_size, ckpt.OPTIMIZER_FILE, "corrupt: optimizer.safetensors does not match the sha256"),
        (_symlink_instead, ckpt.MODEL_FILE, "corrupt: model.safetensors is not a plain file"),
        (_escape_list, ckpt.RNG_FILE, "may only name files inside the checkpoint"),
        (_drop, ckpt.OPTIMIZER_FILE, "incomplete: optimizer.safetensors is missing"),
        (_drop, ckpt.STATE_FILE, "incomplete: state.json is missing"),
        (_garble_state, ckpt.STATE_FILE, "state.json is not valid JSON"),
    ],
)
def test_damaged_checkpoint_is_one_error_and_changes_nothing(tmp_path, damage, name, fragment):
    path = _saved(tmp_path)
    damage(path, name)
    before = snapshot(tmp_path)
    model, optimizer, scheduler = make(seed=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
    assert fragment in str(info.value)
    assert snapshot(tmp_path) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert optimizer.state == {} or not any(optimizer.state.values())


def test_other_model_shape_is_rejected(tmp_path):
    path = _saved(tmp_path)
    model, optimizer, scheduler = make(intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"different model: model.layers.0.mlp.gate_proj.weight is \[64, 32\]"):
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
    model, optimizer, scheduler = make(num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="different model: it has no model.layers.1"):
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
