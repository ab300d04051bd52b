"""``examples/`` run as shipped, at toy size, and the README quotes them verbatim.

Python examples run in-process (``runpy``) exactly as a user runs ``python examples/X.py``; the shell recipes
run through bash with toy-size ``--set`` arguments, which they pass on to every command. Each test checks what
the example claims (kept counts, the loss over kept tokens, the omission ladder, adapter-only gradients, the
runs and plots written), not only that it ran.
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
import yaml

import centrifuge
from readme_blocks import EXAMPLES, README, ROOT, run_example_script

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
MARKED = re.compile(r"<!-- (example|snippet): ([\w./-]+) -->\s*```(\w+)\n(.*?)```", re.S)


def readme_region(path: Path) -> str:
    """What the README quotes of an example: its ``# --- readme: NAME ---`` region, else the whole file."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"# --- readme: [\w-]+ ---\n(.*?)# --- /readme ---\n", text, re.S)
    return match.group(1) if match else text


def test_every_readme_python_block_is_run_by_a_test_and_examples_are_quoted_verbatim():
    text = README.read_text(encoding="utf-8")
    marked = MARKED.findall(text)
    covered = {body for _, _, _, body in marked}
    untested = [body.splitlines()[0] for lang, body in BLOCK.findall(text) if lang == "python" and body not in covered]
    assert not untested, f"README python blocks that no test runs: {untested}"
    quoted = {name for kind, name, _, _ in marked if kind == "example"}
    assert {"examples/token_filtering.py", "examples/rho1.sh", "examples/trainer.py", "examples/lora.py"} <= quoted
    for kind, name, _, body in marked:
        if kind == "example":
            assert body == readme_region(ROOT / name), f"the README's copy of {name} differs from the file"


def run_example(name: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # examples that write, write under runs/ of the working directory
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_token_filtering_example(tmp_path, monkeypatch):
    g = run_example("token_filtering.py", tmp_path, monkeypatch)
    model, ids, keep, out, picked = g["model"], g["ids"], g["keep"], g["out"], g["picked"]
    assert centrifuge.patch_mode(model) is None  # reverted
    kept = keep[:, :-1]  # keep[b, t] predicts labels[b, t + 1]; the last position has no target
    assert int(out.num_counted) == int(kept.sum()) and int(out.num_labelled) == kept.numel()
    with torch.no_grad():  # the loss is the mean cross-entropy over the kept tokens (same weights: no step)
        logits = model(input_ids=ids).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert out.loss.item() == pytest.approx(ce[kept].mean().item(), rel=1e-5)
    assert int(picked.num_counted) == round(0.5 * int(picked.num_labelled))


def test_neuron_omission_example(tmp_path, monkeypatch, capsys):
    from centrifuge import neurons

    g = run_example("neuron_omission.py", tmp_path, monkeypatch)
    lines = re.findall(r"step (\d): omission rate ([\d.]+), loss ([\d.]+)", capsys.readouterr().out)
    assert [float(r) for _, r, _ in lines] == [0.5, 0.5, 0.5, 0.5, 0.375, 0.25, 0.125, 0.0]  # LORS ends dense
    assert float(lines[-1][2]) < float(lines[0][2])
    assert neurons.omitter_of(g["model"]) is None


def test_trainer_example(tmp_path, monkeypatch):
    from centrifuge import neurons

    g = run_example("trainer.py", tmp_path, monkeypatch)
    trainer, filtering = g["trainer"], g["filtering"]
    assert trainer.state.global_step == 4
    assert filtering.keep_ratio == 1.0 and filtering.num_counted == filtering.num_labelled  # linear 0.5 -> 1.0
    assert neurons.omitter_of(g["model"]) is not None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [trainer.state.log_history[-1]
                                                                                ["train_loss"]]
    assert all(0 < float(v) < 10 for v in losses)


def test_sft_trainer_example(tmp_path, monkeypatch):
    g = run_example("sft_trainer.py", tmp_path, monkeypatch)
    filtering = g["filtering"]
    assert g["trainer"].state.global_step == 4
    assert 0 < filtering.num_counted < filtering.num_labelled  # half of the completion tokens
    completion = sum(len(row["completion"].split()) for row in g["pairs"])
    assert filtering.num_labelled < completion  # labelled = one step's completion tokens, no prompt token


def test_lora_example(tmp_path, monkeypatch):
    g = run_example("lora.py", tmp_path, monkeypatch)
    model = g["model"]
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad and all("lora_" in n for n in with_grad)


def test_make_corpus_writes_a_clean_half_and_a_noisy_whole(tmp_path):
    g = runpy.run_path(str(EXAMPLES / "make_corpus.py"))
    counts = g["write_pair"](str(tmp_path), seed=0)

    def texts(name):
        return [json.loads(line)["text"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    clean, noisy = texts("clean"), texts("noisy")
    assert len(noisy) == counts["noisy"] and len(clean) == counts["clean"] == counts["noisy"] - counts["corrupted"]
    assert set(clean) < set(noisy) and len(set(noisy) - set(clean)) == counts["corrupted"] > 0.4 * len(noisy)


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_rho1_script(tmp_path):
    out = run_example_script("rho1.sh", tmp_path)
    runs = tmp_path / "runs" / "rho1"
    manifest = json.loads((runs / "scores" / "manifest.json").read_text())
    assert manifest and (runs / "compare.png").read_bytes()[:4] == b"\x89PNG"
    filtered, dense = train_records(runs / "excess_loss"), train_records(runs / "dense")
    assert filtered[-1]["counted_fraction"] == pytest.approx(0.6, abs=0.01)  # the top 60% of each batch
    assert dense[-1]["counted_fraction"] == 1.0
    assert "excess_loss selection" in out.stdout and "tokenizer: 512 tokens, from runs/rho1/reference" in out.stdout
    assert "\r" not in out.stdout + out.stderr  # output is not a terminal: no progress-bar debris


def test_compare_script(compare_workspace):
    workdir, _ = compare_workspace
    root = workdir / "runs" / "compare"
    assert (root / "compare.png").read_bytes()[:4] == b"\x89PNG"
    configs = {name: yaml.safe_load((root / name / "config.yaml").read_text())
               for name in ("dense", "token_filtering", "neuron_omission", "both")}
    assert [(c["tokens"]["keep_ratio"], c["neurons"]["rate"]) for c in configs.values()] == [
        (1.0, 0.0), (0.5, 0.0), (1.0, 0.5), (0.5, 0.5)]
    assert train_records(root / "both")[-1]["counted_fraction"] == pytest.approx(0.5, abs=0.01)
    assert "omit" in train_records(root / "neuron_omission")[-1]
