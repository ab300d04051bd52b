"""Tokenize once, memory-map afterwards: packed rows for corpora of hundreds of MB.

``pack_documents`` holds every packed row of a split in memory as four [N, T] int64 tensors (~32 bytes per
token) and re-tokenizes the text on every run. With ``data.token_cache=DIR`` the documents of a split are
tokenized once, in chunks, into an entry of DIR:

- ``ids.bin``      every document's token ids end to end (each followed by EOS), uint16 or uint32;
- ``offsets.bin``  int64 [D + 1]: document d is ``ids[offsets[d]:offsets[d + 1]]``;
- ``flags.bin``    uint8 [D]: bit 0 = splittable (plain text), bit 1 = has context-only tokens (SFT prompt);
- ``learn.bin``    uint8 per token (1 = learned), only when some document has context-only tokens;
- ``meta.json``    format, version, key, counts and dtypes (written last; a directory with it is complete);
- ``fingerprints.json``  per (seq_len, pad id), once computed: the packing's dataset fingerprint and label
                   count (derived from the entry; both cost a pass over every row at hundreds of MB).

The entry's name is a hash of the documents (text, segments, learned flags, splittable), the tokenizer
(``tokenizer_hash``) and this format's version, so any change makes a new entry and an entry is never
reused for other data. An entry is built in a hidden temporary directory and moved into place with one
``os.replace`` (concurrent builders: the first wins, the others discard theirs). Reading it back uses plain
binary arrays checked against ``meta.json`` (sizes, dtypes, offsets); nothing read from the cache is
executed or unpickled.

``CachedPackedSequences`` lays the cached documents into rows of ``seq_len`` tokens with exactly the rules
of ``pack_documents`` (same rows, labels / -100, position ids and attention mask; the test suite checks
equality) but materializes only the rows a batch asks for, from the memory-mapped ids. Its
``dataset_fingerprint`` equals that of the in-memory packing (streamed in chunks of rows), so reference
scores made on one path are accepted on the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from centrifuge._io import write_json_atomic
from centrifuge.ops.cross_entropy import IGNORE_INDEX
from centrifuge.train.errors import DataError

FORMAT = "centrifuge-token-cache"
VERSION = 1
META = "meta.json"
FINGERPRINTS = "fingerprints.json"
SPLITTABLE, HAS_CONTEXT = 1, 2  # bits of flags.bin
CHUNK_DOCS = 2048  # documents per tokenizer call while building (bounds the memory of Python id lists)
CHUNK_ROWS = 4096  # rows per materialized chunk when a whole split is streamed (fingerprint, label count)


def cache_key(docs: Sequence[Any], tok_hash: str) -> str:
    """Hash of everything that decides the cached ids: documents (segments, learned flags, splittable), the
    tokenizer and this format's version. ``docs`` are ``centrifuge.train.data.Document`` objects."""
    h = hashlib.sha256(f"{FORMAT}|{VERSION}|{tok_hash}|{len(docs)}|".encode())
    for doc in docs:
        h.update(b"S" if doc.splittable else b"W")
        h.update(len(doc.segments).to_bytes(4, "little"))
        for text, learned in doc.segments:
            data = text.encode("utf-8", errors="surrogatepass")
            h.update((b"1" if learned else b"0") + len(data).to_bytes(8, "little"))  # length prefix
            h.update(data)
    return h.hexdigest()[:24]


def build_token_cache(docs: Sequence[Any], tokenizer: Any, cache_dir: str) -> tuple[str, bool]:
    """Tokenize ``docs`` into an entry of ``cache_dir`` (or find the one already there).

    Returns (entry directory, whether it was already there). Tokenization is the same as
    ``tokenize_documents`` (it is called on chunks of ``CHUNK_DOCS`` documents)."""
    from centrifuge.tokens.reference import tokenizer_hash
    from centrifuge.train.data import tokenize_documents

    key = cache_key(docs, tokenizer_hash(tokenizer))
    entry = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(entry, META)):
        try:
            TokenCache(entry)
            return entry, True
        except DataError:
            shutil.rmtree(entry, ignore_errors=True)  # damaged (e.g. a truncated file): built again below
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    id_dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    offsets = np.zeros(len(docs) + 1, np.int64)
    flags = np.zeros(len(docs), np.uint8)
    any_context = False
    total = 0
    learn_path = os.path.join(tmp, "learn.bin")
    try:
        with open(os.path.join(tmp, "ids.bin"), "wb") as ids_file, open(learn_path, "wb") as learn_file:
            for first in range(0, len(docs), CHUNK_DOCS):
                chunk = tokenize_documents(docs[first : first + CHUNK_DOCS], tokenizer)
                for i, tdoc in enumerate(chunk, first):
                    context = not bool(tdoc.learn.all())
                    flags[i] = (SPLITTABLE if tdoc.splittable else 0) | (HAS_CONTEXT if context else 0)
                    any_context |= context
                    total += len(tdoc.ids)
                    offsets[i + 1] = total
                ids_file.write(np.concatenate([t.ids for t in chunk]).astype(id_dtype).tobytes())
                learn_file.write(np.concatenate([t.learn for t in chunk]).astype(np.uint8).tobytes())
        if not any_context:
            os.unlink(learn_path)  # plain text: every token is learned, no per-token flags needed
        offsets.tofile(os.path.join(tmp, "offsets.bin"))
        flags.tofile(os.path.join(tmp, "flags.bin"))
        meta = {"format": FORMAT, "version": VERSION, "key": key, "num_documents": len(docs), "num_tokens": total,
                "id_dtype": np.dtype(id_dtype).name, "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "has_learn": any_context}  # fmt: skip
        write_json_atomic(os.path.join(tmp, META), meta)
        try:
            os.replace(tmp, entry)  # atomic: readers see no entry or a complete one
        except OSError:
            if not os.path.isfile(os.path.join(entry, META)):  # not a concurrent builder's finished entry
                raise
            return entry, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, False


class TokenCache:
    """One cache entry, memory-mapped read-only; raises ``DataError`` when it is incomplete or inconsistent."""

    def __init__(self, entry: str):
        self.entry = entry
        try:
            with open(os.path.join(entry, META), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"token cache {entry}: unreadable {META} ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DataError(f"token cache {entry}: not a {FORMAT} v{VERSION} entry")
        if meta.get("id_dtype") not in ("uint16", "uint32"):
            raise DataError(f"token cache {entry}: unexpected id dtype {meta.get('id_dtype')!r}")
        self.meta = meta
        n_docs, n_tokens = int(meta["num_documents"]), int(meta["num_tokens"])
        self.ids = self._map("ids.bin", np.dtype(meta["id_dtype"]), n_tokens)
        self.offsets = np.array(self._map("offsets.bin", np.dtype(np.int64), n_docs + 1))
        self.flags = np.array(self._map("flags.bin", np.dtype(np.uint8), n_docs))
        self.learn = self._map("learn.bin", np.dtype(np.uint8), n_tokens) if meta.get("has_learn") else None
        lengths = np.diff(self.offsets)
        if self.offsets[0] != 0 or self.offsets[-1] != n_tokens or (lengths < 1).any():
            raise DataError(f"token cache {entry}: document offsets do not match the token count")

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = os.path.join(self.entry, name)
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != count * dtype.itemsize:
            raise DataError(f"token cache {self.entry}: {name} has {size} bytes, expected {count * dtype.itemsize}")
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def row_layout(lengths: np.ndarray, splittable: np.ndarray, seq_len: int) -> tuple[np.ndarray, ...]:
    """The rows ``pack_documents`` makes from documents of ``lengths`` tokens, as segments.

    Returns (row_ptr [N + 1], seg_src [S], seg_len [S], truncated): row r holds segments
    ``row_ptr[r]:row_ptr[r + 1]``, each ``seg_len`` tokens of the flat id stream from ``seg_src``, laid left
    to right. The loop mirrors ``pack_documents`` line by line (flush rules, SFT truncation, empty pieces)."""
    row_ptr, seg_src, seg_len = [0], [], []
    used, truncated = 0, 0
    start = 0

    def flush() -> None:
        nonlocal used
        if len(seg_src) > row_ptr[-1]:
            row_ptr.append(len(seg_src))
        used = 0

    for length, split in zip(lengths.tolist(), splittable.tolist(), strict=True):
        if not split:
            n = length
            if n > seq_len:
                n, truncated = seq_len, truncated + 1
            if used + n > seq_len:
                flush()
            seg_src.append(start)
            seg_len.append(n)
            used += n
        else:
            s = 0
            while s < length:
                take = min(seq_len - used, length - s)
                seg_src.append(start + s)
                seg_len.append(take)
                used += take
                s += take
                if used == seq_len:
                    flush()
        start += length
    flush()
    return np.asarray(row_ptr, np.int64), np.asarray(seg_src, np.int64), np.asarray(seg_len, np.int64), truncated


class CachedPackedSequences:
    """Packed rows of a ``TokenCache``, built per batch: the same interface and rows as ``PackedSequences``
    (``len``, ``seq_len``, ``shape``, ``batch``, ``num_label_tokens``, ``num_documents``, ``num_truncated``)."""

    def __init__(self, cache: TokenCache, seq_len: int, *, pad_id: int):
        self.cache = cache
        self._seq_len = seq_len
        self.pad_id = pad_id
        lengths = np.diff(cache.offsets)
        self.row_ptr, self.seg_src, self.seg_len, self.num_truncated = row_layout(
            lengths, (cache.flags & SPLITTABLE) != 0, seq_len
        )
        self.num_documents = cache.num_documents
        self._label_tokens: int | None = None
        # Plain text only (every document splittable): row r is exactly tokens [r*T, (r+1)*T) of the stream,
        # which `_contiguous_rows` builds without the per-segment bookkeeping (3-4x faster).
        self._doc_start: np.ndarray | None = None
        if cache.learn is None and bool(((cache.flags & SPLITTABLE) != 0).all()):
            self._doc_start = np.zeros(int(cache.offsets[-1]), bool)
            self._doc_start[cache.offsets[:-1]] = True

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, seq_len): what ``input_ids.shape`` is for ``PackedSequences``."""
        return len(self), self._seq_len

    def rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` as int64 numpy arrays [B, T] (``input_ids``, ``labels``, ``position_ids``,
        ``attention_mask``), filled from the memory-mapped ids."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range (0..{len(self) - 1})")
        if self._doc_start is not None:
            return self._contiguous_rows(idx)
        T, B = self._seq_len, len(idx)
        first, last = self.row_ptr[idx], self.row_ptr[idx + 1]
        counts = last - first
        segs = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())  # segment ids
        seg_row = np.repeat(np.arange(B), counts)
        lens = self.seg_len[segs]
        ends = np.cumsum(lens)
        row_total = np.zeros(B, np.int64)
        np.add.at(row_total, seg_row, lens)
        seg_col = ends - lens - np.repeat(np.cumsum(row_total) - row_total, counts)  # column where a segment starts
        n = int(lens.sum())
        within = np.arange(n) - np.repeat(ends - lens, lens)  # offset inside its segment = its position id
        tok_row = np.repeat(seg_row, lens)
        tok_col = np.repeat(seg_col, lens) + within
        src = np.repeat(self.seg_src[segs], lens) + within
        ids = np.asarray(self.cache.ids[src], np.int64)
        doc = np.searchsorted(self.cache.offsets, src, side="right") - 1
        learned = self.cache.offsets[doc] != src  # a document's first token is never learned
        if self.cache.learn is not None:
            learned &= self.cache.learn[src] != 0
        col = np.broadcast_to(np.arange(T), (B, T))
        input_ids = np.full((B, T), self.pad_id, np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        positions = col - row_total[:, None]  # padding forms its own segment, from 0 at the first pad column
        mask = np.zeros((B, T), np.int64)
        input_ids[tok_row, tok_col] = ids
        labels[tok_row, tok_col] = np.where(learned, ids, IGNORE_INDEX)
        positions[tok_row, tok_col] = within
        mask[tok_row, tok_col] = 1
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask}

    def _contiguous_rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """``rows`` when every document is splittable (see ``__init__``); padding only ends the last row."""
        assert self._doc_start is not None
        T, total = self._seq_len, len(self._doc_start)
        col = np.arange(T)
        src = idx[:, None] * T + col  # [B, T] positions in the token stream
        valid = src < total
        src = np.minimum(src, total - 1)
        ids = np.asarray(self.cache.ids[src.ravel()], np.int64).reshape(src.shape)
        start = self._doc_start[src] & valid
        starts = np.where(start | (col == 0), col, 0)  # a segment starts at a document start or the row start
        np.maximum.accumulate(starts, axis=1, out=starts)
        used = valid.sum(axis=1, keepdims=True)
        return {
            "input_ids": np.where(valid, ids, self.pad_id),
            "labels": np.where(valid & ~start, ids, IGNORE_INDEX),  # a document's first token is never learned
            "position_ids": np.where(valid, col - starts, col - used),  # padding: its own segment from 0
            "attention_mask": valid.astype(np.int64),
        }

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as a batch dict of [B, T] int64 tensors (what ``PackedSequences.batch`` gives)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        return {k: torch.from_numpy(v) for k, v in self.rows(indices).items()}

    def _chunks(self):
        for start in range(0, len(self), CHUNK_ROWS):
            yield self.rows(np.arange(start, min(start + CHUNK_ROWS, len(self))))

    def _memo(self) -> dict[str, Any]:
        """Numbers of this packing stored in the entry (``fingerprints.json``: per "seq_len:pad_id")."""
        path = os.path.join(self.cache.entry, FINGERPRINTS)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _remember(self, **numbers: Any) -> None:
        memo = self._memo()
        name = f"{self._seq_len}:{self.pad_id}"
        entry = memo.get(name) if isinstance(memo.get(name), dict) else {}
        with contextlib.suppress(OSError):  # a read-only cache still works (the numbers are computed again)
            write_json_atomic(os.path.join(self.cache.entry, FINGERPRINTS), {**memo, name: {**entry, **numbers}})

    def _remembered(self, key: str, kind: type) -> Any:
        entry = self._memo().get(f"{self._seq_len}:{self.pad_id}")
        value = entry.get(key) if isinstance(entry, dict) else None
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    def num_label_tokens(self) -> int:
        """Tokens with a label after the shift (streamed over the rows once, then stored in the entry)."""
        if self._label_tokens is None:
            self._label_tokens = self._remembered("label_tokens", int)
        if self._label_tokens is None:
            self._label_tokens = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in self._chunks())
            self._remember(label_tokens=self._label_tokens)
        return self._label_tokens

    def dataset_fingerprint(self) -> str:
        """``centrifuge.tokens.reference.dataset_fingerprint`` of these rows, streamed in chunks (the same
        bytes in the same order, so the same digest as the in-memory packing); stored in the entry's
        ``fingerprints.json`` per (seq_len, pad id) after the first computation."""
        from centrifuge.tokens.reference import DATASET_FIELDS
        from centrifuge.tokens.reference import FORMAT as SCORES_FORMAT

        known = self._remembered("fingerprint", str)
        if known is not None:
            return known
        h = hashlib.sha256(f"{SCORES_FORMAT}|{self.shape}".encode())
        for field in DATASET_FIELDS:
            h.update(f"|{field}|{self.shape}|".encode())
            for chunk in self._chunks():
                h.update(np.ascontiguousarray(chunk[field]).tobytes())
        digest = h.hexdigest()
        self._remember(fingerprint=digest)
        return digest


def cached_packing(docs: Sequence[Any], tokenizer: Any, seq_len: int, cache_dir: str) -> CachedPackedSequences:
    """``pack_documents(tokenize_documents(docs, tokenizer), seq_len, pad_id=eos)`` through the token cache."""
    entry, _ = build_token_cache(docs, tokenizer, cache_dir)
    return CachedPackedSequences(TokenCache(entry), seq_len, pad_id=tokenizer.eos_id)
