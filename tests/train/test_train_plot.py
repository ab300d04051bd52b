"""Pictures of runs: ``centrifuge plot``, the PNG at the end of a run, tokens / seconds in the metrics, and one
TensorBoard events file per run across resumes."""

from __future__ import annotations

import glob
import json
import shutil

import pytest
import yaml

from centrifuge.cli.main import main
from centrifuge.train.config import load_config
from centrifuge.train.loop import run_training
from centrifuge.train.plot import differing_keys, figure, load_run, run_labels


def fake_run(path, *, keep: float, losses: list[float], omit: bool = False) -> str:
    """A run directory with a config.yaml and metrics.jsonl of ``len(losses)`` logged steps."""
    path.mkdir(parents=True)
    config = {"train": {"out_dir": str(path), "steps": len(losses)}, "tokens": {"keep_ratio": keep},
              "neurons": {"rate": 0.5 if omit else 0.0}}
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = [{"step": 0, "kind": "eval", "loss": 9.0, "tokens": 0, "train_seconds": 0.0}]
    for i, loss in enumerate(losses, start=1):
        record = {"step": i, "kind": "train", "loss": loss, "counted_fraction": keep, "tokens": 100 * i,
                  "train_seconds": 0.5 * i}
        if omit:
            record["omit"] = 0.5 if i <= len(losses) // 2 else 0.0
        lines.append(record)
    lines.append({"step": len(losses), "kind": "eval", "loss": losses[-1] + 0.1, "tokens": 100 * len(losses),
                  "train_seconds": 0.5 * len(losses)})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 9, \"ki")  # cut
    return str(path)


def test_labels_name_the_differing_config_keys(tmp_path):
    a = load_run(fake_run(tmp_path / "a", keep=1.0, losses=[8, 7]))
    b = load_run(fake_run(tmp_path / "b", keep=0.5, losses=[8, 6], omit=True))
    assert differing_keys([a.config, b.config]) == ["tokens.keep_ratio", "neurons.rate"]  # not train.out_dir
    assert run_labels([a, b]) == ["tokens.keep_ratio=1.0, neurons.rate=0.0", "tokens.keep_ratio=0.5, neurons.rate=0.5"]
    assert run_labels([a]) == ["a"]
    assert len(a.train) == 2 and len(a.eval) == 2  # the line cut short by a kill is skipped


def test_figure_draws_loss_by_step_tokens_and_time_and_the_rates(tmp_path):
    a = load_run(fake_run(tmp_path / "a", keep=1.0, losses=[8, 7, 6]))
    b = load_run(fake_run(tmp_path / "b", keep=0.5, losses=[8.5, 7.5, 6.5, 5.5], omit=True))
    fig = figure([a, b])
    by_step, by_tokens, by_time, rates = fig.axes[:4]
    train_b, eval_b = by_step.lines[2], by_step.lines[3]  # per run: train line, eval line
    assert list(train_b.get_xdata()) == [1, 2, 3, 4] and list(train_b.get_ydata()) == [8.5, 7.5, 6.5, 5.5]
    assert list(eval_b.get_xdata()) == [0, 4]
    assert list(by_tokens.lines[2].get_xdata()) == [100, 200, 300, 400]
    assert list(by_time.lines[2].get_xdata()) == [0.5, 1.0, 1.5, 2.0]
    kept_a, kept_b, omit_b = rates.lines  # run a logged no omission rate
    assert set(kept_a.get_ydata()) == {1.0} and set(kept_b.get_ydata()) == {0.5}
    assert list(omit_b.get_ydata()) == [0.5, 0.5, 0.0, 0.0] and omit_b.get_linestyle() == "--"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["train.steps=3, tokens.keep_ratio=1.0, neurons.rate=0.0",
                          "train.steps=4, tokens.keep_ratio=0.5, neurons.rate=0.5"]


def test_plot_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "a", keep=1.0, losses=[8, 7])
    fake_run(runs / "b", keep=0.5, losses=[8, 6])
    out = tmp_path / "cmp.png"
    assert main(["plot", str(runs), "--out", str(out)]) == 0  # a directory of runs: both
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 runs" in capsys.readouterr().out
    assert main(["plot", str(runs / "a")]) == 0 and (runs / "a" / "metrics.png").is_file()  # one run: beside it
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def tb_scalars(tb_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for path in sorted(glob.glob(f"{tb_dir}/events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    number = value.simple_value if value.HasField("simple_value") else \
                        float(tensor_util.make_ndarray(value.tensor))
                    out.append((event.step, number))
    return out


def test_resumed_run_keeps_one_tensorboard_stream_and_counts_tokens_and_seconds_on(tmp_path, fast_overrides):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    sets = ("log.every=1", "log.tensorboard=true", "log.plot=true", "checkpoint.every=2", "eval.every=0")
    first = run_training(load_config(None, fast_overrides("train.steps=4", *sets)))
    assert first.step == 4 and (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    shutil.rmtree(run / "checkpoints" / "step-0000004")  # as if killed after step 4's records, before its save
    run_training(load_config(None, fast_overrides("train.steps=6", *sets)), resume=True)

    files = glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    assert len(files) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the lost part replaced, once each
    scalars = tb_scalars(str(run / "tb"), "train/loss")
    assert [s for s, _ in scalars] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    per_step = train[0]["tokens"]
    assert per_step > 0 and [r["tokens"] for r in train] == [per_step * r["step"] for r in train]
    seconds = [r["train_seconds"] for r in train]
    assert all(b > a for a, b in zip(seconds, seconds[1:], strict=False))  # continues across the resume
