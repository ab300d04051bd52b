"""Token cache: rows memory-mapped from a tokenize-once cache equal the in-memory packing, field by field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from centrifuge.tokens.reference import dataset_fingerprint
from centrifuge.train.config import load_config
from centrifuge.train.data import (
    BATCH_KEYS,
    Document,
    build_datasets,
    pack_documents,
    sft_document,
    text_document,
    tokenize_documents,
)
from centrifuge.train.errors import DataError
from centrifuge.train.loop import run_training
from centrifuge.train.token_cache import CachedPackedSequences, TokenCache, build_token_cache, cached_packing
from centrifuge.train.tokenizer import train_bpe

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([" ".join(WORDS)] * 4, 300)


def documents(seed: int = 0, n: int = 40) -> list[Document]:
    """Plain documents of 0..60 words and SFT pairs, some longer than a row (truncated), some short."""
    rng = np.random.default_rng(seed)
    docs: list[Document] = []
    for i in range(n):
        words = " ".join(rng.choice(list(WORDS), int(rng.integers(0, 60))))
        if i % 5 == 3:
            docs.append(sft_document(f"Q: {words[: int(rng.integers(0, 80))]}", f" A: {words}"))
        else:
            docs.append(text_document(words))
    return docs


@pytest.mark.parametrize("plain", [False, True], ids=["with-sft", "plain-text"])
@pytest.mark.parametrize("seq_len", [4, 16, 37, 128])
def test_cached_rows_equal_in_memory_packing(tmp_path, tokenizer, seq_len, plain):
    docs = documents()
    if plain:  # every document splittable: the contiguous fast path
        docs = [text_document(d.text) for d in docs]
    want = pack_documents(tokenize_documents(docs, tokenizer), seq_len, pad_id=tokenizer.eos_id)
    got = cached_packing(docs, tokenizer, seq_len, str(tmp_path))
    assert isinstance(got, CachedPackedSequences) and (got._doc_start is not None) == plain
    assert len(got) == len(want) and got.shape == tuple(want.input_ids.shape) and got.seq_len == seq_len
    assert got.num_truncated == want.num_truncated and got.num_documents == want.num_documents
    assert want.num_truncated > 0 or seq_len == 128 or plain  # the SFT truncation rule is exercised
    assert (want.attention_mask == 0).any() or seq_len == 4  # so is padding
    everything = got.batch(torch.arange(len(got)))
    for key in BATCH_KEYS:
        assert everything[key].dtype == torch.int64
        assert torch.equal(everything[key], getattr(want, key)), key
    order = np.random.default_rng(1).permutation(len(want))[:7].tolist()  # any order, repeats allowed
    order += order[:2]
    for key, value in got.batch(order).items():
        assert torch.equal(value, want.batch(order)[key]), key
    assert got.num_label_tokens() == want.num_label_tokens()
    assert dataset_fingerprint(got) == dataset_fingerprint(want)  # reference scores fit either path


def test_cache_is_reused_keyed_and_rebuilt_when_damaged(tmp_path, tokenizer):
    docs = documents()
    entry, hit = build_token_cache(docs, tokenizer, str(tmp_path))
    assert not hit and os.path.isfile(os.path.join(entry, "meta.json"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no debris
    again, hit = build_token_cache(docs, tokenizer, str(tmp_path))
    assert hit and again == entry
    other, _ = build_token_cache(documents(seed=1), tokenizer, str(tmp_path))
    assert other != entry  # other text: another entry
    other_tok, _ = build_token_cache(docs, train_bpe([" ".join(reversed(WORDS))] * 3, 290), str(tmp_path))
    assert other_tok not in (entry, other)  # another tokenizer: another entry
    flipped = [Document(d.segments, splittable=not d.splittable) for d in docs]
    assert build_token_cache(flipped, tokenizer, str(tmp_path))[0] not in (entry, other, other_tok)

    with open(os.path.join(entry, "ids.bin"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(entry, "ids.bin")) - 2)
    with pytest.raises(DataError, match="ids.bin has"):
        TokenCache(entry)
    rebuilt, hit = build_token_cache(docs, tokenizer, str(tmp_path))
    assert rebuilt == entry and not hit
    want = pack_documents(tokenize_documents(docs, tokenizer), 16, pad_id=tokenizer.eos_id)
    assert torch.equal(CachedPackedSequences(TokenCache(entry), 16, pad_id=0).batch([0, 1])["input_ids"],
                       want.input_ids[:2])  # fmt: skip


def test_bad_meta_is_refused(tmp_path, tokenizer):
    entry, _ = build_token_cache(documents(), tokenizer, str(tmp_path))
    meta_path = os.path.join(entry, "meta.json")
    meta = json.loads(Path(meta_path).read_text())
    with open(meta_path, "w") as f:
        json.dump({**meta, "id_dtype": "object"}, f)  # nothing read from the cache may run code
    with pytest.raises(DataError, match="unexpected id dtype"):
        TokenCache(entry)
    with open(meta_path, "w") as f:
        json.dump({**meta, "num_tokens": meta["num_tokens"] + 1}, f)
    with pytest.raises(DataError):
        TokenCache(entry)


def test_fingerprint_and_label_count_are_remembered_per_seq_len(tmp_path, tokenizer):
    docs = documents()
    a = cached_packing(docs, tokenizer, 16, str(tmp_path))
    first = a.dataset_fingerprint()
    stored = json.loads((Path(a.cache.entry) / "fingerprints.json").read_text())
    assert stored == {f"16:{tokenizer.eos_id}": {"fingerprint": first}}
    labels = a.num_label_tokens()
    stored = json.loads((Path(a.cache.entry) / "fingerprints.json").read_text())
    assert stored == {f"16:{tokenizer.eos_id}": {"fingerprint": first, "label_tokens": labels}}
    b = cached_packing(docs, tokenizer, 17, str(tmp_path))
    assert b.dataset_fingerprint() != first
    assert len(json.loads((Path(a.cache.entry) / "fingerprints.json").read_text())) == 2
    # a fresh object reads the stored numbers back (a wrong stored count shows that it does not recompute)
    (Path(a.cache.entry) / "fingerprints.json").write_text(json.dumps({f"16:{tokenizer.eos_id}": {
        "fingerprint": "f" * 64, "label_tokens": labels + 5}}))  # fmt: skip
    again = cached_packing(docs, tokenizer, 16, str(tmp_path))
    assert again.dataset_fingerprint() == "f" * 64 and again.num_label_tokens() == labels + 5


def test_build_datasets_hook(tmp_path, tokenizer):
    train, evals = documents(0), documents(2, n=6)
    plain = build_datasets(train, evals, tokenizer, seq_len=32, source="x")
    cached = build_datasets(train, evals, tokenizer, seq_len=32, source="x", token_cache=str(tmp_path))
    assert isinstance(cached.train, CachedPackedSequences) and isinstance(cached.eval, CachedPackedSequences)
    assert cached.describe() == plain.describe()
    for split in ("train", "eval"):
        a, b = getattr(plain, split), getattr(cached, split)
        for key, value in b.batch(range(len(b))).items():
            assert torch.equal(value, getattr(a, key)), (split, key)


def test_training_run_through_the_cache_is_the_same_run(tmp_path, fast_overrides):
    """The loop's hook: a short CPU run with ``data.token_cache`` logs the same losses (CPU runs are exact)."""
    losses = []
    for name, extra in (("plain", []), ("cached", [f"data.token_cache={tmp_path / 'cache'}"])):
        config = load_config(None, fast_overrides("train.steps=3", "eval.every=3", "log.every=1", *extra,
                                                  out_dir=str(tmp_path / name)))  # fmt: skip
        run_training(config)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["kind"], r["step"], r["loss"]) for r in records])
    assert losses[0] == losses[1] and len(losses[0]) == 5  # eval 0, train 1-3, eval 3
    assert os.listdir(tmp_path / "cache")
