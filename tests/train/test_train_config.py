"""Config: YAML + --set, one clear error for unknown keys (with the closest valid key) and bad values."""

from __future__ import annotations

import os

import pytest
import yaml

from centrifuge.cli.main import main
from centrifuge.train.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    section_keys,
    section_types,
)


def test_default_yaml_lists_every_key_with_its_default():
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert list(raw) == list(section_types())
    for name, section_type in section_types().items():
        assert list(raw[name]) == list(section_keys(section_type)), name
    assert load_config() == Config()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 1e-3\ndata:\n  seq_len: 32\n")
    config = load_config(str(path), ["train.steps=9", "log.progress=false", "model.overrides.num_hidden_layers=1"])
    assert config.train.steps == 9
    assert config.train.lr == 1e-3  # YAML reads "1e-3" as a string; the float field converts it
    assert config.data.seq_len == 32
    assert config.log.progress is False
    assert config.model.overrides == {"num_hidden_layers": 1}
    assert config.train.batch_size == Config().train.batch_size  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("overrides", "named", "suggested"),
    [
        (["train.lrr=1"], "train.lrr", "train.lr"),
        (["train.learning_rate=1"], "train.learning_rate", "train.lr"),
        (["train.seq_len=64"], "train.seq_len", "data.seq_len"),
        (["trian.steps=1"], "trian", "train"),
        (["checkpoint.kep=3"], "checkpoint.kep", "checkpoint.keep"),
    ],
)
def test_unknown_key_names_it_and_the_closest_valid_key(overrides, named, suggested):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert repr(named) in message and repr(suggested) in message
    assert "--set" in message


def test_unknown_keys_in_a_file_are_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  prest: tiny\ntrain:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "c.yaml" in message
    assert "'model.preset'" in message and "'train.steps'" in message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.lr=abc"], "train.lr: expected a number"),
        (["train.steps=0"], "train.steps must be at least 1"),
        (["train.steps=2.5"], "train.steps: expected an integer"),
        (["log.progress=maybe"], "log.progress: expected true or false"),
        (["train.precision=fp16"], "train.precision must be one of"),
        (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1)"),
        (["model.preset=tiney"], "did you mean 'tiny'"),
        (["model.overrides=3"], "model.overrides: expected a mapping"),
        (["train.steps"], "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_values(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(str(listy))


def test_cli_reports_one_error_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--set", "train.lerning_rate=1", "--set", f"train.out_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "did you mean 'train.lr'" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_print_config_round_trips(capsys, tmp_path):
    assert main(["train", "--print-config", "--set", "train.steps=5"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert load_config(str(path)).train.steps == 5
