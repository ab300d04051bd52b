"""Reference per-token losses for Rho-1 selection: computed online, or precomputed and stored on disk.

Scores are aligned with *prediction positions*, like the patched forward's ``token_loss``:
``ref[i, t] = −log p_ref(labels[i, t + 1] | tokens ≤ t)`` in nats (fp32), and 0 where position t has no
label (``labels[i, t + 1] == -100``, the last position, padding). Packed rows follow the training
pipeline's convention: ``position_ids`` restart at every document, and the reference sees no other
document (transformers builds a block-diagonal causal mask from them; no ``attention_mask`` is passed then).

Online (``OnlineReference``): a frozen reference model runs under ``torch.no_grad()`` on the same batch;
the LM head and cross-entropy go through ``chunked_token_loss`` (or the fused liger kernel on CUDA), so no
[tokens, vocab] fp32 logits exist at once. Cost: one extra forward per step.

Offline (``write_reference_scores``, CLI ``centrifuge score-reference``): every sequence of a packed
dataset is scored once and stored in ``DIR``:

- ``shard-00000.safetensors`` ...: tensor ``loss`` [rows, T] for sequences ``first .. first + rows − 1``,
  each written to a temporary file and moved into place with one ``os.replace`` (never half-written);
- ``manifest.json``: format, dataset fingerprint, tokenizer hash, sequence length, number of sequences,
  model id, storage dtype, shard list (file, first, count, sha256) and ``complete``.

An interrupted run resumes: shards already on disk that check out are skipped. ``ReferenceScores(DIR)``
reads them back (``for_batch(sequence_indices) -> [B, T]``) and refuses, with one ``ReferenceScoresError``
naming the problem, scores made for other data (fingerprint, tokenizer, sequence length), an unfinished
directory, a missing or corrupt shard, or indices out of range. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from centrifuge._io import atomic_write, sha256_file, write_json_atomic
from centrifuge.ops.cross_entropy import IGNORE_INDEX, shift_labels, token_loss_no_grad

FORMAT = "centrifuge-reference-scores"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR = "loss"
DATASET_FIELDS = ("input_ids", "labels", "position_ids", "attention_mask")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIGNMENT = "prediction positions: loss[i, t] = -log p_ref(labels[i, t+1] | tokens <= t), nats; 0 if unlabelled"


class ReferenceScoresError(ValueError):
    """Reference scores that cannot be used: another dataset / tokenizer / sequence length, an unfinished
    or damaged directory, or sequence indices out of range. The message says which and what to do."""

    exit_code = 2


class PackedDataset(Protocol):
    """What scoring needs from a packed dataset (``centrifuge.train.data.PackedSequences`` fits):
    [N, T] int64 tensors ``input_ids`` / ``labels`` / ``position_ids`` / ``attention_mask``."""

    input_ids: torch.Tensor

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------ online


def _check_supported_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"reference models with {name}={value} are not supported")


@torch.no_grad()
def reference_token_losses(
    model: nn.Module,
    *,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 2048,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token losses [B, T] (fp32, no grad) of a Hugging Face causal LM on one batch.

    Args:
        input_ids, labels, position_ids, attention_mask: [B, T] int64, the training batch (HF convention:
            ``labels`` aligned with ``input_ids``; None = ``input_ids`` with padding masked).
        chunk_size: rows per LM-head chunk (at most ``chunk_size`` × vocab logits at once).
        backend: "auto", "chunked" or "liger" (see ``token_loss_no_grad``).

    Returns ``loss`` [B, T]: ``loss[b, t]`` scores the prediction of ``labels[b, t + 1]``; 0 where
    unlabelled or padded. With ``position_ids`` given, ``attention_mask`` is not passed to the model (packed
    documents stay apart, padding sits at row ends); without them it is."""
    _check_supported_head(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    targets = shift_labels(labels)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    if bool((targets >= vocab).any()):
        raise ValueError(
            f"a label id ({int(targets.max())}) is outside the reference model's vocabulary ({vocab} tokens): "
            "the reference must use the training tokenizer"
        )
    kwargs: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {
        "attention_mask": attention_mask}
    out = model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
    hidden = out.last_hidden_state  # [B, T, d], after the final norm
    B, T, d = hidden.shape
    loss = token_loss_no_grad(hidden.reshape(B * T, d), head.weight, targets.reshape(-1),
                              getattr(head, "bias", None), chunk_size=chunk_size, backend=backend)
    return loss.view(B, T)


class OnlineReference:
    """A frozen reference model that scores training batches: ``OnlineReference(model)(batch) -> [B, T]``.

    The model is put in eval mode with ``requires_grad_(False)``; batches (dicts of [B, T] tensors, as the
    training data pipeline makes them) are moved to its device. Returns fp32 losses on that device."""

    def __init__(self, model: nn.Module, *, chunk_size: int = 2048, backend: str = "auto", model_id: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.chunk_size = chunk_size
        self.backend = backend
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls, spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        seed: int = 0, chunk_size: int = 2048, backend: str = "auto",
    ) -> OnlineReference:  # fmt: skip
        """From a local model directory, or a preset name (random init: for tests and benchmarks only)."""
        model = load_reference_model(spec, dtype=dtype, seed=seed).to(device)
        return cls(model, chunk_size=chunk_size, backend=backend, model_id=spec)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-token reference losses [B, T] (fp32) of ``batch`` (``input_ids`` [B, T] and optional
        ``labels`` / ``position_ids`` / ``attention_mask`` [B, T])."""
        dev = self.device
        inputs = {k: batch[k].to(dev, non_blocking=True) for k in DATASET_FIELDS if batch.get(k) is not None}
        return reference_token_losses(self.model, chunk_size=self.chunk_size, backend=self.backend, **inputs)


def load_reference_model(
    spec: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa",
    trust_remote_code: bool = False, **overrides: Any,
) -> nn.Module:  # fmt: skip
    """A reference model from a local Hugging Face directory (e.g. a ``centrifuge train`` checkpoint), or
    from a preset name with random init (``overrides`` replace config fields; useful for tests/benchmarks)."""
    from centrifuge.models.presets import PRESETS, build_model, load_model, preset_config

    if os.path.isdir(spec):
        if overrides:
            raise ValueError("config overrides apply to presets only, not to a model directory")
        return load_model(spec, dtype=dtype, attn_implementation=attn_implementation,
                          trust_remote_code=trust_remote_code)
    if spec in PRESETS:
        return build_model(preset_config(spec, **overrides), dtype=dtype, seed=seed,
                           attn_implementation=attn_implementation)
    raise FileNotFoundError(
        f"reference model {spec!r} is neither a local model directory nor a preset "
        f"({', '.join(sorted(PRESETS))}); nothing is downloaded"
    )


# --------------------------------------------------------------------------------------- fingerprints


def _shape(dataset: PackedDataset) -> tuple[int, int]:
    """(rows, seq_len); datasets that build rows on demand have ``shape`` and no ``input_ids`` tensor."""
    shape = getattr(dataset, "shape", None) or dataset.input_ids.shape
    return int(shape[0]), int(shape[1])


def dataset_fingerprint(dataset: PackedDataset) -> str:
    """sha256 (hex) of a packed dataset's shape and of its [N, T] tensors ``input_ids``, ``labels``,
    ``position_ids``, ``attention_mask`` (those it has): equal iff the scores would line up. A dataset that
    builds its rows on demand (``centrifuge.train.token_cache``) computes the same digest itself."""
    streamed = getattr(dataset, "dataset_fingerprint", None)
    if callable(streamed):
        return streamed()
    h = hashlib.sha256(f"{FORMAT}|{tuple(dataset.input_ids.shape)}".encode())
    for name in DATASET_FIELDS:
        t = getattr(dataset, name, None)
        if t is None:
            continue
        data = t.detach().to("cpu", torch.int64).contiguous()
        h.update(f"|{name}|{tuple(data.shape)}|".encode())
        h.update(memoryview(data.numpy()).cast("B"))
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 (hex) of what decides a tokenizer's ids for plain text: normalizer, pre-tokenizer, model
    (vocabulary, merges) and added tokens, plus the end-of-text id when known. Post-processing, padding
    and the decoder are left out, so a tokenizer saved and reloaded through ``transformers`` hashes the same.

    Accepts a ``centrifuge.train.tokenizer.TextTokenizer``, a ``tokenizers.Tokenizer``, a transformers fast
    tokenizer, or a path to a ``tokenizer.json`` / tokenizer directory."""
    eos = getattr(tokenizer, "eos_id", None)
    if isinstance(tokenizer, (str, os.PathLike)):
        from centrifuge.train.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(os.fspath(tokenizer))
        eos = tokenizer.eos_id
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"cannot hash a tokenizer of type {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    canonical = {
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "model": spec.get("model"),
        "added_tokens": sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or []),
        "eos_id": eos,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


_hash_tokenizer = tokenizer_hash  # ReferenceScores takes a ``tokenizer_hash`` argument of the same name


# ------------------------------------------------------------------------------------------ disk helpers


def _save_shard_atomic(path: str, loss: torch.Tensor, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file({TENSOR: loss.contiguous()}, tmp, metadata=metadata))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in STORE_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"reference scores are stored as {', '.join(STORE_DTYPES)}; got {dtype}")


def _check_shard(path: str, entry: Mapping[str, Any], manifest: Mapping[str, Any], *, read_data: bool) -> str:
    """Raise ``ReferenceScoresError`` unless ``path`` holds shard ``entry`` of ``manifest``; return its sha256."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ReferenceScoresError(f"reference score shard {name} is missing from {os.path.dirname(path)}")
    expect_shape = [int(entry["count"]), int(manifest["seq_len"])]
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sl = f.get_slice(TENSOR)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            if read_data:
                f.get_tensor(TENSOR)
    except Exception as err:
        raise ReferenceScoresError(f"reference score shard {name} is corrupt or unreadable ({err})") from None
    want_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[manifest["dtype"]]
    if shape != expect_shape or dtype != want_dtype:
        raise ReferenceScoresError(
            f"reference score shard {name} holds {dtype} {shape}, expected {want_dtype} {expect_shape}")
    if meta.get("dataset_fingerprint") != manifest["dataset_fingerprint"] or meta.get("first") != str(
        entry["first"]
    ):
        raise ReferenceScoresError(f"reference score shard {name} belongs to another dataset or position")
    digest = sha256_file(path)
    if entry.get("sha256") and entry["sha256"] != digest:
        raise ReferenceScoresError(f"reference score shard {name} is corrupt (sha256 does not match the manifest)")
    return digest


# --------------------------------------------------------------------------------------------- offline


def write_reference_scores(
    reference: OnlineReference | nn.Module,
    dataset: PackedDataset,
    out_dir: str,
    *,
    tokenizer_hash: str,
    model_id: str | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every sequence of ``dataset`` [N, T] with ``reference`` and store the losses in ``out_dir``.

    Shards of ``shard_size`` sequences are computed ``batch_size`` sequences at a time and written
    atomically; the manifest is rewritten (atomically) after each. If ``out_dir`` already holds the same
    job (same dataset fingerprint, tokenizer, sequence length, model id, shard size, dtype), shards on disk
    that verify are skipped: an interrupted run resumes. A directory holding another job is refused.

    Returns the final manifest (``complete`` = True)."""
    if not isinstance(reference, OnlineReference):
        reference = OnlineReference(reference, model_id=model_id or "")
    model_id = model_id or reference.model_id
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    n, seq_len = _shape(dataset)
    if n == 0:
        raise ValueError("the dataset has no sequences to score")
    store = _dtype_name(dtype)
    num_shards = (n + shard_size - 1) // shard_size
    cfg = reference.model.config
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "num_sequences": n,
        "seq_len": seq_len,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "tokenizer_hash": tokenizer_hash,
        "model_id": model_id,
        "model": {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size",
                                                     "num_hidden_layers", "num_attention_heads")},
        "dtype": store,
        "shard_size": shard_size,
        "alignment": ALIGNMENT,
        "extra": dict(extra or {}),
        "shards": [
            {"file": shard_name(i), "first": i * shard_size, "count": min(shard_size, n - i * shard_size),
             "sha256": None}
            for i in range(num_shards)
        ],
    }
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    done: set[int] = set()
    if os.path.exists(manifest_path):
        old = _read_manifest(out_dir)
        identity = ("version", "num_sequences", "seq_len", "dataset_fingerprint", "tokenizer_hash", "model_id",
                    "dtype", "shard_size")
        differ = [k for k in identity if old.get(k) != manifest[k]]
        if differ:
            raise ReferenceScoresError(
                f"{out_dir} already holds reference scores of another job ({', '.join(differ)} differ); "
                "choose another --out or delete that directory"
            )
        manifest["extra"] = old.get("extra", manifest["extra"])
        for i, entry in enumerate(manifest["shards"]):
            recorded = old["shards"][i].get("sha256") if i < len(old.get("shards", [])) else None
            path = os.path.join(out_dir, entry["file"])
            if not os.path.exists(path):
                continue
            try:
                entry["sha256"] = _check_shard(path, {**entry, "sha256": recorded}, manifest, read_data=True)
                done.add(i)
            except ReferenceScoresError:
                os.unlink(path)  # damaged (e.g. disk full): computed again below
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(manifest_path, manifest)

    todo = [i for i in range(num_shards) if i not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        remaining = sum(manifest["shards"][i]["count"] for i in todo)
        bar = tqdm(total=remaining, unit="seq", desc="score-reference", dynamic_ncols=True,
                   initial=0, postfix={"skipped shards": len(done)} if done else None)
    try:
        for i in todo:
            entry = manifest["shards"][i]
            first, count = entry["first"], entry["count"]
            rows = []
            for start in range(first, first + count, batch_size):
                idx = list(range(start, min(start + batch_size, first + count)))
                rows.append(reference(dataset.batch(idx)).float().cpu())
                if bar is not None:
                    bar.update(len(idx))
            loss = torch.cat(rows).to(dtype)
            path = os.path.join(out_dir, entry["file"])
            meta = {"dataset_fingerprint": manifest["dataset_fingerprint"], "first": str(first),
                    "count": str(count), "model_id": model_id, "format": FORMAT}
            _save_shard_atomic(path, loss, meta)
            entry["sha256"] = sha256_file(path)
            write_json_atomic(manifest_path, manifest)
    finally:
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest)
    return manifest


def _read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ReferenceScoresError(
            f"{directory} holds no reference scores ({MANIFEST} is missing); run `centrifuge score-reference`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ReferenceScoresError(f"{path} is unreadable or not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReferenceScoresError(f"{path} is not a centrifuge reference-score manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ReferenceScoresError(
            f"{path} has format version {manifest.get('version')}, this centrifuge reads {FORMAT_VERSION}")
    return manifest


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


class ReferenceScores:
    """Precomputed reference losses read back by sequence index: ``for_batch(indices) -> [B, T]``.

    Args:
        directory: what ``centrifuge score-reference --out`` wrote.
        dataset: the packed training dataset these scores must belong to (its fingerprint, sequence length
            and size are checked); or give ``fingerprint`` / ``seq_len`` / ``num_sequences`` directly.
        tokenizer: the training tokenizer (or pass ``tokenizer_hash``); checked against the manifest.
        verify: check each shard's sha256 the first time it is read.
        max_open_shards: shard files kept open (memory-mapped) at once.

    Raises ``ReferenceScoresError`` (one message listing every mismatch) when the directory is unfinished
    or does not match what was given; later, on ``for_batch``, for a missing / corrupt shard or an index
    out of range."""

    def __init__(
        self,
        directory: str,
        *,
        dataset: PackedDataset | None = None,
        tokenizer: Any = None,
        fingerprint: str | None = None,
        tokenizer_hash: str | None = None,
        seq_len: int | None = None,
        num_sequences: int | None = None,
        verify: bool = True,
        max_open_shards: int = 64,
    ):
        self.directory = directory
        self.manifest = manifest = _read_manifest(directory)
        if not manifest.get("complete"):
            done = sum(1 for s in manifest.get("shards", []) if s.get("sha256"))
            raise ReferenceScoresError(
                f"reference scoring in {directory} did not finish ({done} of {len(manifest.get('shards', []))} "
                "shards); run the same `centrifuge score-reference` command again to resume it"
            )
        if dataset is not None:
            fingerprint = fingerprint or dataset_fingerprint(dataset)
            seq_len = seq_len or _shape(dataset)[1]
            num_sequences = num_sequences or _shape(dataset)[0]
        if tokenizer is not None and tokenizer_hash is None:
            tokenizer_hash = _hash_tokenizer(tokenizer)
        problems = []
        if seq_len is not None and int(seq_len) != manifest["seq_len"]:
            problems.append(f"sequence length: scores {manifest['seq_len']}, data {seq_len}")
        if tokenizer_hash is not None and tokenizer_hash != manifest["tokenizer_hash"]:
            problems.append(f"tokenizer: scores {_short(manifest['tokenizer_hash'])}, data {_short(tokenizer_hash)}")
        if num_sequences is not None and int(num_sequences) != manifest["num_sequences"]:
            problems.append(f"number of sequences: scores {manifest['num_sequences']}, data {num_sequences}")
        if fingerprint is not None and fingerprint != manifest["dataset_fingerprint"]:
            problems.append(
                f"dataset fingerprint: scores {_short(manifest['dataset_fingerprint'])}, data {_short(fingerprint)}"
                " (other text, split, seed or packing)")
        if problems:
            raise ReferenceScoresError(
                f"reference scores in {directory} do not match the training data: {'; '.join(problems)}. "
                "Score this data with `centrifuge score-reference` (same data, tokenizer and seq_len as training)"
            )
        self.num_sequences = int(manifest["num_sequences"])
        self.seq_len = int(manifest["seq_len"])
        self.shard_size = int(manifest["shard_size"])
        self.verify = verify
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return self.num_sequences

    def _handle(self, shard: int) -> Any:
        handle = self._open.get(shard)
        if handle is not None:
            self._open.move_to_end(shard)
            return handle
        entry = self.manifest["shards"][shard]
        path = os.path.join(self.directory, entry["file"])
        if shard not in self._checked:
            if self.verify:
                _check_shard(path, entry, self.manifest, read_data=False)
            elif not os.path.isfile(path):
                raise ReferenceScoresError(f"reference score shard {entry['file']} is missing from {self.directory}")
            self._checked.add(shard)
        try:
            handle = safe_open(path, framework="pt")
            handle.get_slice(TENSOR)
        except Exception as err:
            raise ReferenceScoresError(f"reference score shard {entry['file']} is corrupt or unreadable ({err})") \
                from None
        self._open[shard] = handle
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle

    def check_all(self) -> None:
        """Check every shard (present, readable header, shape, sha256) now rather than at its first read,
        so a training run refuses damaged scores before it writes anything. Raises ``ReferenceScoresError``."""
        for shard in range(len(self.manifest["shards"])):
            self._handle(shard)

    def for_batch(self, sequence_indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Reference losses [B, T] (fp32, CPU) of the dataset rows ``sequence_indices`` [B], in that order."""
        idx = torch.as_tensor(sequence_indices, dtype=torch.long).reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.num_sequences)]
        if bad.numel():
            raise ReferenceScoresError(
                f"sequence index {int(bad[0])} is out of range: the reference scores cover {self.num_sequences} "
                f"sequences (0..{self.num_sequences - 1})"
            )
        out = torch.empty(idx.numel(), self.seq_len, dtype=torch.float32)
        for row, i in enumerate(idx.tolist()):
            shard, offset = divmod(i, self.shard_size)
            out[row] = self._handle(shard).get_slice(TENSOR)[offset : offset + 1][0].float()
        return out

    def close(self) -> None:
        self._open.clear()
