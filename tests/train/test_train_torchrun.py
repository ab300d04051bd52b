"""`centrifuge train` under `torchrun --nproc-per-node 2` on the CPU (gloo): the run equals a one-process run of
the same config, only rank 0 writes, a resumed FSDP2 run continues bit for bit, and a checkpoint refuses
another number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.train.config import load_config
from centrifuge.train.errors import ConfigError
from centrifuge.train.loop import start_distributed

STEPS = ["train.steps=4", "checkpoint.every=2", "eval.every=0", "log.every=1", "tokens.selector=self_loss",
         "tokens.scope=batch"]


def torchrun(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "centrifuge.cli.main", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def weights(run_dir: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "model.safetensors"))


def test_torchrun_equals_one_process_and_resumes_exactly(tmp_path, fast_overrides, cli, env):
    one = str(tmp_path / "one")
    done = cli("train", *sets(fast_overrides(*STEPS, out_dir=one)))
    assert done.returncode == 0, done.stderr
    reference = weights(one)

    runs = {}
    for strategy in ("ddp", "fsdp2"):
        runs[strategy] = str(tmp_path / strategy)
        done = torchrun(env, *sets(fast_overrides(*STEPS, f"train.distributed={strategy}", out_dir=runs[strategy])))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("done: 4 steps") == 1  # rank 0 alone prints
        assert f"distributed: 2 ranks ({strategy}), each takes 2 of the 4 sequences" in done.stdout
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

    # Resume the FSDP2 run from step 2 (its step-4 checkpoint removed): the same weights, bit for bit.
    fsdp = runs["fsdp2"]
    uninterrupted = weights(fsdp)
    shutil.rmtree(os.path.join(fsdp, "checkpoints", "step-0000004"))
    done = torchrun(env, "--resume", "--set", f"train.out_dir={fsdp}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and done.stdout.count("done: 4 steps") == 1
    resumed = weights(fsdp)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert any(not torch.equal(weights(fsdp, 2)[k], resumed[k]) for k in resumed)  # it did train on

    # One process cannot continue a 2-rank checkpoint: one clear error, nothing written.
    before = sorted(os.listdir(os.path.join(fsdp, "checkpoints")))
    metrics = (tmp_path / "fsdp2" / "metrics.jsonl").read_text()
    done = cli("train", "--resume", "--set", f"train.out_dir={fsdp}", "--set", "train.steps=6")
    assert done.returncode == 2
    assert "written by a run of 2 process(es) and this run has 1" in done.stderr
    assert sorted(os.listdir(os.path.join(fsdp, "checkpoints"))) == before
    assert (tmp_path / "fsdp2" / "metrics.jsonl").read_text() == metrics


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
    config = load_config(None, fast_overrides("train.distributed=fsdp2", "neurons.rate=0.5"))
    with pytest.raises(ConfigError, match="neurons: neuron omission does not support train.distributed=fsdp2"):
        start_distributed(config)
    with pytest.raises(ConfigError, match="train.distributed must be one of"):
        load_config(None, fast_overrides("train.distributed=zero3"))
