"""Sharded checkpoints (``checkpoint.format=sharded``, torch.distributed.checkpoint) in one process: an exact
round trip, an index read from JSON and never unpickled (equal to DCP's own), every malformed index entry one
``CheckpointError``, a different model refused before anything loads, and the rule for another rank count.
(The multi-process paths, 2 ranks saving and 1 / 3 resuming, are in test_train_torchrun.py.)"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import pytest
import torch
from test_train_checkpoint import make, snapshot, steps

from centrifuge.train import checkpoint as ckpt
from centrifuge.train import sharded_checkpoint as sharded
from centrifuge.train.errors import CheckpointError


def saved(tmp_path, preset: str = "tiny"):
    model, optimizer, scheduler = make(preset=preset)
    steps(model, optimizer, scheduler, [1, 2])
    path = ckpt.save_checkpoint(str(tmp_path), step=2, model=model, optimizer=optimizer, scheduler=scheduler,
                                extra={"sampler": {"epoch": 0}}, sharded=True)  # fmt: skip
    return path, model, optimizer, scheduler


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny"])  # qwen2-tiny ties embeddings and lm_head
def test_round_trip_without_unpickling(tmp_path, preset, monkeypatch):
    path, model, optimizer, scheduler = saved(tmp_path, preset)
    names = set(os.listdir(path))
    assert {"__0_0.distcp", "dcp_metadata.json", "model.safetensors", "rng.safetensors", "state.json"} <= names
    assert ".metadata" not in names and "optimizer.safetensors" not in names
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    assert (state["format_version"], state["layout"]) == (3, "sharded")
    steps(model, optimizer, scheduler, [3, 4])

    other, other_opt, other_sched = make(seed=1, preset=preset)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle.load called while loading a sharded checkpoint")

    monkeypatch.setattr(pickle, "load", no_pickle)  # DCP's FileSystemReader.read_metadata would call it
    state = ckpt.load_checkpoint(path, other, other_opt, other_sched)
    monkeypatch.undo()
    ckpt.restore_rng(state)
    assert state["step"] == 2 and other_sched.last_epoch == 2
    steps(other, other_opt, other_sched, [3, 4])
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_opt.state[q][key])


def test_json_index_equals_dcps_own(tmp_path):
    """The JSON index rebuilds exactly the ``Metadata`` DCP pickles (read here from our own fresh file)."""
    import torch.distributed.checkpoint as dcp

    model, optimizer, _ = make()
    steps(model, optimizer, None, [1])
    tensors, _ = sharded.flat_state(model, optimizer)
    with sharded._one_process_quiet():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    with open(tmp_path / ".metadata", "rb") as f:
        own = pickle.load(f)  # noqa: S301 (written by this test a line above)
    rebuilt = sharded.metadata_from_json(json.loads(json.dumps(sharded.metadata_to_json(own))), "x")
    assert rebuilt.state_dict_metadata == own.state_dict_metadata
    assert rebuilt.storage_data == own.storage_data
    assert {k: v.index for k, v in ((i, i) for i in rebuilt.storage_data)} == \
        {k: v.index for k, v in ((i, i) for i in own.storage_data)}
    assert set(rebuilt.planner_data) == set(own.planner_data)


def _edit(data: dict, how: str) -> dict:
    data = copy.deepcopy(data)
    first = next(iter(data["tensors"]))
    if how == "traversal":
        data["storage"][0]["file"] = "../../outside.distcp"
    elif how == "chunk_outside":
        data["tensors"][first]["chunks"][0]["offsets"][0] = data["tensors"][first]["size"][0]
    elif how == "dtype":
        data["tensors"][first]["dtype"] = "object"
    elif how == "no_chunks":
        data["tensors"][first]["chunks"] = []
    elif how == "negative":
        data["storage"][0]["length"] = -1
    elif how == "format":
        data["format"] = 99
    elif how == "unknown_fqn":
        data["storage"][0]["fqn"] = "model/nowhere"
    return data


@pytest.mark.parametrize(("how", "message"), [
    ("traversal", "names '../../outside.distcp' as a data file"),
    ("chunk_outside", "has a chunk outside its size"),
    ("dtype", "has no known dtype"),
    ("no_chunks", "lists no chunks"),
    ("negative", "start / length must be a list of integers >= 0"),
    ("format", "unknown format"),
    ("unknown_fqn", "storage entry for no listed tensor"),
])
def test_malformed_index_is_one_error(tmp_path, how, message):
    path, *_ = saved(tmp_path)
    with open(os.path.join(path, sharded.DCP_METADATA_FILE)) as f:
        data = json.load(f)
    sharded.metadata_from_json(data, path)  # the written one parses
    with pytest.raises(CheckpointError, match="dcp_metadata.json .*" + re.escape(message)):
        sharded.metadata_from_json(_edit(data, how), path)


def test_other_model_is_refused_before_loading(tmp_path):
    path, *_ = saved(tmp_path)
    before = snapshot(str(tmp_path))
    other, other_opt, other_sched = make(intermediate_size=48)
    weights = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="holds a different model: model/.*mlp.* is \\[64, 32\\] there"):
        ckpt.load_checkpoint(path, other, other_opt, other_sched)
    assert all(torch.equal(weights[k], v) for k, v in other.state_dict().items())
    assert snapshot(str(tmp_path)) == before


def test_another_rank_count_needs_equal_generators():
    """A checkpoint of 2 ranks resumes on 1 when both ranks' CPU generators agree, and is refused otherwise."""
    state = {"world_size": 2}
    same = {"torch_cpu": torch.get_rng_state(), "rank1/torch_cpu": torch.get_rng_state()}
    ckpt.check_world_size("ck", state, same)
    torch.rand(1)
    differ = {**same, "rank1/torch_cpu": torch.get_rng_state()}
    with pytest.raises(CheckpointError, match="written by a run of 2 process\\(es\\) whose random generators "
                                              "differ .* resume with torchrun --nproc-per-node 2"):
        ckpt.check_world_size("ck", state, differ)
    ckpt.check_world_size("ck", {"world_size": 1}, {"torch_cpu": torch.get_rng_state()})  # the same count
