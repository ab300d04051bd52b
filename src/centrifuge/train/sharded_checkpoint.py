"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), read without unpickling DCP's index.

``centrifuge.train.checkpoint`` writes this layout for ``checkpoint.format: sharded`` (the default under
``train.distributed=fsdp2``). Every rank writes its own shards of the weights and of the AdamW state; nothing
is gathered onto one rank, and a run of any number of ranks can read them back (DCP reshards on load: an
FSDP2 run on N ranks resumes on M ranks, or in one process).

Files this module adds to a checkpoint directory:

- ``__<rank>_0.distcp``: DCP's data files, one per writing rank. They hold every tensor of the flat state
  dict ``{"model/<name>": weight, "optim/<name>/<key>": AdamW state}`` (this rank's shard of each, whole
  tensors for replicated ones, written once);
- ``dcp_metadata.json``: DCP's index (for each tensor: dtype, global size, its chunks, and where each chunk's
  bytes are), in JSON.

**Why JSON instead of DCP's own ``.metadata``.** ``FileSystemReader.read_metadata`` in torch 2.11 and 2.13
reads ``.metadata`` with a plain ``pickle.load`` (checked in ``torch/distributed/checkpoint/filesystem.py``):
any code in that file would run on every rank, before DCP reads anything else. So ``.metadata`` is converted
to ``dcp_metadata.json`` right after ``dcp.save`` and deleted; loading goes through ``JsonMetadataReader``,
which builds DCP's ``Metadata`` from the JSON (validated field by field) and never unpickles an index. Each
chunk's bytes are then read by DCP's own ``read_data``: ``torch.load(..., weights_only=True)`` on one tensor,
torch's restricted unpickler (tensors and plain containers only, no arbitrary objects). Non-tensor items
(DCP's pickled ``BytesIO`` entries) are never written and refused when listed.

**Integrity, and what the sha256 does and does not prove.** Every file (``dcp_metadata.json`` and every
``.distcp``) is listed in ``state.json`` with its size and sha256, verified before DCP reads anything
(``centrifuge.train.checkpoint.read_state``): a truncated, corrupt, missing or swapped shard ends in one
``CheckpointError`` with nothing loaded and nothing written. The hashes are the trust anchor for the
checkpoint's *contents*: they tie every shard to ``state.json``. They do not authenticate ``state.json``
itself: whoever can write the checkpoint directory can write a matching ``state.json`` too. That is why no
file of a checkpoint is ever fully unpickled: a forged checkpoint can hold wrong weights, not run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from centrifuge.train.errors import CheckpointError

DCP_METADATA_FILE = "dcp_metadata.json"
DCP_PICKLED_METADATA = ".metadata"  # written by dcp.save, converted and removed at once
_DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
_JSON_FORMAT = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def is_data_file(name: str) -> bool:
    """A DCP data file name (``__<rank>_<n>.distcp``)."""
    return bool(_DATA_FILE.match(name))


# ---------------------------------------------------------------------------------------------- the state


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's flat DCP state dict and the optimizer's non-tensor parts. Collective under FSDP2.

    Returns ``({"model/<name>": tensor, "optim/<name>/<key>": tensor}, {"param_groups": [...], "scalars":
    {name: {key: value}}})``. Tensors are ``DTensor`` shards under FSDP2, plain tensors otherwise; names are
    the parameters' fully qualified names (the same with and without FSDP2). A fresh optimizer gets its
    state created first (DCP's ``get_optimizer_state_dict`` steps it once with zero gradients and lr 0), so
    that a load has a tensor of the right shape and sharding to read every saved state into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors = {MODEL_PREFIX + name: t for name, t in get_model_state_dict(model).items()}
    optim = get_optimizer_state_dict(model, optimizer)
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in optim["state"].items():
        for key, value in values.items():
            if "/" in key:
                raise ValueError(f"optimizer state key {key!r} of {name} holds '/'")
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": optim["param_groups"], "scalars": scalars}


def save(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Write this rank's shards into ``directory`` (the same directory on every rank: a shared file system)
    and, on rank 0, ``dcp_metadata.json`` in place of DCP's pickled ``.metadata``. Collective.

    Returns the optimizer's non-tensor parts (see ``flat_state``) for ``state.json``."""
    import torch.distributed.checkpoint as dcp

    tensors, rest = flat_state(model, optimizer)
    with _one_process_quiet():
        metadata = dcp.save(tensors, no_dist=_no_dist(),
                            storage_writer=dcp.FileSystemWriter(directory, single_file_per_rank=True, sync_files=True))
    if _rank() == 0:  # the coordinator: DCP's returned Metadata is the one it pickled (not read back)
        if metadata is None or metadata.storage_data is None:
            raise RuntimeError("torch.distributed.checkpoint.save returned no index on rank 0")
        pickled = os.path.join(directory, DCP_PICKLED_METADATA)
        with open(os.path.join(directory, DCP_METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata_to_json(metadata), f, indent=None, separators=(",", ":"))
            f.write("\n")
        os.unlink(pickled)
    return rest


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process (it warns whenever there is no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _no_dist() -> bool:
    """One process without a process group (DCP would warn that it assumes so)."""
    return not (dist.is_available() and dist.is_initialized())


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ------------------------------------------------------------------------------------------ JSON metadata


def metadata_to_json(metadata: Any) -> dict:
    """DCP's ``Metadata`` (tensor entries only) as JSON-able data; raises ``ValueError`` on anything else."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"DCP entry {key!r} is not a tensor ({type(meta).__name__}); only tensors are saved")
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"DCP entry {key!r} has dtype {dtype}, which the JSON index does not support")
        tensors[key] = {"dtype": dtype, "size": list(meta.size),
                        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in meta.chunks]}
    storage = []
    for index, info in metadata.storage_data.items():
        if info.transform_descriptors:
            raise ValueError(f"DCP entry {index.fqn!r} was written through transforms {info.transform_descriptors}")
        storage.append({"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset),
                        "index": index.index, "file": info.relative_path, "start": int(info.offset),
                        "length": int(info.length)})
    return {"format": _JSON_FORMAT, "version": metadata.version, "tensors": tensors, "storage": storage}


def metadata_from_json(data: Any, where: str) -> Any:
    """DCP's ``Metadata`` from ``metadata_to_json``'s output, each field checked (``CheckpointError``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {where} is corrupt: {DCP_METADATA_FILE} {what}")

    def ints(value: Any, what: str, length: int | None = None) -> list[int]:
        if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for v in value)):
            raise bad(f"{what} must be a list of integers >= 0")
        if length is not None and len(value) != length:
            raise bad(f"{what} must have {length} entries")
        return value

    if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
        raise bad(f"has an unknown format (expected format {_JSON_FORMAT})")
    tensors, storage = data.get("tensors"), data.get("storage")
    if not isinstance(tensors, dict) or not isinstance(storage, list):
        raise bad("must hold 'tensors' (a mapping) and 'storage' (a list)")
    entries = {}
    for key, meta in tensors.items():
        if not isinstance(meta, dict) or meta.get("dtype") not in _DTYPES:
            raise bad(f"entry {key!r} has no known dtype")
        size = ints(meta.get("size"), f"{key!r} size")
        chunks = meta.get("chunks")
        if not isinstance(chunks, list) or not chunks:
            raise bad(f"entry {key!r} lists no chunks")
        parsed = []
        for chunk in chunks:
            if not isinstance(chunk, dict):
                raise bad(f"entry {key!r} has a chunk that is not a mapping")
            offsets = ints(chunk.get("offsets"), f"{key!r} chunk offsets", len(size))
            sizes = ints(chunk.get("sizes"), f"{key!r} chunk sizes", len(size))
            if any(o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
                raise bad(f"entry {key!r} has a chunk outside its size {size}")
            parsed.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
        entries[key] = TensorStorageMetadata(properties=TensorProperties(dtype=_DTYPES[meta["dtype"]]),
                                             size=torch.Size(size), chunks=parsed)
    storage_data = {}
    for item in storage:
        if not isinstance(item, dict) or item.get("fqn") not in entries:
            raise bad("has a storage entry for no listed tensor")
        file = item.get("file")
        if not (isinstance(file, str) and is_data_file(file)):
            raise bad(f"names {file!r} as a data file (only __<rank>_<n>.distcp inside the checkpoint)")
        start, length = ints([item.get("start"), item.get("length")], f"{item['fqn']!r} start / length")
        offset = item.get("offset")
        offset = None if offset is None else torch.Size(ints(offset, f"{item['fqn']!r} offset"))
        index = item.get("index")
        if index is not None and not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
            raise bad(f"{item['fqn']!r} index must be an integer >= 0")
        storage_data[MetadataIndex(item["fqn"], offset, index)] = _StorageInfo(file, start, length)
    version = data.get("version")
    return Metadata(state_dict_metadata=entries, planner_data={k: (k,) for k in entries}, storage_data=storage_data,
                    storage_meta=StorageMeta(), version=version if isinstance(version, str) else None)


def read_metadata_file(ckpt_dir: str) -> Any:
    """``dcp_metadata.json`` of a checkpoint as DCP's ``Metadata`` (``CheckpointError`` when unreadable)."""
    path = os.path.join(ckpt_dir, DCP_METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {DCP_METADATA_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {DCP_METADATA_FILE} ({err})") from None
    return metadata_from_json(data, ckpt_dir)


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class JsonMetadataReader(FileSystemReader):
        """DCP's file-system reader with the index from ``dcp_metadata.json`` (parsed, never unpickled)."""

        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # DCP's per-rank fallback: there is no per-rank index
                raise FileNotFoundError("a centrifuge checkpoint has one index, dcp_metadata.json")
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    return JsonMetadataReader


# ------------------------------------------------------------------------------------------------ loading


def check(ckpt_dir: str, metadata: Any, targets: dict[str, torch.Tensor]) -> None:
    """The checkpoint's tensors must be exactly ``targets``' names with the same global shapes and dtypes
    (``CheckpointError`` naming the first difference). Nothing is modified."""
    saved = metadata.state_dict_metadata
    for key, target in targets.items():
        if key not in saved:
            what = "model" if key.startswith(MODEL_PREFIX) else "optimizer state"
            raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: it has no {what} "
                                  f"{key.split('/', 1)[1]}")
        if tuple(saved[key].size) != tuple(target.shape):
            raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: {key} is "
                                  f"{list(saved[key].size)} there but {list(target.shape)} in this run")
        if saved[key].properties.dtype != target.dtype:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: {key} is "
                                  f"{saved[key].properties.dtype} there but {target.dtype} in this run")
    extra = sorted(set(saved) - set(targets))
    if extra:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: {extra[0]} is not in this run")
    covered: dict[str, int] = {}
    for index in metadata.storage_data:
        covered[index.fqn] = covered.get(index.fqn, 0) + 1
    for key, meta in saved.items():
        if covered.get(key, 0) != len(meta.chunks):
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {DCP_METADATA_FILE} locates "
                                  f"{covered.get(key, 0)} of the {len(meta.chunks)} chunks of {key}")
        if sum(_numel(c.sizes) for c in meta.chunks) < _numel(meta.size):
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: the chunks of {key} do not cover it")


def _numel(size: Any) -> int:
    n = 1
    for s in size:
        n *= int(s)
    return n


def load(ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Read a sharded checkpoint into ``model`` and ``optimizer`` (any number of ranks, or one process).

    Call only after ``read_state(verify=True)``: every file's sha256 has been checked. The index is parsed
    from JSON and checked against this run's model and optimizer (names, global shapes, dtypes) before DCP
    reads any shard; only then do the weights and the AdamW state change. Collective under FSDP2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    metadata = read_metadata_file(ckpt_dir)
    targets, _ = flat_state(model, optimizer)
    check(ckpt_dir, metadata, targets)
    try:
        with _one_process_quiet():
            dcp.load(targets, storage_reader=_reader_class()(ckpt_dir, metadata), no_dist=_no_dist())
    except Exception as err:  # the files matched their sha256, so this is a writer's bug or a torch change
        raise CheckpointError(f"checkpoint {ckpt_dir}: DCP could not read it ({' '.join(str(err).split())})") \
            from None
    weights = {k[len(MODEL_PREFIX):]: v for k, v in targets.items() if k.startswith(MODEL_PREFIX)}
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in targets.items():
        if key.startswith(OPTIM_PREFIX):
            name, _, sub = key[len(OPTIM_PREFIX):].rpartition("/")
            per_param.setdefault(name, {})[sub] = value
    for name, values in (state.get("optimizer_scalars") or {}).items():
        per_param.setdefault(name, {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in state["optimizer_groups"]]
    options = StateDictOptions(strict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=options)
