"""What a user sees: ``centrifuge --version``, a clean log when output is not a terminal, no warning floods."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

import centrifuge
from centrifuge.cli.main import main
from centrifuge.train.config import load_config
from centrifuge.train.loop import run_training
from centrifuge.train.metrics import Progress
from centrifuge.train.step import StepStats

ROOT = Path(__file__).resolve().parents[2]


def test_version_matches_the_package(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"centrifuge {declared}"
    assert centrifuge.__version__ == declared


def _stats(step: int, kept: int = 50) -> StepStats:
    return StepStats(step=step, loss=9.0 - step, num_counted=kept, num_valid=100, num_tokens=128, grad_norm=1.0,
                     lr=1e-3, stats={"omit": 0.25})


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    progress = Progress(5, 0, enabled=True, every=2, interactive=False)
    for step in range(1, 6):
        progress.update(_stats(step), 1000.0)
    progress.write("eval loss 1.0")
    progress.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(" | ")[0] for line in lines[:3]] == ["step 2/5", "step 4/5", "step 5/5"]  # every 2 + the last
    assert "loss 5.000" in lines[1] and "kept 50%" in lines[1] and "omit 0.25" in lines[1]
    assert lines[3] == "eval loss 1.0"
    assert "\r" not in out and err == ""  # no bar redraws in a log file


def test_progress_disabled_prints_nothing(capsys):
    progress = Progress(3, 0, enabled=False, every=1, interactive=False)
    progress.update(_stats(1), 1000.0)
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_redirected_run_with_omission_has_a_clean_log_and_no_warnings(fast_overrides, capsys):
    """A run with token filtering and neuron omission, output captured (not a terminal): the log is plain
    lines — no carriage returns — and no warning is raised (transformers >= 5.2x warned on every attention
    call when the omission forward passed the KV cache under both of its names: 8 warnings in this run)."""
    sets = fast_overrides("train.steps=4", "log.every=2", "log.progress=true", "eval.every=0", "neurons.rate=0.5",
                          "neurons.multiple=16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_training(load_config(None, sets))
    out, err = capsys.readouterr()
    assert result.step == 4
    assert [str(w.message) for w in caught] == []
    assert "\r" not in out + err and err == ""
    steps = re.findall(r"^step (\d)/4 \| loss [\d.]+ .*\| kept \d+% \| omit [\d.]+", out, re.M)
    assert steps == ["2", "4"]
    # the banner: device and backend, and a measured dense vs token-sparse time on this CPU
    assert re.search(r"^device: cpu \(\d+ threads?\), fp32 \| attention backward: auto = math", out, re.M)
    assert re.search(r"^speed: .*token-sparse forward \+ backward .*[\d.]+x the dense time", out, re.M)


def test_print_config_keeps_the_defaults_comments(capsys):
    assert main(["train", "--print-config", "--set", "train.steps=5", "--set",
                 "model.overrides={num_hidden_layers: 1}"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == load_config(None, ["train.steps=5", "model.overrides={num_hidden_layers: 1}"]
                                               ).to_dict()  # the comments change nothing
    assert re.search(r"^  steps: 5 +# optimizer steps$", text, re.M)
    assert re.search(r"^tokens: +# token filtering", text, re.M)
    assert re.search(r"^    num_hidden_layers: 1$", text, re.M)  # nested values carry no comment
