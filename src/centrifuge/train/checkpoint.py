"""Checkpoints that resume a run exactly, written atomically, read without unpickling anything.

Layout of ``<run>/checkpoints/step-0000120/``:

- ``model.safetensors`` + ``config.json`` (+ the tokenizer files): also a loadable Hugging Face directory;
- ``optimizer.safetensors``: every optimizer state tensor, keyed ``"<parameter name>::<state key>"``
  (e.g. ``model.norm.weight::exp_avg``), so state follows parameters by name, not by position;
- ``rng.safetensors``: torch CPU (and CUDA) generator states as uint8 tensors;
- ``plugins.safetensors`` (when a plug-in has state, e.g. neuron omission's importance statistics):
  tensors keyed ``"<plug-in>::<name>"``;
- ``state.json`` (written last): step, data position, scheduler state, optimizer hyper-parameters per
  group (parameters by name), python and numpy RNG states, the run's config, and the size of every file.

Under ``torchrun`` (``centrifuge.train.distributed``) there are two layouts (``checkpoint.format``):

- **full** (one process, DDP; FSDP2 with ``format: full``): the files above, written by rank 0. DDP ranks hold
  identical weights; FSDP2 shards are gathered (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``full_state_dict``, to rank 0's CPU) and, on loading, every rank reads the files and keeps its shard.
- **sharded** (the default under FSDP2; ``format_version`` 3, ``"layout": "sharded"``): weights and AdamW state
  through ``torch.distributed.checkpoint``, every rank writing its own shards (``__<rank>_0.distcp``) and one
  index, ``dcp_metadata.json``, instead of ``model.safetensors`` / ``optimizer.safetensors``; nothing is
  gathered but the Hugging Face export ``model.safetensors`` (``checkpoint.full_weights``: every checkpoint,
  or only the last). DCP's own pickled index is never written nor read (``centrifuge.train.sharded_checkpoint``).

Both resume on any number of ranks (DCP reshards; a full checkpoint is split by FSDP2 or loaded whole): the
data order is global and ``state.json`` records ``world_size``. Every rank's torch RNG state is stored
(``rng.safetensors``: rank 0's under the plain keys, rank r's as ``rank<r>/<key>``); with the same number of
ranks each takes its own back, with another number they must all have been equal (``check_world_size``;
otherwise one ``CheckpointError``). The files must be on a file system every rank sees.

A checkpoint is written in a temporary directory next to its final place and moved there with one
``os.replace``, so a crash (even SIGKILL) leaves either the whole checkpoint or none. Only the newest
``keep`` are kept. Loading checks every file (present, full size, sha256, readable header or index, same
parameter names and shapes as the model) before touching the model, so a bad checkpoint gives one
``CheckpointError`` and changes nothing. Nothing is fully unpickled: safetensors files are parsed, DCP's index
is JSON, and DCP's shards are read tensor by tensor with ``torch.load(weights_only=True)`` (torch's
restricted unpickler) only after their sha256 matched ``state.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_model_weights
from torch import nn

from centrifuge._io import fsync_path, sha256_file, write_json
from centrifuge.train import distributed, sharded_checkpoint
from centrifuge.train.errors import CheckpointError

FORMAT_VERSION = 2  # 2: every file listed with size and sha256; 1 (sizes of the tensor files only) still loads
SHARDED_FORMAT_VERSION = 3  # the sharded layout (DCP shards + dcp_metadata.json); older readers refuse it
_READABLE_VERSIONS = (1, 2, 3)
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
PLUGINS_FILE = "plugins.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SEP = "::"  # between parameter name and state key in optimizer.safetensors


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint of a run, oldest first. Temporary directories are skipped."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------ saving


def save_checkpoint(
    run_dir: str,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, Any],
    tokenizer_dir: str | None = None,
    keep: int = 2,
    plugin_state: dict[str, dict[str, torch.Tensor]] | None = None,
    sharded: bool | None = None,
    full_weights: bool = True,
) -> str:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``. Returns its path.

    ``extra`` (JSON-able: data position, config, eval history...) is stored in ``state.json``;
    ``plugin_state`` (plug-in name -> tensors) in ``plugins.safetensors``. ``sharded`` (None: when the model
    is FSDP2): weights and optimizer state through DCP, each rank writing its shards
    (``centrifuge.train.sharded_checkpoint``); ``full_weights`` then says whether ``model.safetensors`` (the
    Hugging Face export, gathered onto rank 0) is written too. A full checkpoint always has it."""
    root = os.path.join(run_dir, CHECKPOINTS)
    final = os.path.join(root, checkpoint_name(step))
    if os.path.isdir(final):  # e.g. SIGTERM right after the periodic save of the same step
        return final
    # Collectives first, on every rank (each checked `final` above before rank 0 can have created it).
    rank, world = _rank_world()
    model = distributed.unwrap(model)
    fsdp = distributed.is_fsdp2(model)
    sharded = fsdp if sharded is None else sharded
    full_weights = full_weights or not sharded
    full_model = _gathered_model_state(model) if fsdp and full_weights else None
    full_optim = _gathered_optimizer_state(model, optimizer) if fsdp and not sharded else None
    rng = _torch_rng_tensors_all_ranks(rank, world)
    tmp = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{checkpoint_name(step)}-", dir=root)
    optim_rest = None
    if sharded:
        tmp = _rank_zero_path(tmp, world)
        try:
            optim_rest = sharded_checkpoint.save(tmp, model, optimizer)  # every rank writes its shards
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if rank != 0:
        dist.barrier()  # rank 0 has written (and pruned) the checkpoint
        return final
    try:
        if full_weights and fsdp:
            save_file(_without_aliases(model, full_model), os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        elif full_weights:
            save_model(model, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        if hasattr(model, "config") and hasattr(model.config, "to_json_file"):
            model.config.to_json_file(os.path.join(tmp, "config.json"))
        if tokenizer_dir is not None:
            for name in tokenizer_files(tokenizer_dir):  # plain files only: no symlink is followed
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name), follow_symlinks=False)
        if sharded:
            groups = _json_groups(optim_rest["param_groups"])
            scalars = optim_rest["scalars"]
        else:
            by_name = (_optimizer_by_name(model, optimizer) if full_optim is None
                       else _named_full_optimizer(full_optim))
            groups, scalars = _save_optimizer(*by_name, os.path.join(tmp, OPTIMIZER_FILE))
        save_file(rng, os.path.join(tmp, RNG_FILE))
        plugin_tensors = {f"{plugin}{_SEP}{key}": t.detach().contiguous().cpu()
                          for plugin, tensors in (plugin_state or {}).items() for key, t in tensors.items()}
        if plugin_tensors:
            save_file(plugin_tensors, os.path.join(tmp, PLUGINS_FILE))
        # Every file of the checkpoint (weights, optimizer, RNG, plug-ins, DCP shards and index, config.json,
        # tokenizer) with its size and sha256, verified on resume before anything is loaded. Hashing reads
        # each file once more (from the page cache, ~1 GB/s), at every save and once on resume.
        files = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256_file(os.path.join(tmp, n))}
                 for n in sorted(os.listdir(tmp))}
        state = {
            "format_version": SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION,
            "layout": "sharded" if sharded else "full",
            "step": step,
            "world_size": world,
            "files": files,
            "optimizer_groups": groups,
            "optimizer_scalars": scalars,
            "scheduler": _json_able(scheduler.state_dict()) if scheduler is not None else None,
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            **extra,
        }
        write_json(os.path.join(tmp, STATE_FILE), state)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep=keep)
    if world > 1:
        dist.barrier()
    return final


def _rank_zero_path(path: str | None, world: int) -> str:
    """Rank 0's ``path`` on every rank (the temporary directory all ranks write their shards into)."""
    if world == 1:
        return path
    box = [path]
    dist.broadcast_object_list(box, src=0)  # between this job's own processes; nothing is read from disk
    return box[0]


def _json_groups(groups: list[dict]) -> list[dict]:
    """Optimizer param groups (parameters by name) as ``state.json`` holds them."""
    return [{**_json_able({k: v for k, v in g.items() if k != "params"}), "params": list(g["params"])}
            for g in groups]


def prune_checkpoints(run_dir: str, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and temporary directories left by killed writers."""
    root = os.path.join(run_dir, CHECKPOINTS)
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        trash = os.path.join(root, ".trash-" + os.path.basename(path))
        os.replace(path, trash)  # out of sight first: a crash mid-delete never leaves a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)


def _optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """(parameter name -> its optimizer state, param groups with parameter names) of a local optimizer."""
    names = _param_names(model)
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a parameter that is not part of the model")
            group_names.append(name)
            if p in optimizer.state:
                state[name] = optimizer.state[p]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
    return state, groups


def _named_full_optimizer(full: dict[str, Any]) -> tuple[dict, list]:
    """The same from ``get_optimizer_state_dict(full_state_dict=True)``, which is keyed by name already."""
    return full["state"], full["param_groups"]


def _save_optimizer(state: dict[str, dict[str, Any]], groups: list[dict], path: str) -> tuple[list, dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}{_SEP}{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, path)
    return _json_groups(groups), scalars


def _gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on rank 0's CPU (empty on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state of an FSDP2 model, keyed by parameter name, on rank 0's CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of tied parameters, grouped (the first name of each group is the one ``named_parameters`` gives)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _without_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with one name per tied parameter (safetensors refuses shared tensors; ``save_model`` does
    the same for a local model)."""
    drop = {name for names in _alias_groups(model) for name in names[1:]}
    return {k: v.contiguous() for k, v in state.items() if k not in drop}


# ----------------------------------------------------------------------------------------------- loading


def read_state(ckpt_dir: str, *, verify: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after checking its fields' types and that every file it lists is
    there in full (a plain file: no symlink, no path outside the checkpoint); with ``verify`` also each
    file's sha256 (of the files named in ``only``, when given; ``verify_files`` splits them over ranks).
    Raises ``CheckpointError``; reads nothing but JSON and (with ``verify``) file bytes."""
    state_path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    if os.path.islink(ckpt_dir) or os.path.islink(state_path):
        raise CheckpointError(f"checkpoint {ckpt_dir} is a symbolic link or holds one ({STATE_FILE}); "
                              "a checkpoint must hold its own files")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {STATE_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {STATE_FILE} is not valid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: cannot read {STATE_FILE} ({err.strerror})") from None
    if not isinstance(state, dict) or state.get("format_version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unknown format (expected format_version {FORMAT_VERSION})")
    _check_state_fields(ckpt_dir, state)
    for name, entry in state["files"].items():
        path = os.path.join(ckpt_dir, name)
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {name} is not a plain file")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")
        size = entry if isinstance(entry, int) else entry["size"]
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {name} has {actual} bytes, {size} were written")
        if verify and (only is None or name in only) and isinstance(entry, dict) \
                and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {name} does not match the sha256 recorded "
                                  f"in {STATE_FILE} (the file changed after it was written)")
    return state


def _check_state_fields(ckpt_dir: str, state: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` unless the fields a resume reads have the types ``save_checkpoint`` writes.

    ``state.json`` is data from disk: a wrong type must end in one clear error here, before anything is
    written, not in a traceback in the middle of the run. The RNG states are tried on throw-away generators."""

    def bad(what: str, value: Any) -> CheckpointError:
        return CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {STATE_FILE} {what} (got {_short(value)})")

    def integer(key: str, low: int) -> None:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise bad(f"{key!r} must be an integer >= {low}", value)

    integer("step", 0)
    state.setdefault("world_size", 1)
    integer("world_size", 1)
    files = state.get("files")
    if not isinstance(files, dict):
        raise bad("'files' must map file names to sizes", files)
    for name, entry in files.items():
        if not _plain_name(name):
            raise bad("'files' may only name files inside the checkpoint (no '/', '..' or absolute path)", name)
        if state["format_version"] == 1:
            ok = isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0
        else:
            ok = (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                  and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
        if not ok:
            raise bad(f"'files' entry of {name} must be " + ("a size" if state["format_version"] == 1
                                                           else "{size, sha256}"), entry)
    sharded = state["format_version"] >= SHARDED_FORMAT_VERSION
    if state.get("layout", "sharded" if sharded else "full") != ("sharded" if sharded else "full"):
        raise bad(f"'layout' must be {'sharded' if sharded else 'full'} in format {state['format_version']}",
                  state.get("layout"))
    required = [sharded_checkpoint.DCP_METADATA_FILE, RNG_FILE] if sharded else [MODEL_FILE, OPTIMIZER_FILE, RNG_FILE]
    if state["format_version"] >= 2 and (missing := [n for n in required if n not in files]):
        raise bad(f"'files' does not list {', '.join(missing)}", sorted(files))
    if sharded and not any(sharded_checkpoint.is_data_file(n) for n in files):
        raise bad("'files' lists no DCP data file (__<rank>_0.distcp)", sorted(files))
    # The caller's `extra` keys (`centrifuge train`'s): checked when present; the sampler checks its own.
    for key in ("config", "scheduler", "first_eval", "last_eval", "sampler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(f"{key!r} must be a mapping", state[key])
    for key in ("first_eval", "last_eval"):
        point = state.get(key)
        if point and not (isinstance(point.get("step"), int) and isinstance(point.get("tokens"), int)
                          and isinstance(point.get("loss"), (int, float))):
            raise bad(f"{key!r} must hold step, loss and tokens", point)
    if not isinstance(state.get("seconds", 0.0), (int, float)) or isinstance(state.get("seconds"), bool):
        raise bad("'seconds' must be a number", state.get("seconds"))
    groups = state.get("optimizer_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                        for g in groups)):
        raise bad("'optimizer_groups' must be a list of groups with 'params'", groups)
    for group in groups:
        for key, value in group.items():
            if key in ("lr", "eps", "weight_decay", "initial_lr") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise bad(f"optimizer group {key!r} must be a finite number", value)
            if key == "betas" and not (isinstance(value, list) and len(value) == 2
                                       and all(isinstance(b, (int, float)) for b in value)):
                raise bad("optimizer group 'betas' must be two numbers", value)
    if not isinstance(state.get("optimizer_scalars", {}), dict):
        raise bad("'optimizer_scalars' must be a mapping", state.get("optimizer_scalars"))
    try:  # the exact checks random / numpy make, on generators nobody uses
        if state.get("python_rng") is not None:
            version, internal, gauss = state["python_rng"]
            random.Random().setstate((version, tuple(internal), gauss))
        if state.get("numpy_rng") is not None:
            kind, keys, pos, has_gauss, cached = state["numpy_rng"]
            np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError) as err:
        raise bad(f"python_rng / numpy_rng is not a random generator state ({err})", "…") from None


def _plain_name(name: Any) -> bool:
    """A file name that stays inside its directory: no separator, not '.', '..' or empty, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def tokenizer_files(directory: str) -> list[str]:
    """The file names of a run's ``tokenizer/`` directory, sorted; ``CheckpointError`` when it holds
    anything but plain files (a symlink would copy its target into every checkpoint, a subdirectory
    would crash the first checkpoint)."""
    names = sorted(os.listdir(directory))
    for name in names:
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path):
            kind = "a symbolic link" if os.path.islink(path) else "not a plain file"
            raise CheckpointError(f"{directory} holds {name}, which is {kind}; a run's tokenizer directory may "
                                  "hold only the tokenizer's own files")
    return names


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_checkpoint(
    ckpt_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> dict[str, Any]:
    """Restore model, optimizer and scheduler from ``ckpt_dir``; return its ``state.json`` contents.

    Everything is validated before anything is modified: every file's size and sha256 (split over the ranks
    under torchrun, the verdict shared), headers or the DCP index against this run's model and optimizer, the
    RNG file, the scheduler state, and the number of ranks (``check_world_size``). RNG states are not
    applied here: call ``restore_rng(state)`` right before training resumes, after anything else that draws
    random numbers. A sharded checkpoint (``layout: sharded``) loads into any number of ranks; a full one
    into any number too (FSDP2 keeps its shards of the full tensors)."""
    state = read_state(ckpt_dir)
    verify_files(ckpt_dir, state)  # sha256 of every file before any of them is parsed
    model = distributed.unwrap(model)
    _header_shapes(ckpt_dir, RNG_FILE)
    try:
        rng_tensors = load_file(os.path.join(ckpt_dir, RNG_FILE))
    except Exception as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {RNG_FILE}: {err}") from None
    _check_rng_tensors(ckpt_dir, rng_tensors)
    check_world_size(ckpt_dir, state, rng_tensors)
    if scheduler is not None and state.get("scheduler") is not None:
        _check_scheduler_state(ckpt_dir, scheduler, state["scheduler"])
    if state.get("layout") == "sharded":
        _check_optimizer(ckpt_dir, model, optimizer, state, {})
        sharded_checkpoint.load(ckpt_dir, model, optimizer, state)
    else:
        _load_full(ckpt_dir, model, optimizer, state)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    state["_rng_tensors"] = rng_tensors  # for restore_rng, once every random init is done
    return state


def verify_files(ckpt_dir: str, state: dict[str, Any]) -> None:
    """The sha256 of every file ``state.json`` lists (``CheckpointError`` on the first mismatch, on every rank).

    Under torchrun each rank hashes every world-th file and the ranks share their findings (one
    ``all_gather_object`` of error messages this job made itself), so a sharded checkpoint is read once in all,
    not once per rank."""
    rank, world = _rank_world()
    names = sorted(state["files"])
    problem = None
    try:
        read_state(ckpt_dir, verify=True, only=names[rank::world])
    except CheckpointError as err:
        problem = str(err)
    if world > 1:
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)


def _load_full(ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer from ``model.safetensors`` / ``optimizer.safetensors`` (one process, DDP, FSDP2)."""
    model_shapes = _header_shapes(ckpt_dir, MODEL_FILE)
    optim_shapes = _header_shapes(ckpt_dir, OPTIMIZER_FILE)
    _check_model(ckpt_dir, model, model_shapes)
    _check_optimizer(ckpt_dir, model, optimizer, state, optim_shapes)
    device = next(model.parameters()).device
    sharded = distributed.is_fsdp2(model)
    try:
        if sharded:
            weights = load_file(os.path.join(ckpt_dir, MODEL_FILE))
            missing, unexpected = [], []
        else:
            missing, unexpected = load_model_weights(model, os.path.join(ckpt_dir, MODEL_FILE), device=str(device))
        optim_tensors = load_file(os.path.join(ckpt_dir, OPTIMIZER_FILE))
    except Exception as err:  # a header that parses but data that does not
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {err}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds another model ({missing or unexpected})")
    if sharded:
        _load_sharded(model, optimizer, state, weights, optim_tensors)
    else:
        optimizer.load_state_dict(_optimizer_state_dict(model, optimizer, state, optim_tensors))


def _check_rng_tensors(ckpt_dir: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every torch CPU generator state of ``rng.safetensors`` must be one ``torch.set_rng_state`` accepts
    (tried on a throw-away generator), so that ``restore_rng`` cannot fail once the run has written files."""
    cpu = {k: v for k, v in tensors.items() if k.split("/")[-1] == "torch_cpu"}
    if "torch_cpu" not in cpu:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {RNG_FILE} has no torch_cpu state")
    for key, value in cpu.items():
        try:
            torch.Generator().set_state(value)
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {RNG_FILE} {key} is not a generator state "
                                  f"({' '.join(str(err).split())})") from None


def _check_scheduler_state(ckpt_dir: str, scheduler: torch.optim.lr_scheduler.LRScheduler,
                           saved: dict[str, Any]) -> None:
    """The saved scheduler state must have exactly this scheduler's keys, each of the same JSON kind:
    ``load_state_dict`` sets every key as an attribute, so anything else would break the run later."""
    current = _json_able(scheduler.state_dict())
    if set(saved) != set(current):
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: its scheduler state has keys {sorted(saved)}, "
                              f"expected {sorted(current)}")
    for key, value in current.items():
        number = (int, float)
        same = (isinstance(saved[key], number) and not isinstance(saved[key], bool)) if isinstance(value, number) \
            and not isinstance(value, bool) else type(saved[key]) is type(value)
        if key == "lr_lambdas":  # LambdaLR copies dict entries into its functions' __dict__: accept none
            same = saved[key] == value
        elif key in ("base_lrs", "_last_lr"):
            same = same and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in saved[key])
        if not same:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: scheduler {key!r} is {_short(saved[key])}")


def check_world_size(ckpt_dir: str, state: dict[str, Any], rng_tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to resume on another number of ranks when that would not continue the run exactly.

    The data order is global (every rank draws the same global micro-batch and keeps its share) and the
    weights and optimizer state load into any number of ranks, so only the random generators can tie a run
    to its rank count: when every rank of the saving run had the same torch CPU generator state (ranks seed
    alike and draw alike: token selection runs on the global micro-batch, neuron plans are broadcast from rank
    0), every rank of the new run continues from it. When they differ (e.g. dropout drew per rank), resuming
    on another number of ranks is a ``CheckpointError``. CUDA generators follow rank 0's (``restore_rng``)."""
    saved, (_, world) = int(state.get("world_size", 1)), _rank_world()
    if saved == world:
        return
    cpu = [rng_tensors.get("torch_cpu" if r == 0 else f"rank{r}/torch_cpu") for r in range(saved)]
    if all(t is not None and torch.equal(t, cpu[0]) for t in cpu):
        return
    how = "one process" if saved == 1 else f"torchrun --nproc-per-node {saved}"
    raise CheckpointError(
        f"checkpoint {ckpt_dir} was written by a run of {saved} process(es) whose random generators differ "
        f"from rank to rank, and this run has {world}; resume with {how} (each rank's random stream belongs "
        "to its rank)"
    )


def _load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                  weights: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor]) -> None:
    """Full weights and optimizer state into an FSDP2 model: every rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for names in _alias_groups(model):  # the file holds one name per tied parameter
        present = next((weights[n] for n in names if n in weights), None)
        if present is not None:
            weights.update({n: present for n in names})
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in optim_tensors.items():
        name, _, sub = key.partition(_SEP)
        per_param.setdefault(name, {})[sub] = value
    for name, values in state.get("optimizer_scalars", {}).items():
        per_param.setdefault(name, {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in state["optimizer_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=options)


def load_plugin_state(ckpt_dir: str, plugins: dict[str, Any]) -> None:
    """Give each plug-in of ``plugins`` (name -> object with ``load_state_dict``) its saved tensors.

    A plug-in that has state now but none in the checkpoint (or the reverse) is a ``CheckpointError``: the
    run would not continue as it was."""
    path = os.path.join(ckpt_dir, PLUGINS_FILE)
    try:
        tensors = load_file(path) if os.path.isfile(path) else {}
    except Exception as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {PLUGINS_FILE}: {err}") from None
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        plugin, _, name = key.partition(_SEP)
        saved.setdefault(plugin, {})[name] = value
    stateful = {name for name, obj in plugins.items() if obj.state_dict()}
    if set(saved) - set(plugins):
        raise CheckpointError(f"checkpoint {ckpt_dir} holds state of {', '.join(sorted(set(saved) - set(plugins)))}, "
                              "which this run does not use (was the config changed?)")
    missing = stateful - set(saved)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no state for {', '.join(sorted(missing))}")
    for name, obj in plugins.items():
        if name in saved:
            try:
                obj.load_state_dict(saved[name])
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"checkpoint {ckpt_dir}: bad {name} state ({err})") from None


def _header_shapes(ckpt_dir: str, name: str) -> dict[str, tuple[int, ...]]:
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: cannot read {name} ({err})") from None


def _check_model(ckpt_dir: str, model: nn.Module, saved: dict[str, tuple[int, ...]]) -> None:
    expected = model.state_dict()
    by_storage: dict[int, list[str]] = {}  # tied weights share storage; the file holds one of the names
    for key, tensor in expected.items():
        by_storage.setdefault(_storage_key(tensor), []).append(key)
    for key, tensor in expected.items():
        if key in saved:
            if saved[key] != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} holds a different model: {key} is {list(saved[key])} there "
                    f"but {list(tensor.shape)} in this model"
                )
        elif not any(alias in saved for alias in by_storage[_storage_key(tensor)]):
            raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: it has no {key}")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds a different model: {extra[0]} is not in this model")


def _storage_key(tensor: torch.Tensor) -> int:
    """What tied tensors share: their storage, or for FSDP2 shards (``DTensor``, no storage of their own) the
    parameter object itself."""
    return id(tensor) if hasattr(tensor, "to_local") else tensor.untyped_storage().data_ptr()


def _check_optimizer(
    ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, saved: dict
) -> None:
    names = _param_names(model)
    current = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    stored = [g.get("params") for g in state.get("optimizer_groups", [])]
    if current != stored:
        raise CheckpointError(f"checkpoint {ckpt_dir}: its optimizer groups other parameters than this run's")
    shapes = {name: tuple(p.shape) for p in model.parameters() if (name := names.get(id(p)))}
    for key, shape in saved.items():
        name, _, _ = key.partition(_SEP)
        if name not in shapes:
            raise CheckpointError(f"checkpoint {ckpt_dir}: optimizer state for unknown parameter {name}")
        if len(shape) > 0 and shape != shapes[name]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds a different model: optimizer state {key} is {list(shape)}, "
                f"the parameter is {list(shapes[name])}"
            )


def _optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()``'s format (parameters as indices in group order) from names."""
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.partition(_SEP)
        per_param.setdefault(name, {})[sub] = value
    for name, values in state.get("optimizer_scalars", {}).items():
        per_param.setdefault(name, {}).update(values)
    index = 0
    packed_state: dict[int, dict[str, Any]] = {}
    groups = []
    for group in state["optimizer_groups"]:
        ids = []
        for name in group["params"]:
            if name in per_param:
                packed_state[index] = per_param[name]
            ids.append(index)
            index += 1
        # JSON turned tuples (betas) into lists; give the optimizer back what it stored
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": ids})
    return {"state": packed_state, "param_groups": groups}


# -------------------------------------------------------------------------------------------------- RNG


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _torch_rng_tensors_all_ranks(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank 0's RNG tensors under their plain keys plus rank r's as ``rank<r>/<key>`` (collective)."""
    own = _torch_rng_tensors()
    if world == 1:
        return own
    every: list[dict[str, torch.Tensor] | None] = [None] * world
    dist.all_gather_object(every, own)  # between this job's own processes; nothing is read from disk
    out = dict(every[0])
    for r in range(1, world):
        out.update({f"rank{r}/{key}": value for key, value in every[r].items()})
    return out


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def restore_rng(state: dict) -> None:
    """Apply the torch / python / numpy RNG states of a ``state`` returned by ``load_checkpoint``."""
    tensors = state["_rng_tensors"]
    rank, world = _rank_world()
    if world != int(state.get("world_size", 1)):  # another rank count: all ranks' states were equal (checked)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("rank")}
    elif rank > 0:
        prefix = f"rank{rank}/"
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if state.get("python_rng"):
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy_rng"):
        kind, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------------------------------- utils


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (tied parameters appear once, as in ``named_parameters``)."""
    return {id(p): name for name, p in model.named_parameters()}


def _json_able(value: Any) -> Any:
    """Drop what JSON cannot hold (callables, tensors become lists/floats) from scheduler/optimizer dicts."""
    if isinstance(value, dict):
        return {str(k): _json_able(v) for k, v in value.items() if not isinstance(v, Callable)}
    if isinstance(value, (list, tuple)):
        return [_json_able(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
