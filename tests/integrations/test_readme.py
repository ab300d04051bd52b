"""The README's Trainer / SFTTrainer / PEFT snippets run as written, on tiny models."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from integration_helpers import VOCAB, PackedRows, prompt_completion_data, tiny_model, word_tokenizer

import centrifuge
from centrifuge import neurons
from centrifuge.integrations import token_filtering_of

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(heading: str) -> str:
    """The first fenced python block under ``heading`` (before the next heading)."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    section = re.split(r"\n#{1,3} ", text[start + len(heading) + 2:], maxsplit=1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def moved(before: dict, model) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_trainer_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(dtype=torch.float32)
    before = params_of(model)
    scope = {"model": model, "data": PackedRows(8)}
    exec(snippet("### Trainer"), scope)
    trainer = scope["trainer"]
    assert token_filtering_of(trainer).keep_ratio == 1.0  # the linear schedule reached its end
    assert neurons.omitter_of(model) is not None and trainer.state.global_step == trainer.state.max_steps > 1
    assert moved(before, model)


def test_sft_trainer_snippet(tmp_path, monkeypatch):
    import trl

    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():  # SFTConfig defaults to bf16, which the Trainer refuses without a GPU
        monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, use_cpu=True, bf16=False))
    model = tiny_model(dtype=torch.float32, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    before = params_of(model)
    scope = {"model": model, "pairs": prompt_completion_data(8, seed=7), "tokenizer": word_tokenizer()}
    exec(snippet("### TRL SFTTrainer"), scope)
    handle = token_filtering_of(scope["trainer"])
    assert 0 < handle.num_counted < handle.num_labelled and moved(before, model)


def test_peft_snippet():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    keep = torch.rand(2, 11, generator=gen) < 0.5
    scope = {"model": tiny_model(), "ids": ids, "labels": ids, "keep": keep}
    exec(snippet("### PEFT (LoRA)"), scope)
    model = scope["model"]
    assert centrifuge.patch_mode(model) == "fast"
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad} and grads
    assert all("lora_" in n for n in grads)

