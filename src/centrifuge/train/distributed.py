"""Data-parallel training under ``torchrun``: process group, batch shares, DDP / FSDP2 wrapping.

``centrifuge train`` started by ``torchrun --nproc-per-node N`` reads ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` from the environment and joins one process group (gloo on the CPU, NCCL on CUDA, one GPU per
rank: ``cuda:LOCAL_RANK``). Started plainly it is one process, as before.

Batches: ``train.batch_size`` is the *global* micro-batch. The data order (``SequenceSampler``) is the
one-process order; every rank draws the same global micro-batch and keeps its contiguous share of
``batch_size / world_size`` sequences (``local_share``). So an N-rank run sees the same global batches,
in the same order, as a one-process run of the same config, and the step's loss is normalized by the
global kept count (``centrifuge.train.step.train_step``).

Strategies (``train.distributed``):

* ``ddp``: ``DistributedDataParallel`` around the model; gradients are averaged by DDP's reducer.
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer and on the root; each layer's
  weights are all-gathered in its forward / backward and its gradients reduce-scattered after its backward.
  The token-sparse layers run through each decoder layer's module call (``centrifuge.apply``), so FSDP2's
  hooks see them.
* ``auto``: ``ddp`` when the world has more than one rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp2")


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job. ``strategy`` is "none" for a one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(name: str, local_rank: int) -> str:
    """The device name for this rank: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun when CUDA
    is there. Raises ``ValueError`` for an explicit ``cuda:N`` with several ranks (they would share a GPU)."""
    if name.startswith("cuda:"):
        raise ValueError(f"train.device={name!r} names one GPU, but torchrun started {env_world_size()} ranks; "
                         "use 'auto' or 'cuda' (rank r uses cuda:LOCAL_RANK)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return name


def init_distributed(strategy: str, device: torch.device) -> Distributed:
    """Join the process group of a ``torchrun`` job (or take the one already initialized).

    Returns ``Distributed()`` (strategy "none") when there is one process. ``strategy`` is a
    ``train.distributed`` value; "auto" means ``ddp``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not (dist.is_available() and dist.is_initialized()):
        if env_world_size() <= 1:
            return Distributed()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Distributed(dist.get_rank(), world, local_rank, "ddp" if strategy == "auto" else strategy)


def shutdown() -> None:
    """Leave the process group (if this process joined one), and really tear it down now.

    ``destroy_process_group`` only drops torch's registry entries; the gloo process group itself (two worker
    threads and a TCP loop thread) is destroyed when its last reference goes. After FSDP2, DTensor's global
    caches keep one: the redistribute planner cache holds planners that hold the ``DeviceMesh`` strongly (its
    key is only a weak reference), and the mesh holds the group. The group then lived on into interpreter
    finalization, and tearing gloo's threads down there aborted the process now and then (``terminate
    called without an active exception``, SIGABRT on one rank, exit status -6 under torchrun). Releasing
    those caches first lets ``destroy_process_group`` destroy the group here, joining its threads while the
    interpreter is whole."""
    if dist.is_available() and dist.is_initialized():
        _release_dtensor_caches()
        gc.collect()  # the planners and specs form cycles with the meshes
        dist.destroy_process_group()
        gc.collect()


def _release_dtensor_caches() -> None:
    """Empty DTensor's module-level caches, which hold ``DeviceMesh`` objects (and so process groups).
    They are private torch APIs that move between versions: each is cleared only where it exists."""
    try:
        from torch.distributed.tensor import _redistribute
    except ImportError:  # no DTensor in this torch: nothing cached
        return
    for clear in (
        getattr(_redistribute, "clear_redistribute_planner_cache", None),
        getattr(getattr(_redistribute, "_gen_transform_infos", None), "cache_clear", None),
    ):
        if clear is not None:
            clear()
    try:
        from torch.distributed.tensor._collective_utils import MeshTopoInfo
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:
        return
    _clear_sharding_prop_cache()
    build = getattr(MeshTopoInfo, "build_from_mesh", None)
    if hasattr(build, "cache_clear"):
        build.cache_clear()


def local_share(batch: dict[str, torch.Tensor], info: Distributed) -> dict[str, torch.Tensor]:
    """This rank's rows of a global micro-batch: every [B, ...] field sliced to rows
    ``[rank * B / world, (rank + 1) * B / world)``. B must divide by the world size."""
    if not info.enabled:
        return batch
    size = next(iter(batch.values())).shape[0]
    if size % info.world_size:
        raise ValueError(f"a micro-batch of {size} sequences does not split over {info.world_size} ranks")
    share = size // info.world_size
    rows = slice(info.rank * share, (info.rank + 1) * share)
    return {name: value[rows] for name, value in batch.items()}


def wrap_model(model: nn.Module, info: Distributed, *, reshard_after_forward: bool = True,
               prefetch: int = 0) -> nn.Module:
    """The module ``train_step`` drives: ``model`` itself (one process, or FSDP2, which shards ``model`` in
    place: its parameters become ``DTensor`` shards, so build the optimizer afterwards) or a DDP wrapper.

    FSDP2 shards each decoder layer (``model.model.layers``) as its own unit, then the root (embeddings,
    final norm, LM head), the layout ``fully_shard``'s documentation recommends for transformers. Two knobs
    (``train.fsdp_reshard_after_forward``, ``train.fsdp_prefetch``) suit a short, token-sparse backward:

    - ``reshard_after_forward`` (True, FSDP2's default): each layer frees its all-gathered weights after its
      forward and all-gathers them again for its backward. False keeps them from forward to backward: one
      all-gather per layer and step instead of two, for the memory of every layer's full weights (the
      root never reshards after its forward either way). With a backward half as long (κ = 0.5) the second
      all-gather is harder to hide behind compute, which is what False removes.
    - ``prefetch`` (0: FSDP2's implicit prefetching, one layer ahead, issued when the CPU reaches it): k ≥ 1
      sets explicit prefetching (``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``)
      of the next k layers in forward order and the previous k in backward order, so their all-gathers are
      issued before the current layer's compute instead of after it.

    Neither changes what is computed: gradients are those of the default layout (tested on gloo)."""
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 (layers to all-gather ahead), got {prefetch}")
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layers = list(model.model.layers)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
        fully_shard(model)
        if prefetch:
            for i, layer in enumerate(layers):
                ahead, behind = layers[i + 1:i + 1 + prefetch], layers[max(0, i - prefetch):i][::-1]
                if ahead:
                    layer.set_modules_to_forward_prefetch(ahead)
                if behind:
                    layer.set_modules_to_backward_prefetch(behind)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def averages_gradients(model: nn.Module) -> bool:
    """True when ``model`` is a wrapper whose backward already averages gradients over ranks (DDP, FSDP2)."""
    return isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp2(model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let the backward of this micro-batch synchronize gradients over ranks (``enabled``) or only
    accumulate them locally (every micro-batch but the last of a step: one all-reduce / reduce-scatter a
    step instead of one per micro-batch)."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks in place: one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]),
                                                                            grads, strict=True)])


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the [B, ...] tensors of all ranks along dim 0 (rank order; same shape on every rank).
    Bool tensors travel as uint8 (NCCL has no bool)."""
    world = dist.get_world_size()
    source = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    parts = [torch.empty_like(source) for _ in range(world)]
    dist.all_gather(parts, source)  # (the list form: gloo has no all_gather_into_tensor in every version)
    out = torch.cat(parts)
    return out.bool() if tensor.dtype == torch.bool else out
