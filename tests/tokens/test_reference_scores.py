"""Reference per-token losses: online scoring, offline shards + manifest, resume, and every refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from token_models import VOCAB, tiny_model

from centrifuge.cli.main import main as cli_main
from centrifuge.ops.cross_entropy import IGNORE_INDEX, _liger_available, shift_labels, token_loss_no_grad
from centrifuge.tokens.reference import (
    MANIFEST,
    OnlineReference,
    ReferenceScores,
    ReferenceScoresError,
    dataset_fingerprint,
    reference_token_losses,
    tokenizer_hash,
    write_reference_scores,
)
from centrifuge.train.data import TokenizedDocument, pack_documents

TOK = "tok-hash-a"


def packed(seed: int = 0, *, seq_len: int = 16, docs: int = 20):
    """A small packed dataset of random documents (lengths 3..20, some cut across rows)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        ids = np.append(rng.integers(1, VOCAB, int(rng.integers(3, 21))), 0).astype(np.int64)
        out.append(TokenizedDocument(ids, np.ones(len(ids), bool), True))
    return pack_documents(out, seq_len, pad_id=0)


@pytest.fixture(scope="module")
def ref_model():
    return tiny_model("llama", dtype=torch.float32, seed=3)


@pytest.fixture(scope="module")
def data():
    return packed()


def write(ref_model, data, out, **kw):
    kw.setdefault("tokenizer_hash", TOK)
    kw.setdefault("model_id", "tiny-ref")
    kw.setdefault("shard_size", 3)
    kw.setdefault("batch_size", 2)
    kw.setdefault("progress", False)
    return write_reference_scores(OnlineReference(ref_model), data, str(out), **kw)


# ------------------------------------------------------------------------------------------------ online


def test_online_losses_equal_full_logits_cross_entropy(ref_model, data):
    batch = data.batch([0, 1, 2])
    got = OnlineReference(ref_model)(batch)
    assert got.shape == (3, data.seq_len) and got.dtype == torch.float32 and not got.requires_grad
    with torch.no_grad():
        logits = ref_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = shift_labels(batch["labels"])
    want = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(got)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got[targets == IGNORE_INDEX] == 0).all()


def test_packed_documents_do_not_see_each_other(ref_model):
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randint(1, VOCAB, (1, 6), generator=gen), torch.randint(1, VOCAB, (1, 9), generator=gen)
    ids = torch.cat([a, c], 1)
    pos = torch.cat([torch.arange(6), torch.arange(9)])[None]
    labels = ids.clone()
    labels[0, 6] = IGNORE_INDEX
    together = reference_token_losses(ref_model, input_ids=ids, labels=labels, position_ids=pos)
    alone = reference_token_losses(ref_model, input_ids=c, labels=c)
    assert torch.allclose(together[0, 6:], alone[0], atol=1e-5)


def test_reference_with_another_vocabulary_is_refused(ref_model):
    ids = torch.full((1, 4), VOCAB + 5)
    with pytest.raises(ValueError, match="outside the reference model's vocabulary"):
        reference_token_losses(ref_model, input_ids=ids)


# --------------------------------------------------------------------------------------------- offline


def test_offline_round_trip_equals_online(ref_model, data, tmp_path):
    manifest = write(ref_model, data, tmp_path)
    assert manifest["complete"] and manifest["num_sequences"] == len(data) and manifest["seq_len"] == 16
    assert len(manifest["shards"]) == (len(data) + 2) // 3
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk["dataset_fingerprint"] == dataset_fingerprint(data) and on_disk["tokenizer_hash"] == TOK
    assert all(s["sha256"] for s in on_disk["shards"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files left
    scores = ReferenceScores(str(tmp_path), dataset=data, tokenizer_hash=TOK)
    assert len(scores) == len(data)
    idx = [len(data) - 1, 0, 4, 4, 2]  # any order, repeats, across shards
    online = OnlineReference(ref_model)(data.batch(idx))
    assert torch.allclose(scores.for_batch(idx), online, rtol=0, atol=1e-6)
    assert torch.allclose(scores.for_batch(torch.tensor(idx)), online, rtol=0, atol=1e-6)


def test_half_precision_storage(ref_model, data, tmp_path):
    write(ref_model, data, tmp_path, dtype=torch.bfloat16, shard_size=100)
    got = ReferenceScores(str(tmp_path), dataset=data).for_batch([1, 3])
    want = OnlineReference(ref_model)(data.batch([1, 3]))
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-2, atol=1e-2)


class Interrupt(Exception):
    pass


class CountingReference(OnlineReference):
    def __init__(self, model, fail_after: int | None = None):
        super().__init__(model, model_id="tiny-ref")
        self.rows: list[int] = []
        self.fail_after = fail_after

    def __call__(self, batch):
        if self.fail_after is not None and len(self.rows) >= self.fail_after:
            raise Interrupt
        self.rows += [int(r) for r in range(batch["input_ids"].shape[0])]
        return super().__call__(batch)


def test_resume_skips_finished_shards(ref_model, data, tmp_path):
    kw = dict(tokenizer_hash=TOK, shard_size=3, batch_size=2, progress=False)
    first = CountingReference(ref_model, fail_after=7)  # dies inside the third shard
    with pytest.raises(Interrupt):
        write_reference_scores(first, data, str(tmp_path), **kw)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert not manifest["complete"] and [bool(s["sha256"]) for s in manifest["shards"][:3]] == [T, T, False]
    with pytest.raises(ReferenceScoresError, match="did not finish.*2 of"):
        ReferenceScores(str(tmp_path))
    finished = {n: os.stat(tmp_path / n).st_mtime_ns for n in ("shard-00000.safetensors", "shard-00001.safetensors")}

    second = CountingReference(ref_model)
    write_reference_scores(second, data, str(tmp_path), **kw)
    assert len(second.rows) == len(data) - 6  # only the unfinished shards were scored
    for name, mtime in finished.items():
        assert os.stat(tmp_path / name).st_mtime_ns == mtime
    scores = ReferenceScores(str(tmp_path), dataset=data, tokenizer_hash=TOK)
    idx = list(range(len(data)))
    assert torch.allclose(scores.for_batch(idx), OnlineReference(ref_model)(data.batch(idx)), atol=1e-6)

    # a finished job is not redone; a damaged shard is recomputed on the next run
    third = CountingReference(ref_model)
    write_reference_scores(third, data, str(tmp_path), **kw)
    assert third.rows == []
    with open(tmp_path / "shard-00001.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\x7f")
    fourth = CountingReference(ref_model)
    write_reference_scores(fourth, data, str(tmp_path), **kw)
    assert len(fourth.rows) == 3


T = True


def test_out_dir_of_another_job_is_refused(ref_model, data, tmp_path):
    write(ref_model, data, tmp_path)
    with pytest.raises(ReferenceScoresError, match="another job.*model_id"):
        write(ref_model, data, tmp_path, model_id="other-ref")
    with pytest.raises(ReferenceScoresError, match="another job.*dataset_fingerprint"):
        write(ref_model, packed(seed=1), tmp_path)


@pytest.fixture(scope="module")
def scored(ref_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores")
    write(ref_model, data, out)
    return out


def test_mismatched_data_is_refused(scored, data):
    other = packed(seed=0)
    other.input_ids[2, 5] = (other.input_ids[2, 5] + 1) % VOCAB  # one token differs
    with pytest.raises(ReferenceScoresError, match="dataset fingerprint") as err:
        ReferenceScores(str(scored), dataset=other, tokenizer_hash=TOK)
    assert "sequence length:" not in str(err.value) and "tokenizer:" not in str(err.value)
    with pytest.raises(ReferenceScoresError, match="sequence length: scores 16, data 24"):
        ReferenceScores(str(scored), dataset=packed(seq_len=24), tokenizer_hash=TOK)
    with pytest.raises(ReferenceScoresError, match="tokenizer: scores") as err:
        ReferenceScores(str(scored), dataset=data, tokenizer_hash="tok-hash-b")
    assert "fingerprint:" not in str(err.value)
    with pytest.raises(ReferenceScoresError, match="sequence length.*tokenizer"):  # all problems in one error
        ReferenceScores(str(scored), seq_len=8, tokenizer_hash="x")
    ReferenceScores(str(scored), dataset=data, tokenizer_hash=TOK)  # the matching data is accepted


def test_missing_corrupt_shards_and_bad_indices(scored, data, tmp_path):
    import shutil

    scores = ReferenceScores(str(scored), dataset=data)
    with pytest.raises(ReferenceScoresError, match=f"sequence index {len(data)} is out of range"):
        scores.for_batch([0, len(data)])
    with pytest.raises(ReferenceScoresError, match="index -1 is out of range"):
        scores.for_batch([-1])

    copy = tmp_path / "copy"
    shutil.copytree(scored, copy)
    os.unlink(copy / "shard-00001.safetensors")
    scores = ReferenceScores(str(copy), dataset=data)
    scores.for_batch([0, 1, 2])  # shard 0 is fine
    with pytest.raises(ReferenceScoresError, match="shard-00001.safetensors is missing"):
        scores.for_batch([3])

    with open(copy / "shard-00000.safetensors", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ReferenceScoresError, match="shard-00000.safetensors is corrupt"):
        ReferenceScores(str(copy)).for_batch([0])
    with open(copy / "shard-00002.safetensors", "r+b") as f:  # same size, other bytes: sha256 catches it
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ReferenceScoresError, match="shard-00002.safetensors is corrupt.*sha256"):
        ReferenceScores(str(copy)).for_batch([6])

    with pytest.raises(ReferenceScoresError, match="manifest.json is missing"):
        ReferenceScores(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ReferenceScoresError, match="not JSON"):
        ReferenceScores(str(tmp_path))


def test_no_pickle_anywhere(scored):
    for name in os.listdir(scored):
        assert name == MANIFEST or name.endswith(".safetensors")


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_hash_survives_save_and_reload(tmp_path):
    from pydoc_data import topics

    from centrifuge.train.tokenizer import load_tokenizer, train_bpe

    texts = [topics.topics[k] for k in sorted(topics.topics)[:20]]
    tok = train_bpe(texts, 300)
    tok.save(str(tmp_path / "tok"))
    assert tokenizer_hash(load_tokenizer(str(tmp_path / "tok"))) == tokenizer_hash(tok)
    assert tokenizer_hash(str(tmp_path / "tok")) == tokenizer_hash(tok)
    assert tokenizer_hash(train_bpe(texts, 320)) != tokenizer_hash(tok)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_scores_the_training_split(tmp_path, capsys):
    from centrifuge.train.config import load_config
    from centrifuge.train.data import build_datasets, read_documents, split_documents
    from centrifuge.train.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "loss", "model", "data", "select", "train"]
    paragraphs = [" ".join(rng.choice(words, int(rng.integers(8, 30)))) for _ in range(30)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    out = tmp_path / "scores"
    sets = ["--set", "data.txt_split=paragraph", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "model.overrides={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, "
                     "num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 320}"]
    argv = ["score-reference", "--model", "tiny", "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32",
            "--out", str(out), "--batch", "4", "--shard-size", "8", "--no-progress", "--eval-fraction", "0.2",
            *sets]
    # the reference preset's vocabulary (4096) covers the trained 320-token BPE
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "scored" in printed and "tokens.reference_scores" in printed
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["seq_len"] == 32

    # training builds the same split with the same config and finds the scores matching
    config = load_config(None, ["data.txt_split=paragraph", f"data.cache_dir={tmp_path / 'cache'}",
                                f"data.path={tmp_path / 'corpus.txt'}", "data.seq_len=32",
                                "data.eval_fraction=0.2"])
    docs, source = read_documents(config.data)
    train_docs, eval_docs = split_documents(docs, 0.2, seed=0)
    cache = [p for p in (tmp_path / "cache" / "tokenizers").iterdir() if p.suffix == ".json"]
    tokenizer = load_tokenizer(str(cache[0]))
    datasets = build_datasets(train_docs, eval_docs, tokenizer, seq_len=32, source=source)
    scores = ReferenceScores(str(out), dataset=datasets.train, tokenizer=tokenizer)
    assert scores.for_batch([0, len(scores) - 1]).shape == (2, 32)

    # running it again does nothing; another seq_len in the same --out is refused
    assert cli_main(argv) == 0
    assert cli_main([*argv[:5], "--seq-len", "24", *argv[7:]]) == 2
    assert "another job" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- fused path


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _liger_available()), reason="needs CUDA and liger-kernel")
def test_liger_path_matches_chunked():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=gen).cuda().bfloat16()
    w = torch.randn(1000, 64, generator=gen).cuda().bfloat16()
    y = torch.randint(0, 1000, (300,), generator=gen).cuda()
    y[::7] = IGNORE_INDEX
    fused = token_loss_no_grad(h, w, y, backend="liger")
    chunked = token_loss_no_grad(h, w, y, backend="chunked", chunk_size=64)
    assert torch.allclose(fused, chunked, rtol=2e-2, atol=2e-2)
    assert (fused[::7] == 0).all()


def test_no_grad_loss_backends_on_cpu():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=gen, requires_grad=True), torch.randn(20, 8, generator=gen)
    y = torch.randint(0, 20, (10,), generator=gen)
    y[3] = IGNORE_INDEX
    loss = token_loss_no_grad(h, w, y, chunk_size=4)
    assert not loss.requires_grad and loss[3] == 0
    assert torch.allclose(loss, F.cross_entropy(h.detach() @ w.T, y, reduction="none", ignore_index=-100))
    with pytest.raises(ValueError, match="unknown loss backend"):
        token_loss_no_grad(h, w, y, backend="triton")
