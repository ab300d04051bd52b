"""TRL SFTTrainer with padding-free packing (``SFTConfig(packing=True)``: one flattened row per batch with
position ids restarting per document, ``cu_seq_lens_q/k``, ``seq_idx``) and token filtering: it trains, and the
update equals the library's own train_step on the same batches (documents kept apart in both)."""

from __future__ import annotations

import pytest
from integration_helpers import Recorder, max_rel_err, prompt_completion_data, sft_config, tiny_model, word_tokenizer
from test_liger import restore_llama_module  # noqa: F401 (a fixture)
from test_trainer import EXACT, reference_run

import centrifuge
from centrifuge.integrations import enable_token_filtering
from centrifuge.tokens import selectors


@pytest.mark.parametrize("liger", [False, True])
def test_sft_trainer_padding_free_packing(tmp_path, liger, restore_llama_module):  # noqa: F811
    """With ``use_liger_kernel=True`` too (Liger's RMSNorm upcasts to float32 where the tiny model's own norm
    stays in float64: a looser tolerance)."""
    from trl import SFTTrainer

    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    recorder = Recorder()
    args = sft_config(tmp_path, max_length=32, bf16=False, packing=True, disable_tqdm=True, use_liger_kernel=liger)
    trainer = SFTTrainer(model=tiny_model(**special), args=args, train_dataset=prompt_completion_data(16, seed=3),
                         processing_class=word_tokenizer(), callbacks=[recorder])
    handle = enable_token_filtering(trainer, selector="random", keep_ratio=0.5)
    recorder.handle = handle
    recorder.wrap(trainer)
    trainer.train()
    assert centrifuge.patch_mode(trainer.model) == "fast"

    first = recorder.batches[0][0]
    assert first["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in first and "seq_idx" in first
    assert int((first["position_ids"] == 0).sum()) > 1  # several documents in the row
    for counted, labelled, _ in recorder.counts:
        assert 0 < counted < labelled
    grads, params = reference_run(recorder.batches, selector=selectors.random(0.5), total_steps=2,
                                  model=tiny_model(**special))
    tol = 1e-5 if liger else EXACT
    for step in range(2):
        assert max_rel_err(recorder.grads[step], grads[step]) < tol, step
        assert max_rel_err(recorder.params[step], params[step]) < tol, step
