"""`centrifuge train` under `torchrun --nproc-per-node 2` on the CPU (gloo): the run equals a one-process run of
the same config, only rank 0 writes, a resumed FSDP2 run continues bit for bit on 2 ranks, and its sharded
checkpoint (torch.distributed.checkpoint) resumes on 1 and 3 processes as the uninterrupted run continues; a
corrupt or missing shard is one clear error, and DCP's pickled index is never read."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.train.config import load_config
from centrifuge.train.errors import ConfigError
from centrifuge.train.loop import start_distributed
from conftest import subprocess_env

STEPS = ["train.steps=4", "checkpoint.every=2", "eval.every=0", "log.every=1", "tokens.selector=self_loss",
         "tokens.scope=batch"]


def torchrun(env: dict[str, str], *args: str, timeout: float = 120, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "centrifuge.cli.main", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def weights(run_dir: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "model.safetensors"))


def sharded_files(ckpt: str) -> set[str]:
    return {n for n in os.listdir(ckpt) if n.endswith(".distcp") or n.startswith(("dcp_", ".metadata"))}


def checkpoint_listing(run_dir: str) -> dict[str, list[str]]:
    root = os.path.join(run_dir, "checkpoints")
    return {d: sorted(os.listdir(os.path.join(root, d))) for d in sorted(os.listdir(root))}


class PickleBomb:
    """Unpickling it creates the file named by ``path`` (what a forged pickled index could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_torchrun_equals_one_process_and_resumes_exactly(tmp_path, fast_overrides, cli, env):
    """DDP and FSDP2 on 2 ranks end where one process ends. FSDP2 writes sharded checkpoints (each rank its
    shards, no gather of the optimizer); stopped at step 2, the run continues on 2 ranks bit for bit, and on
    1 and on 3 processes with the losses and weights of the uninterrupted run (fp32: the ranks sum in
    another order) and the same data order (equal token counts per step)."""
    items = [*STEPS, "train.batch_size=6"]  # 6 sequences split over 1, 2 and 3 ranks
    one = str(tmp_path / "one")
    done = cli("train", *sets(fast_overrides(*items, out_dir=one)))
    assert done.returncode == 0, done.stderr
    reference = weights(one)

    runs = {}
    for strategy in ("ddp", "fsdp2"):
        runs[strategy] = str(tmp_path / strategy)
        done = torchrun(env, *sets(fast_overrides(*items, f"train.distributed={strategy}", out_dir=runs[strategy])))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("done: 4 steps") == 1  # rank 0 alone prints
        assert f"distributed: 2 ranks ({strategy}), each takes 3 of the 6 sequences" in done.stdout
        # the same global batches: the same token counts (a rank taking the whole batch would double them)
        records, ref_records = train_records(runs[strategy]), train_records(one)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for r, ref in zip(records, ref_records, strict=True):
            assert (r["num_counted"], r["num_valid"]) == (ref["num_counted"], ref["num_valid"])
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        got = weights(runs[strategy])
        assert got.keys() == reference.keys()
        for name, ref in reference.items():  # float32: the ranks sum gradients in another order
            torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=2e-6, msg=name)
        assert not any(name.startswith("rank") for name in os.listdir(runs[strategy]))

    fsdp = runs["fsdp2"]
    step2 = os.path.join(fsdp, "checkpoints", "step-0000002")
    with open(os.path.join(step2, "state.json")) as f:
        state = json.load(f)
    assert (state["layout"], state["world_size"]) == ("sharded", 2)
    assert sharded_files(step2) == {"__0_0.distcp", "__1_0.distcp", "dcp_metadata.json"}  # no pickled .metadata
    assert sharded_files(step2) <= set(state["files"]) and "optimizer.safetensors" not in state["files"]
    assert "model.safetensors" in state["files"]  # checkpoint.full_weights=every: loadable by from_pretrained

    # Resume the FSDP2 run from step 2 (its step-4 checkpoint removed) on 1 and on 3 processes.
    reference_records = train_records(fsdp)
    uninterrupted = weights(fsdp)
    for nproc in (1, 3):
        run = str(tmp_path / f"resumed-{nproc}")
        shutil.copytree(fsdp, run)
        shutil.rmtree(os.path.join(run, "checkpoints", "step-0000004"))
        if nproc == 1:
            # A pickled `.metadata` planted next to the shards is never unpickled: the index is dcp_metadata.json.
            marker = tmp_path / "unpickled"
            with open(os.path.join(run, "checkpoints", "step-0000002", ".metadata"), "wb") as f:
                pickle.dump(PickleBomb(str(marker)), f)
            done = cli("train", "--resume", "--set", f"train.out_dir={run}")
            assert not marker.exists()
        else:
            done = torchrun(env, "--resume", "--set", f"train.out_dir={run}", nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming from" in done.stdout and done.stdout.count("done: 4 steps") == 1
        records = train_records(run)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for r, ref in zip(records, reference_records, strict=True):
            assert (r["num_counted"], r["num_valid"]) == (ref["num_counted"], ref["num_valid"]), nproc
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), (nproc, r["step"])
        got = weights(run)
        for name, ref in uninterrupted.items():
            torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=2e-6, msg=name)
        assert any(not torch.equal(weights(run, 2)[k], got[k]) for k in got)  # it did train on

    # ... and on 2 ranks: the same weights, bit for bit.
    shutil.rmtree(os.path.join(fsdp, "checkpoints", "step-0000004"))
    done = torchrun(env, "--resume", "--set", f"train.out_dir={fsdp}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and done.stdout.count("done: 4 steps") == 1
    resumed = weights(fsdp)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert any(not torch.equal(weights(fsdp, 2)[k], resumed[k]) for k in resumed)  # it did train on


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, fast_items, tokenizer_cache) -> str:
    """A 2-step run of one process writing sharded checkpoints (checkpoint.format=sharded)."""
    run = str(tmp_path_factory.mktemp("sharded") / "run")
    items = [*fast_items, f"train.out_dir={run}", f"data.cache_dir={tokenizer_cache}", "train.steps=2",
             "checkpoint.every=1", "eval.every=0", "checkpoint.format=sharded", "checkpoint.keep=1"]
    done = subprocess.run([sys.executable, "-m", "centrifuge", "train", *sets(items)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.parametrize("damage", ["flip", "missing", "index"])
def test_bad_shard_is_one_error_and_changes_nothing(damage, sharded_run, tmp_path, cli):
    """A sharded checkpoint with a flipped byte in a shard, a missing shard or an edited index: one
    CheckpointError (exit 2), no file of the run changed."""
    run = str(tmp_path / "run")
    shutil.copytree(sharded_run, run)
    ckpt = os.path.join(run, "checkpoints", "step-0000002")
    assert sharded_files(ckpt) == {"__0_0.distcp", "dcp_metadata.json"}
    if damage == "flip":
        path = Path(ckpt, "__0_0.distcp")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        expected = "__0_0.distcp does not match the sha256 recorded in state.json"
    elif damage == "missing":
        os.unlink(os.path.join(ckpt, "__0_0.distcp"))
        expected = "is incomplete: __0_0.distcp is missing"
    else:
        path = Path(ckpt, "dcp_metadata.json")
        path.write_text(path.read_text().replace('"__0_0.distcp"', '"__9_0.distcp"', 1))  # same size
        expected = "dcp_metadata.json does not match the sha256"
    before = checkpoint_listing(run)
    metrics = Path(run, "metrics.jsonl").read_text()
    done = cli("train", "--resume", "--set", f"train.out_dir={run}", "--set", "train.steps=3")
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and done.stderr.count("centrifuge train: error") == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert checkpoint_listing(run) == before
    assert Path(run, "metrics.jsonl").read_text() == metrics


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_fsdp2_process_group_is_torn_down_before_exit(env):
    """The cause of a rare SIGABRT of one rank at exit (`terminate called without an active exception`): after
    FSDP2, DTensor's caches kept the gloo process group alive past destroy_process_group, so its threads were
    torn down during interpreter finalization. `distributed.shutdown()` must leave no gloo thread behind."""
    script = os.path.join(os.path.dirname(__file__), "fsdp2_teardown_child.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("gloo threads left after shutdown: []") == 2, done.stdout


def test_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch, fast_overrides):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(None, fast_overrides("train.batch_size=3"))
    with pytest.raises(ConfigError, match="train.batch_size=3 .* split evenly over the 2 ranks"):
        start_distributed(config)
    with pytest.raises(ConfigError, match="train.distributed must be one of"):
        load_config(None, fast_overrides("train.distributed=zero3"))
