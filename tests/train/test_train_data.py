"""Data: reading .txt/.jsonl/.parquet, held-out split by documents, packing, SFT masking, batching."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.train.config import DataSection
from centrifuge.train.data import (
    BATCH_KEYS,
    SequenceSampler,
    TokenizedDocument,
    builtin_documents,
    eval_batches,
    pack_documents,
    read_documents,
    sft_document,
    split_documents,
    text_document,
    tokenize_documents,
)
from centrifuge.train.errors import DataError
from centrifuge.train.tokenizer import train_bpe

EOS = 0


def doc(*ids: int, learn: list[bool] | None = None, splittable: bool = True) -> TokenizedDocument:
    ids_ = np.array([*ids, EOS], np.int64)
    learn_ = np.array(learn + [True] if learn is not None else [True] * len(ids_), bool)
    return TokenizedDocument(ids_, learn_, splittable)


def test_packing_marks_document_boundaries():
    packed = pack_documents([doc(5, 6, 7), doc(8, 9), doc(10, 11, 12, 13)], 6, pad_id=EOS)
    # stream: [5 6 7 E 8 9 | E 10 11 12 13 E | (padding)]; the 3rd doc's "E" closes doc 2 in row 1
    assert packed.input_ids.tolist() == [[5, 6, 7, EOS, 8, 9], [EOS, 10, 11, 12, 13, EOS]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    assert packed.labels.tolist() == [
        [-100, 6, 7, EOS, -100, 9],  # doc starts are never learned from the previous document
        [EOS, -100, 11, 12, 13, EOS],  # the continued piece of doc 2 keeps its label (row start)
    ]
    assert packed.attention_mask.tolist() == [[1] * 6, [1] * 6]
    assert all(v.dtype == torch.int64 for v in packed.batch([0, 1]).values())


def test_padding_is_masked_and_forms_its_own_segment():
    packed = pack_documents([doc(5, 6, 7)], 7, pad_id=EOS)
    assert packed.input_ids.tolist() == [[5, 6, 7, EOS, EOS, EOS, EOS]]
    assert packed.labels.tolist() == [[-100, 6, 7, EOS, -100, -100, -100]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_sft_examples_mask_the_prompt_and_stay_in_one_row():
    sft = doc(20, 21, 22, 30, 31, learn=[False, False, False, True, True], splittable=False)
    packed = pack_documents([doc(5, 6), sft], 8, pad_id=EOS)
    # the SFT example (6 tokens) does not fit after the first doc (3 tokens): it starts a new row
    assert packed.input_ids.tolist() == [[5, 6, EOS, 0, 0, 0, 0, 0], [20, 21, 22, 30, 31, EOS, 0, 0]]
    assert packed.labels[1].tolist() == [-100, -100, -100, 30, 31, EOS, -100, -100]
    long = doc(*range(40, 52), learn=[False] * 4 + [True] * 8, splittable=False)
    packed = pack_documents([long], 8, pad_id=EOS)
    assert len(packed) == 1 and packed.num_truncated == 1


def test_tokenized_sft_records_mask_prompt_tokens():
    tok = train_bpe(["question: what is two plus two? answer: four"] * 20, 300)
    (tokens,) = tokenize_documents([sft_document("question: what?", " answer: four")], tok)
    n_prompt = len(tok.encode_batch(["question: what?"])[0])
    assert not tokens.learn[:n_prompt].any() and tokens.learn[n_prompt:].all()
    assert tokens.ids[-1] == tok.eos_id


def test_split_holds_out_whole_documents_without_leakage():
    docs = [text_document(f"document number {i} " * (i + 1)) for i in range(40)]
    docs.append(text_document(docs[3].text))  # an exact duplicate must land on the same side
    train, held = split_documents(docs, 0.2, seed=0)
    train_texts, held_texts = {d.text for d in train}, {d.text for d in held}
    assert held and train and not (train_texts & held_texts)
    assert len(train) + len(held) == len(docs)
    share = sum(d.num_chars for d in held) / sum(d.num_chars for d in docs)
    assert 0.2 <= share < 0.4
    assert [d.text for d in split_documents(docs, 0.2, seed=0)[1]] == [d.text for d in held]  # deterministic
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    with pytest.raises(DataError, match="only one document"):
        split_documents(docs[:1], 0.1, seed=0)


def test_packed_eval_rows_contain_no_training_text():
    tok = train_bpe([f"alpha{i} beta{i} gamma{i}" for i in range(50)], 400)
    docs = [text_document(f"unique{i} " * 30) for i in range(30)]
    train, held = split_documents(docs, 0.2, seed=1)
    train_rows = pack_documents(tokenize_documents(train, tok), 32, pad_id=tok.eos_id)
    decoded = " ".join(tok.decode(row.tolist()) for row in train_rows.input_ids)
    for d in held:
        assert d.text.split()[0] not in decoded.split()


def test_read_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "a json document"}) + "\n\n" + json.dumps({"prompt": "Q:", "completion": " A"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"prompt": ["P"], "completion": [" C"]}), tmp_path / "sub_d.parquet")
    (tmp_path / "ignored.csv").write_text("x,y\n")
    docs, source = read_documents(DataSection(path=str(tmp_path)))
    assert "4 files" in source
    texts = [d.text for d in docs]
    assert texts == ["first paragraph\n\nsecond paragraph\n", "a json document", "Q: A", "parquet one",
                     "parquet two", "P C"]  # fmt: skip
    assert [d.splittable for d in docs] == [True, True, False, True, True, False]
    docs, _ = read_documents(DataSection(path=str(tmp_path / "a.txt"), txt_split="paragraph"))
    assert [d.text for d in docs] == ["first paragraph", "second paragraph\n"]
    docs, _ = read_documents(DataSection(path=str(tmp_path / "*.jsonl")))
    assert len(docs) == 2


def test_custom_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    assert read_documents(DataSection(path=str(tmp_path / "x.jsonl"), text_field="body"))[0][0].text == "hello"
    with pytest.raises(DataError, match=r"x.jsonl:1: no 'text' string"):
        read_documents(DataSection(path=str(tmp_path / "x.jsonl")))


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "does not exist"),
        ({"empty.txt": ""}, "no text found"),
        ({"blank.jsonl": "\n\n"}, "no text found"),
        ({"bad.jsonl": '{"text": "ok"}\n{not json\n'}, "bad.jsonl:2: invalid JSON"),
        ({"notes.csv": "a,b"}, "unsupported type"),
    ],
)
def test_missing_or_bad_data_is_one_clear_error(tmp_path, files, fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = tmp_path / next(iter(files)) if files else tmp_path / "missing"
    with pytest.raises(DataError) as info:
        read_documents(DataSection(path=str(path)))
    assert fragment in str(info.value)


def test_directory_without_data_files(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="holds no"):
        read_documents(DataSection(path=str(tmp_path)))


def test_builtin_corpus_needs_no_download():
    docs = builtin_documents()
    assert len(docs) > 50 and sum(d.num_chars for d in docs) > 200_000


def test_sampler_resumes_the_same_order():
    full = SequenceSampler(10, seed=3)
    order = [full.take(4) for _ in range(6)]  # straddles epochs
    assert sorted(order[0] + order[1] + order[2][:2]) == list(range(10))
    part = SequenceSampler(10, seed=3)
    for _ in range(2):
        part.take(4)
    resumed = SequenceSampler(10, seed=3)
    resumed.load_state_dict(part.state_dict())
    assert [resumed.take(4) for _ in range(4)] == order[2:]
    with pytest.raises(DataError, match="training sequences"):
        SequenceSampler(11, seed=3).load_state_dict(part.state_dict())


def test_eval_batches_cover_the_split_in_order():
    packed = pack_documents([doc(*range(1, 30))], 8, pad_id=EOS)
    batches = eval_batches(packed, 3)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(packed)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), packed.input_ids)
    assert set(batches[0]) == set(BATCH_KEYS)
    assert len(eval_batches(packed, 1, max_batches=2)) == 2
    assert (packed.labels[packed.attention_mask == 0] == IGNORE_INDEX).all()
