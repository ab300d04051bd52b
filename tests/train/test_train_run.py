"""Whole runs in-process: the loss falls, outputs are written, and bad input is one error that writes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from centrifuge.cli.main import main
from centrifuge.train import checkpoint as ckpt
from centrifuge.train.config import load_config, time_run_dirs
from centrifuge.train.errors import CheckpointError, ConfigError, DataError, TrainingStoppedError
from centrifuge.train.loop import RunContext, load_run_config, run_training
from centrifuge.train.step import dense_loss


def snapshot(root):
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), root)] = f.read()
    return out


def test_training_run_lowers_the_eval_loss(tmp_path, fast_overrides, capsys):
    config = load_config(None, fast_overrides("train.steps=30", "eval.every=10", "log.tensorboard=true",
                                              "checkpoint.every=10", "checkpoint.keep=2"))  # fmt: skip
    result = run_training(config)
    out = capsys.readouterr().out
    assert result.step == 30 and result.exit_code == 0
    assert result.last_eval.loss < result.first_eval.loss - 0.5
    assert "first eval loss" in out and "last  eval loss" in out
    run = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [20, 30]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30] and {"loss", "lr", "tokens_per_s"} <= set(train[0])
    assert os.listdir(run / "tb") and (run / "tokenizer" / "tokenizer.json").is_file()
    assert load_config(str(run / "config.yaml")).train.out_dir == str(run)


def test_sft_jsonl_run(tmp_path, fast_overrides):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = load_config(None, fast_overrides("train.steps=3", f"data.path={data}", "data.eval_fraction=0.1",
                                              "data.seq_len=32"))  # fmt: skip
    result = run_training(config)
    assert result.step == 3 and result.last_eval is not None


@pytest.mark.parametrize(
    ("extra", "error", "fragment"),
    [
        (["data.seq_len=4096"], ConfigError, "above the model's max_position_embeddings=2048"),
        (["data.path=/no/such/corpus.txt"], DataError, "does not exist"),
        (["model.path=/no/such/model", "model.overrides={}"], ConfigError, "model.path '/no/such/model' is not"),
        (["model.overrides={vocab_size: 64}"], DataError, "vocabulary of at least"),
        (["model.overrides={no_such_field: 1}"], ConfigError, "'no_such_field' is not a field of the 'tiny'"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, fast_overrides, extra, error, fragment):
    config = load_config(None, fast_overrides(*extra))
    with pytest.raises(error) as info:
        run_training(config)
    assert fragment in str(info.value)
    assert not (tmp_path / "run").exists()


def test_empty_data_file_through_the_cli(tmp_path, fast_overrides, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code = main(["train", *sum((["--set", s] for s in fast_overrides(f"data.path={empty}")), [])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("centrifuge train: error: no text found") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten_and_resume_rejects_damage(tmp_path, fast_overrides, capsys):
    sets = fast_overrides("train.steps=2")
    run_training(load_config(None, sets))
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(load_config(None, sets))
    assert snapshot(tmp_path / "run") == before
    # a damaged checkpoint: --resume is one error, and nothing (not even metrics.jsonl) is rewritten
    model_file = tmp_path / "run" / "checkpoints" / "step-0000002" / ckpt.MODEL_FILE
    with open(model_file, "r+b") as f:
        f.truncate(100)
    before = snapshot(tmp_path / "run")
    code = main(["train", "--resume", *sum((["--set", s] for s in fast_overrides("train.steps=4")), [])])
    err = capsys.readouterr().err
    assert code == 2 and "is corrupt" in err and err.count("\n") == 1
    assert snapshot(tmp_path / "run") == before


def test_resume_with_other_data_settings_is_refused(tmp_path, fast_overrides):
    run_training(load_config(None, fast_overrides("train.steps=2")))
    config = load_run_config(None, fast_overrides("train.steps=4", "data.seq_len=32"), resume=True)
    with pytest.raises(ConfigError, match=r"data.seq_len: 64 -> 32"):
        run_training(config, resume=True)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, fast_overrides):
    def poison_step_3(ctx: RunContext) -> None:  # also exercises the plug-in mechanism
        current = {}
        ctx.hooks.before_forward.append(lambda step: current.update(step=step))

        def loss_fn(model, batch):
            micro = dense_loss(model, batch)
            if current["step"] == 3:
                micro.loss_sum = micro.loss_sum + float("inf")
            return micro

        ctx.loss_fn = loss_fn

    config = load_config(None, fast_overrides("train.steps=5", "checkpoint.every=2"))
    with pytest.raises(TrainingStoppedError) as info:
        run_training(config, plugins=[poison_step_3])
    message = str(info.value)
    assert "non-finite loss (inf) at step 3" in message and "step-0000002" in message
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run"))] == [2]
    assert ckpt.read_state(ckpt.latest_checkpoint(str(tmp_path / "run")))["step"] == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_saved_or_called_good(tmp_path, fast_overrides, bad):
    """An optimizer step that leaves NaN / inf in the weights (with a finite loss and gradient norm, as an
    eps that rounds to 0 or a huge lr can) must not be written as a checkpoint, nor named the last good one."""
    from safetensors.torch import load_file

    def poison_after_step_2(ctx: RunContext) -> None:
        def hook(step: int) -> None:
            if step == 2:  # after the optimizer moved: the loss of step 2 was finite
                with torch.no_grad():
                    ctx.model.model.layers[1].mlp.down_proj.weight[3, 5] = bad

        ctx.hooks.after_optimizer_step.append(hook)

    config = load_config(None, fast_overrides("train.steps=4", "checkpoint.every=1", "checkpoint.keep=5"))
    with pytest.raises(TrainingStoppedError) as info:
        run_training(config, plugins=[poison_after_step_2])
    message = str(info.value)
    assert info.value.exit_code == 1
    assert "the weights hold NaN or inf after step 2" in message and "step-0000001" in message
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run"))] == [1]
    weights = load_file(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "run")), ckpt.MODEL_FILE))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_checkpoint_is_a_model_directory_to_fine_tune_from(tmp_path, fast_overrides):
    first = run_training(load_config(None, fast_overrides("train.steps=2")))
    sets = fast_overrides("train.steps=2", f"model.path={first.checkpoint}", "model.overrides={}",
                          out_dir=str(tmp_path / "tuned"))  # fmt: skip
    result = run_training(load_config(None, sets))
    assert result.step == 2
    # data.tokenizer=auto took the model directory's tokenizer instead of training one
    saved = (tmp_path / "tuned" / "tokenizer" / "tokenizer.json").read_text()
    assert saved == (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text()
    # and training started from the checkpoint's weights, not from a random init
    assert result.first_eval.loss == pytest.approx(first.last_eval.loss, rel=1e-5)


def test_resume_without_a_checkpoint_is_an_error(tmp_path, fast_overrides):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run_training(load_config(None, fast_overrides()), resume=True)
    assert not (tmp_path / "run").exists()


def test_time_template_gives_each_run_its_own_directory_and_resume_takes_the_newest(tmp_path, fast_overrides):
    template = str(tmp_path / "runs" / "{time}")
    sets = fast_overrides("train.steps=1", out_dir=template)
    first = run_training(load_config(None, sets))
    second = run_training(load_config(None, sets))  # same second: a "-2" suffix, not an error
    assert first.run_dir != second.run_dir
    assert time_run_dirs(template) == [first.run_dir, second.run_dir]
    resumed = run_training(load_run_config(None, fast_overrides("train.steps=2", out_dir=template), resume=True),
                           resume=True)  # fmt: skip
    assert resumed.run_dir == second.run_dir and resumed.step == 2
