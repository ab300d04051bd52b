"""Real processes: a run killed with SIGKILL and resumed ends bit-identical; SIGTERM saves and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from centrifuge.train import checkpoint as ckpt

STEPS = 40


def as_args(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def start(overrides, env, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "centrifuge", "train", *as_args(overrides), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_checkpoint(run_dir, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ckpt.list_checkpoints(run_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint:\n{proc.communicate()[1]}")
        time.sleep(0.002)
    raise AssertionError("no checkpoint appeared")


def final_tensors(run_dir):
    path = os.path.join(ckpt.latest_checkpoint(run_dir))
    assert path.endswith(f"step-{STEPS:07d}")
    return load_file(os.path.join(path, ckpt.MODEL_FILE)), load_file(os.path.join(path, ckpt.OPTIMIZER_FILE))


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, fast_overrides, env, cli):
    common = [f"train.steps={STEPS}", "train.grad_accum=2", "checkpoint.every=3", "eval.every=0"]
    straight = str(tmp_path / "straight")
    killed = str(tmp_path / "killed")
    done = cli("train", *as_args(fast_overrides(*common, out_dir=straight)))
    assert done.returncode == 0, done.stderr

    proc = start(fast_overrides(*common, out_dir=killed), env)
    wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGSTOP)  # freeze at once, then kill: no chance to clean up
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = ckpt.list_checkpoints(killed)[-1][0]
    assert step_at_kill < STEPS

    # with no CONFIG, --resume continues with the run's own saved config
    resumed = cli("train", "--resume", "--set", f"train.out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed}/checkpoints/step-{step_at_kill:07d}" in resumed.stdout

    model_a, optim_a = final_tensors(straight)
    model_b, optim_b = final_tensors(killed)
    assert model_a.keys() == model_b.keys() and optim_a.keys() == optim_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in optim_a:
        assert torch.equal(optim_a[key], optim_b[key]), key
    # metrics.jsonl reads as one run: no duplicated steps from the lost part of the killed run
    with open(os.path.join(killed, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(10, STEPS + 1, 10))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, fast_overrides, env, cli, sig):
    run_dir = str(tmp_path / "run")
    proc = start(fast_overrides("train.steps=100000", "checkpoint.every=2", "eval.every=0"), env)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    last_step = ckpt.list_checkpoints(run_dir)[-1][0]
    assert f"stopped by {sig.name} after step {last_step}" in out
    state = ckpt.read_state(ckpt.latest_checkpoint(run_dir))
    assert state["step"] == last_step
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".")]
    # it resumes from there (train.steps may change on resume; only model/data/seed/batch shape may not)
    resumed = cli("train", "--resume", "--set", f"train.out_dir={run_dir}", "--set", f"train.steps={last_step + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt.list_checkpoints(run_dir)[-1][0] == last_step + 2
