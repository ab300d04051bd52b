"""Training data: read documents, hold some out, tokenize, pack into fixed-length sequences, batch.

Sources: the built-in corpus (the Python docs in the standard library's ``pydoc_data``, nothing to
download) or local ``.txt`` / ``.jsonl`` / ``.parquet`` files. A ``.jsonl``/``.parquet`` record is plain text
(field ``data.text_field``) or a supervised fine-tuning pair ``{"prompt": ..., "completion": ...}`` whose
prompt tokens are not learned.

Packing (``pack_documents``): each document's tokens are followed by EOS and laid end to end in rows of
``seq_len`` tokens. A batch is a dict of int64 tensors, all [B, T]:

- ``input_ids``      token ids (padding = EOS id);
- ``labels``         HF convention, aligned with ``input_ids`` (the loss shifts them): the token id where
                     position t must be learned from positions < t, else -100: the first token of every
                     document (it must not be predicted from the previous document), prompt tokens, padding;
- ``position_ids``   restart at 0 at every document start and at every row start, so each row is a set of
                     independent segments (HF builds a block-diagonal causal mask from them);
- ``attention_mask`` 1 = real token, 0 = padding (padding only ever sits at the end of a row).

Plain documents may be cut across rows (a continued piece starts a new segment); an SFT example is kept in
one row (truncated to ``seq_len`` if longer) so its completion always sees its prompt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.train.config import DataSection
from centrifuge.train.errors import DataError
from centrifuge.train.tokenizer import TextTokenizer

DATA_EXTENSIONS = (".txt", ".jsonl", ".parquet")
BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


# ------------------------------------------------------------------------------------------- documents


@dataclass
class Document:
    """Text segments with a flag each: learned (True) or context only (False, e.g. an SFT prompt)."""

    segments: list[tuple[str, bool]]
    splittable: bool = True  # plain text may be cut across rows; SFT examples stay whole

    @property
    def num_chars(self) -> int:
        return sum(len(text) for text, _ in self.segments)

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def text_document(text: str) -> Document:
    return Document([(text, True)], splittable=True)


def sft_document(prompt: str, completion: str) -> Document:
    return Document([(prompt, False), (completion, True)], splittable=False)


def builtin_documents() -> list[Document]:
    """The built-in corpus: every topic of the Python docs in ``pydoc_data.topics`` (~0.5 MB of text)."""
    from pydoc_data import topics

    return [text_document(topics.topics[name]) for name in sorted(topics.topics)]


def find_data_files(path: str) -> list[str]:
    """A file, a directory (searched recursively, hidden entries skipped) or a glob -> sorted data files."""
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data.path {path!r} does not exist")
    data_files = [f for f in files if f.endswith(DATA_EXTENSIONS)]
    if not data_files:
        if len(files) == 1 and files[0] == path:
            raise DataError(f"data file {path!r} has an unsupported type (use {', '.join(DATA_EXTENSIONS)})")
        raise DataError(f"data.path {path!r} holds no {'/'.join(DATA_EXTENSIONS)} files")
    return data_files


def read_documents(cfg: DataSection) -> tuple[list[Document], str]:
    """All documents of ``cfg.path`` (or the built-in corpus) and a short description of the source."""
    if cfg.path is None:
        docs, source = builtin_documents(), "Python docs (pydoc_data.topics)"
    else:
        files = find_data_files(cfg.path)
        docs = []
        for path in files:
            if path.endswith(".txt"):
                docs += _read_txt(path, cfg.txt_split)
            elif path.endswith(".jsonl"):
                docs += _read_jsonl(path, cfg.text_field)
            else:
                docs += _read_parquet(path, cfg.text_field)
        source = files[0] if len(files) == 1 else f"{len(files)} files under {cfg.path}"
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"no text found in {cfg.path if cfg.path is not None else 'the built-in corpus'}")
    return docs, source


def _read_text_file(path: str) -> str:
    """A data file's text; ``DataError`` when it is not UTF-8 text (e.g. a binary file named ``.txt``),
    which would otherwise be trained on as replacement characters."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data file {path} is not UTF-8 text (invalid byte at offset {err.start}); convert it "
                        "or remove it from data.path") from None
    if "\0" in text:
        raise DataError(f"data file {path} is not text (it holds NUL bytes, offset {text.index(chr(0))}); "
                        "remove it from data.path")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open() gave


def _read_txt(path: str, split: str) -> list[Document]:
    text = _read_text_file(path)
    if split == "paragraph":
        return [text_document(p) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [text_document(text)]


def _record_document(record: object, text_field: str, where: str) -> Document | None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return sft_document(prompt, completion)
    text = record.get(text_field)
    if isinstance(text, str):
        return text_document(text)
    if text is None and text_field in record:
        return None  # a null text is skipped, like an empty one
    raise DataError(
        f"{where}: no {text_field!r} string and no 'prompt'/'completion' pair (keys: {', '.join(map(str, record))})"
    )


def _read_jsonl(path: str, text_field: str) -> list[Document]:
    docs = []
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold raw
    for lineno, line in enumerate(_read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        doc = _record_document(record, text_field, f"{path}:{lineno}")
        if doc is not None:
            docs.append(doc)
    return docs


def _read_parquet(path: str, text_field: str) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
        if "prompt" in columns and "completion" in columns:
            table = pq.read_table(path, columns=["prompt", "completion"])
            pairs = zip(table.column("prompt").to_pylist(), table.column("completion").to_pylist(), strict=True)
            return [sft_document(p, c) for p, c in pairs if isinstance(p, str) and isinstance(c, str)]
        if text_field not in columns:
            raise DataError(
                f"{path}: no column {text_field!r} and no 'prompt'/'completion' columns "
                f"(columns: {', '.join(columns)}); set data.text_field"
            )
        texts = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read parquet file {path}: {err}") from None
    return [text_document(t) for t in texts if isinstance(t, str)]


def split_documents(
    docs: Sequence[Document], eval_fraction: float, *, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (about ``eval_fraction`` of the characters) for evaluation.

    The split is by documents, never by sequences, so no held-out text is trained on. Documents are ordered
    by a seeded hash of their text, so identical documents land on the same side and the split does not
    depend on file order."""
    if eval_fraction <= 0:
        return list(docs), []
    if len(docs) < 2:
        raise DataError(
            "only one document, so nothing can be held out for evaluation; "
            "set data.eval_fraction=0 or data.txt_split=paragraph"
        )

    def digest(doc: Document) -> bytes:
        return hashlib.sha256(f"{seed}\0{doc.text}".encode("utf-8", errors="surrogatepass")).digest()

    digests = [digest(d) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (digests[i], i))
    target = eval_fraction * sum(d.num_chars for d in docs)
    held: set[int] = set()
    chars = 0
    for i in order[:-1]:  # at least one document stays in training
        if held and chars >= target:
            break
        held.add(i)
        chars += docs[i].num_chars
    held_digests = {digests[i] for i in held}
    train = [d for i, d in enumerate(docs) if digests[i] not in held_digests]
    evals = [d for i, d in enumerate(docs) if digests[i] in held_digests]
    if not train:
        raise DataError("every document is a copy of a held-out one; set data.eval_fraction=0")
    return train, evals


# --------------------------------------------------------------------------------------- tokenize + pack


@dataclass
class TokenizedDocument:
    ids: np.ndarray  # [L] int64, ending with EOS
    learn: np.ndarray  # [L] bool: False for tokens that are context only (SFT prompt)
    splittable: bool


def tokenize_documents(docs: Sequence[Document], tokenizer: TextTokenizer) -> list[TokenizedDocument]:
    """Encode every segment (one batched call), join each document's segments and append EOS."""
    texts = [text for doc in docs for text, _ in doc.segments]
    encoded = iter(tokenizer.encode_batch(texts))
    out = []
    for doc in docs:
        ids: list[int] = []
        learn: list[bool] = []
        for _, learned in doc.segments:
            seg = next(encoded)
            ids += seg
            learn += [learned] * len(seg)
        ids.append(tokenizer.eos_id)
        learn.append(True)  # learning where a document ends
        out.append(TokenizedDocument(np.asarray(ids, np.int64), np.asarray(learn, bool), doc.splittable))
    return out


@dataclass
class PackedSequences:
    """N packed rows of T tokens; every field [N, T] int64 (see the module docstring)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_documents: int = 0
    num_truncated: int = 0  # SFT examples longer than T, cut to T

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as a batch dict of [B, T] int64 tensors."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {key: getattr(self, key).index_select(0, idx) for key in BATCH_KEYS}

    def num_label_tokens(self) -> int:
        """Tokens with a label after the shift (what the dense loss averages over)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pack_documents(docs: Sequence[TokenizedDocument], seq_len: int, *, pad_id: int) -> PackedSequences:
    """Lay documents end to end in rows of ``seq_len`` tokens (see the module docstring for the fields)."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []  # each row: (ids, labels) segments
    current: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0
    truncated = 0

    def flush() -> None:
        nonlocal current, used
        if current:
            rows.append(current)
        current, used = [], 0

    for doc in docs:
        labels = np.where(doc.learn, doc.ids, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX  # a document's first token is never predicted from what came before
        if not doc.splittable:
            ids = doc.ids
            if len(ids) > seq_len:
                ids, labels = ids[:seq_len], labels[:seq_len]
                truncated += 1
            if used + len(ids) > seq_len:
                flush()
            current.append((ids, labels))
            used += len(ids)
            continue
        start = 0
        while start < len(doc.ids):
            take = min(seq_len - used, len(doc.ids) - start)
            current.append((doc.ids[start : start + take], labels[start : start + take]))
            used += take
            start += take
            if used == seq_len:
                flush()
    flush()

    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, np.int64)
    label_arr = np.full((n, seq_len), IGNORE_INDEX, np.int64)
    positions = np.zeros((n, seq_len), np.int64)
    mask = np.zeros((n, seq_len), np.int64)
    for r, segments in enumerate(rows):
        col = 0
        for ids, labels in segments:
            end = col + len(ids)
            input_ids[r, col:end] = ids
            label_arr[r, col:end] = labels
            positions[r, col:end] = np.arange(len(ids))  # every segment (document piece) starts at 0
            mask[r, col:end] = 1
            col = end
        positions[r, col:] = np.arange(seq_len - col)  # padding forms its own segment
    return PackedSequences(
        torch.from_numpy(input_ids),
        torch.from_numpy(label_arr),
        torch.from_numpy(positions),
        torch.from_numpy(mask),
        num_documents=len(docs),
        num_truncated=truncated,
    )


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class SequenceSampler:
    """An endless, resumable shuffled order over ``n`` rows.

    Epoch e visits ``randperm(n)`` drawn from a generator seeded with (seed, e); a batch may straddle two
    epochs. The position (epoch, offset) is all a checkpoint needs to continue the exact same order."""

    n: int
    seed: int
    epoch: int = 0
    offset: int = 0
    _order: torch.Tensor | None = field(default=None, repr=False)

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n, generator=gen)
        return self._order

    def take(self, k: int) -> list[int]:
        """The next ``k`` row indices."""
        out: list[int] = []
        while len(out) < k:
            order = self._epoch_order()
            grab = min(k - len(out), self.n - self.offset)
            out += order[self.offset : self.offset + grab].tolist()
            self.offset += grab
            if self.offset == self.n:
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at a saved position; ``DataError`` for another data size or a malformed state."""
        if not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
                   for k in ("epoch", "offset", "n")) or state["offset"] >= max(state["n"], 1):
            raise DataError(f"the checkpoint's data position is malformed ({state!r}); it is not one this "
                            "sampler wrote")
        if state.get("n") != self.n:
            raise DataError(
                f"the checkpoint was made with {state.get('n')} training sequences, this data has "
                f"{self.n}: the data or data settings changed since the run started"
            )
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None


def eval_batches(data: PackedSequences, batch_size: int, max_batches: int = 0) -> list[dict[str, torch.Tensor]]:
    """The held-out rows in order, ``batch_size`` at a time (``max_batches`` > 0 caps how many)."""
    starts = range(0, len(data), batch_size)
    if max_batches > 0:
        starts = starts[:max_batches]
    return [data.batch(range(s, min(s + batch_size, len(data)))) for s in starts]


@dataclass
class Datasets:
    train: PackedSequences
    eval: PackedSequences | None
    source: str
    num_train_docs: int
    num_eval_docs: int

    def describe(self) -> str:
        lines = [
            f"{self.source}: {self.num_train_docs} training documents -> {len(self.train)} sequences "
            f"of {self.train.seq_len} tokens ({self.train.num_label_tokens():,} learned tokens)"
        ]
        if self.eval is not None:
            lines.append(
                f"held out: {self.num_eval_docs} documents -> {len(self.eval)} sequences "
                f"({self.eval.num_label_tokens():,} tokens)"
            )
        if self.train.num_truncated:
            lines.append(
                f"{self.train.num_truncated} prompt/completion examples were longer than "
                f"data.seq_len and were truncated"
            )
        return "\n".join(lines)


def build_datasets(
    train_docs: Sequence[Document],
    eval_docs: Sequence[Document],
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    source: str,
    token_cache: str | None = None,
) -> Datasets:
    """Tokenize and pack both splits (each split packed on its own: no row mixes the two).

    ``token_cache``: a directory; each split is then tokenized once into it and its rows are built per batch
    from memory-mapped ids (``centrifuge.train.token_cache``: the same rows, for corpora of hundreds of MB)."""

    def pack(docs: Sequence[Document]) -> PackedSequences:
        if token_cache:
            from centrifuge.train.token_cache import cached_packing

            return cached_packing(docs, tokenizer, seq_len, token_cache)  # type: ignore[return-value]
        return pack_documents(tokenize_documents(docs, tokenizer), seq_len, pad_id=tokenizer.eos_id)

    train = pack(train_docs)
    if train.num_label_tokens() == 0:
        raise DataError("the training data has no token to learn (every label is masked)")
    evals = pack(eval_docs) if eval_docs else None
    return Datasets(train, evals, source, len(train_docs), len(eval_docs))
