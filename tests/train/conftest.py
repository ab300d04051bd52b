"""Shared set-up of the train tests: a model small enough that a step takes milliseconds on one CPU core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A 2-layer, 64-wide Llama with a 512-token vocabulary, 64-token sequences: a step takes ~10 ms.
FAST = [
    "model.overrides={vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1}",
    "data.seq_len=64",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
    "eval.max_batches=2",
]


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> str:
    """One tokenizer cache for the whole session (each distinct corpus is trained once)."""
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="session")
def fast_items() -> list[str]:
    """The ``FAST`` items, for fixtures wider than one test (``fast_overrides`` is per test)."""
    return list(FAST)


@pytest.fixture
def fast_overrides(tmp_path, tokenizer_cache):
    """``--set`` items for a fast run writing to ``tmp_path/run``; extra items are appended."""

    def make(*extra: str, out_dir: str | None = None) -> list[str]:
        out = out_dir or str(tmp_path / "run")
        return [*FAST, f"train.out_dir={out}", f"data.cache_dir={tokenizer_cache}", *extra]

    return make


@pytest.fixture
def cli():
    """Run ``centrifuge`` in a subprocess (one thread, no progress bar); returns CompletedProcess."""

    def run(*args: str, cwd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "centrifuge", *args],
            cwd=cwd,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def env():
    return subprocess_env()
