"""Tokenizer: byte-level BPE trained in-process, cached by a hash of corpus + settings, saved as HF files."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from centrifuge.train.data import builtin_documents
from centrifuge.train.errors import DataError
from centrifuge.train.tokenizer import (
    EOS_TOKEN,
    bpe_cache_key,
    cached_bpe,
    load_tokenizer,
    train_bpe,
)

TEXTS = [f"def function_{i}(x):\n    return x * {i}  # ünïcödé\n" for i in range(200)]


def test_cache_hit_and_keys(tmp_path):
    first, path, hit = cached_bpe(TEXTS, 400, cache_dir=str(tmp_path))
    assert not hit and os.path.isfile(path) and path.startswith(str(tmp_path))
    again, path2, hit2 = cached_bpe(TEXTS, 400, cache_dir=str(tmp_path))
    assert hit2 and path2 == path
    assert again.encode_batch(TEXTS[:3]) == first.encode_batch(TEXTS[:3])
    assert bpe_cache_key(TEXTS, 401) != bpe_cache_key(TEXTS, 400)
    assert bpe_cache_key(TEXTS[:-1], 400) != bpe_cache_key(TEXTS, 400)
    assert bpe_cache_key(["ab", "c"], 400) != bpe_cache_key(["a", "bc"], 400)
    assert [n for n in os.listdir(tmp_path / "tokenizers") if n.startswith(".tmp")] == []


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    first, path, _ = cached_bpe(TEXTS, 400, cache_dir=str(tmp_path))
    with open(path, "w") as f:
        f.write("{broken")
    tok, _, hit = cached_bpe(TEXTS, 400, cache_dir=str(tmp_path))
    assert not hit and tok.backend.to_str() == first.backend.to_str()


def test_training_is_deterministic_and_round_trips_bytes():
    texts = [d.text for d in builtin_documents()[:20]]
    a, b = train_bpe(texts, 1000), train_bpe(texts, 1000)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.vocab_size == 1000 and a.eos_id == 0
    sample = "naïve café — 日本語 \t tabs\n"
    assert a.decode(a.encode_batch([sample])[0]) == sample  # byte-level: no unknown tokens


def test_save_as_hf_directory_and_load(tmp_path):
    tok = train_bpe(TEXTS, 400)
    tok.save(str(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert hf.eos_token == EOS_TOKEN
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.encode_batch(TEXTS[:5]) == tok.encode_batch(TEXTS[:5]) and loaded.eos_id == tok.eos_id
    from_file = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    assert from_file.eos_id == tok.eos_id
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="at least"):
        train_bpe(TEXTS, 100)
