"""Hostile and broken inputs to `centrifuge train` / `score-reference`: crafted run directories, corrupted files,
wrong types, out-of-range numbers. Each must end with exit status 2, exactly one error line that names what
to change, and a disk left byte for byte as it was (nothing written before the whole input is checked).

Most cases call the CLI's ``main`` in-process (it returns the exit status the process exits with); the ones
about what a process does (code execution, exit status of a real run) start real processes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from centrifuge.cli.main import main
from centrifuge.train import checkpoint as ckpt
from centrifuge.train.config import load_config
from centrifuge.train.loop import run_training

PREFIX = {"train": "centrifuge train: error: ", "score-reference": "centrifuge score-reference: error: "}


def snapshot(root) -> dict[str, object]:
    """Every directory, file (its bytes) and symlink (its target) under ``root``."""
    out: dict[str, object] = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(base, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                out[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[key] = "dir"
            else:
                with open(path, "rb") as f:
                    out[key] = f.read()
    return out


def refused(capsys, root, *argv: str) -> str:
    """Run ``centrifuge *argv`` in-process; assert exit 2, one error line, ``root`` unchanged. Returns the line."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return _one_error_line(err, argv[0]) if snapshot(root) == before else pytest.fail("the disk changed")


def _one_error_line(err: str, command: str) -> str:
    """The one error line of ``err``: the last line, the only one with the error prefix, no traceback.
    (Other stderr lines may be progress output of libraries, e.g. transformers' weight-loading bar.)"""
    errors = [line for line in err.splitlines() if PREFIX[command] in line]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ----------------------------------------------------------------------------------- config: types, ranges


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["train.eps=1e-300"], "train.eps must be at least"),  # rounds to 0 in float32: NaN weights
        (["train.weight_decay=.inf"], "train.weight_decay must be a finite number"),
        (["train.lr=.nan"], "train.lr must be a finite number"),
        (["train.max_grad_norm=.inf"], "train.max_grad_norm must be a finite number"),
        (["train.lr=1e4"], "train.weight_decay times train.lr"),
        (["tokens.keep_ratio=abc"], "tokens.keep_ratio: expected a number"),
        (["train.steps=[3]"], "train.steps: expected an integer"),
        (["neurons.rate=.inf"], "neurons.rate must be a finite number"),
        (["model.overrides={foo_bar: 3}"], "'foo_bar' is not a field of the 'tiny' preset"),
        (["model.overrides={num_hidden_layers: 0}"], "model.overrides: num_hidden_layers must be a positive"),
        (["model.overrides={hidden_size: 65}"], "model.overrides: "),
        (["tokens.attention=triton"], "tokens.attention='triton' needs a CUDA device"),
        (["model.liger=true"], "model.liger: Liger-Kernel's kernels run on CUDA only"),
        (["model.attn_implementation=kernels-community/flash-attn"], "Hub kernels ('org/repo') run downloaded"),
        (["tokens.reference_scores=scores"], "tokens.reference_scores is set but tokens.selector='random'"),
        (["tokens.selector=threshold", "tokens.reference_model=tiny"], "tokens.selector_params={tau:"),
        (["tokens.selector_params={nope: 1}"], "tokens.selector_params: selector 'random' takes"),
        (["tokens.schedule=linear", "tokens.schedule_params={nope: 1}"], "tokens.schedule_params:"),
        (["tokens.schedule=linear", "tokens.schedule_params={end: 1.5}"], "gives keep ratio 1.5 at step 2 of 2"),
    ],
)
def test_bad_config_values(tmp_path, fast_overrides, capsys, monkeypatch, extra, fragment):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides("train.steps=2", *extra)))
    assert fragment in err


def test_out_dir_that_is_a_file(tmp_path, fast_overrides, capsys):
    (tmp_path / "afile").write_text("x")
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(out_dir=str(tmp_path / "afile"))))
    assert "train.out_dir" in err and "is a file" in err
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(out_dir=str(tmp_path / "afile" / "run"))))
    assert "train.out_dir" in err and "a file" in err


def test_binary_file_named_txt(tmp_path, fast_overrides, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text("Some text to learn from. " * 200)
    (data / "image.txt").write_bytes(bytes(range(256)) * 40)
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(f"data.path={data}", "data.eval_fraction=0")))
    assert "image.txt is not UTF-8 text" in err and "data.path" in err


def _save_hf_model(directory, config) -> str:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    return str(directory)


def test_unsupported_model_with_token_filtering(tmp_path, fast_overrides, capsys):
    from transformers import GPT2Config

    gpt2 = _save_hf_model(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512,
                                                       n_positions=128, bos_token_id=0, eos_token_id=0))
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(f"model.path={gpt2}", "model.overrides={}")))
    assert "model_type 'gpt2'" in err and "tokens.keep_ratio=1.0" in err


def test_pickled_weights_are_never_loaded(tmp_path, fast_overrides, capsys):
    """A model directory whose weights are a pickle (pytorch_model.bin) is refused, not torch.load-ed."""
    from transformers import LlamaConfig

    model = _save_hf_model(tmp_path / "llama", LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=512))
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(model, name))
    (tmp_path / "llama" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(f"model.path={model}", "model.overrides={}")))
    assert "model.path" in err and "no .safetensors weights" in err


def test_score_reference_on_a_directory_that_is_no_model(tmp_path, fast_overrides, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "model.safetensors").write_bytes(b"")
    for model in ("notes", "empty-model"):
        err = refused(capsys, tmp_path, "score-reference", "--model", str(tmp_path / model), "--out",
                      str(tmp_path / "scores"), "--no-progress", "--device", "cpu", *sets(fast_overrides()))
        assert f"--model '{tmp_path / model}'" in err


def test_truncated_reference_score_shard(tmp_path, fast_overrides, capsys):
    corpus = tmp_path / "corpus.txt"  # small: scoring the whole built-in corpus would take most of the test
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox {i % 7} jumps over {i % 5} lazy dogs."
                                   for i in range(300)))
    data = ["data.txt_split=paragraph", f"data.path={corpus}"]
    scores = tmp_path / "scores"
    assert main(["score-reference", "--model", "tiny", "--out", str(scores), "--no-progress", "--device", "cpu",
                 "--shard-size", "8", *sets(fast_overrides(*data))]) == 0
    shards = sorted(name for name in os.listdir(scores) if name.endswith(".safetensors"))
    last = scores / shards[-1]  # the last shard: training would reach it only after some steps
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    err = refused(capsys, tmp_path, "train", *sets(fast_overrides(
        *data, "tokens.selector=excess_loss", f"tokens.reference_scores={scores}", "train.steps=2")))
    assert "tokens.reference_scores" in err and shards[-1] in err


# ------------------------------------------------------------------------------- crafted run directories


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_cache, fast_items) -> str:
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied, never changed, by each test)."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    run_training(load_config(None, [*fast_items, f"train.out_dir={run_dir}", f"data.cache_dir={tokenizer_cache}",
                                    "train.steps=2", "checkpoint.every=1", "eval.every=0"]))
    return run_dir


def _copy_run(finished_run, tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run, run_dir, symlinks=True)
    return run_dir


def _edit_state(run_dir, edit) -> None:
    path = os.path.join(ckpt.latest_checkpoint(run_dir), ckpt.STATE_FILE)
    with open(path) as f:
        state = json.load(f)
    edit(state)
    with open(path, "w") as f:
        json.dump(state, f)


def _set(path, value):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _overwrite_weights(run_dir):
    path = os.path.join(ckpt.latest_checkpoint(run_dir), ckpt.MODEL_FILE)
    with open(path, "r+b") as f:  # 4 KB of 0xFF at the same size: only the content hash can tell
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 4096)


def _nan_weights(run_dir):
    """Weights with a NaN, their size and hash in state.json updated (as an older version could have saved)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckpt.latest_checkpoint(run_dir), ckpt.MODEL_FILE)
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        entry = {"size": os.path.getsize(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
    _edit_state(run_dir, _set(["files", ckpt.MODEL_FILE], entry))
    assert not torch.isfinite(load_file(path)[name]).all()


def _tokenizer_subdir(run_dir):
    os.makedirs(os.path.join(run_dir, "tokenizer", "extra"))


def _tokenizer_symlink(run_dir):
    secret = os.path.join(os.path.dirname(run_dir), "secret.txt")
    with open(secret, "w") as f:
        f.write("not for checkpoints")
    os.symlink(secret, os.path.join(run_dir, "tokenizer", "notes.txt"))


def _drop_listed_file(run_dir):
    def edit(state):
        state["files"]["../../tokenizer/tokenizer.json"] = state["files"].pop(ckpt.RNG_FILE)

    _edit_state(run_dir, edit)


@pytest.mark.parametrize(
    ("tamper", "fragment"),
    [
        (lambda d: _edit_state(d, _set(["step"], "abc")), "'step' must be an integer"),
        (lambda d: _edit_state(d, _set(["step"], -1)), "'step' must be an integer"),
        (lambda d: _edit_state(d, _set(["world_size"], "2")), "'world_size' must be an integer"),
        (lambda d: _edit_state(d, _set(["files"], [])), "'files' must map"),
        (_drop_listed_file, "may only name files inside the checkpoint"),
        (lambda d: _edit_state(d, _set(["sampler", "offset"], "x")), "data position is malformed"),
        (lambda d: _edit_state(d, _set(["python_rng"], [3, [1, 2], None])), "python_rng / numpy_rng"),
        (lambda d: _edit_state(d, _set(["scheduler", "base_lrs"], ["x"])), "scheduler 'base_lrs'"),
        (lambda d: _edit_state(d, _set(["scheduler", "optimizer"], {})), "scheduler state has keys"),
        (lambda d: _edit_state(d, _set(["optimizer_groups", 0, "lr"], "fast")), "optimizer group 'lr'"),
        (lambda d: _edit_state(d, _set(["config", "train", "lr"], "fast")), "train.lr: expected a number"),
        (_overwrite_weights, "model.safetensors does not match the sha256"),
        (_nan_weights, "holds NaN or inf weights"),
        (_tokenizer_subdir, "holds extra, which is not a plain file"),
        (_tokenizer_symlink, "holds notes.txt, which is a symbolic link"),
    ],
)
def test_crafted_run_directory(finished_run, tmp_path, capsys, tamper, fragment):
    run_dir = _copy_run(finished_run, tmp_path)
    tamper(run_dir)
    err = refused(capsys, tmp_path, "train", "--resume", "--set", f"train.out_dir={run_dir}",
                  "--set", "train.steps=4")
    assert fragment in err


def _evil_model(directory) -> str:
    """A model directory whose config asks for remote code: importing its module writes a marker file."""
    os.makedirs(directory)
    marker = os.path.join(directory, "CODE-RAN")
    with open(os.path.join(directory, "configuration_evil.py"), "w") as f:
        f.write("import pathlib\n"
                f"pathlib.Path({marker!r}).write_text('ran')\n"
                "from transformers import LlamaConfig\n"
                "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 512}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return marker


@pytest.mark.parametrize("trust", [True, False])
def test_resume_from_a_crafted_run_runs_no_code(finished_run, tmp_path, cli, trust):
    """state.json naming a directory with `auto_map` (and trust_remote_code) must not run its code on --resume
    without a CONFIG file: a real process, exit 2, one line naming the key, nothing written, no marker."""
    run_dir = _copy_run(finished_run, tmp_path)
    evil = str(tmp_path / "evil")
    marker = _evil_model(evil)

    def edit(state):
        state["config"]["model"].update(path=evil, trust_remote_code=trust, overrides={})

    _edit_state(run_dir, edit)
    before = snapshot(tmp_path)
    done = cli("train", "--resume", "--set", f"train.out_dir={run_dir}", "--set", "train.steps=4")
    assert not os.path.exists(marker), "the run directory made centrifuge run code"
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, "train")
    assert "model.trust_remote_code" in done.stderr if trust else "model.path" in done.stderr
    assert snapshot(tmp_path) == before
    assert "--set model.path=" in done.stderr if trust else True


def test_remote_code_needs_its_path_on_the_command_line(finished_run, tmp_path, capsys):
    """--set model.trust_remote_code=true on a resume without CONFIG must not apply to the saved model.path."""
    run_dir = _copy_run(finished_run, tmp_path)
    err = refused(capsys, tmp_path, "train", "--resume", "--set", f"train.out_dir={run_dir}",
                  "--set", "model.trust_remote_code=true")
    assert "re-state --set model.path=..." in err


def test_resume_banner_and_schedule_note(finished_run, tmp_path, capsys):
    """Extending a finished run's steps recomputes the cosine: the resumed run says how the lr moves."""
    run_dir = _copy_run(finished_run, tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", "--set", f"train.out_dir={run_dir}", "--set", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "remote code: off (model.trust_remote_code" in out
    assert "learning-rate schedule: recomputed" in out and "step 2 ran at lr" in out and "step 3 runs at" in out

