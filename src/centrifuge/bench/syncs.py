"""Count the operations that make the host wait for the GPU, on any device (the CPU included).

A token-sparse step on a GPU is host-bound (profiled on an H200: ~15 ``cudaStreamSynchronize`` a step against
the dense step's 6), so every device→host read is worth finding. CUDA's own ``torch.cuda.set_sync_debug_mode``
needs a GPU; this counter works on the CPU too, because the ops that force a sync are known by name: those that
read a value back (``.item()``, ``bool(t)``, ``int(t)``: ``aten::_local_scalar_dense``; ``t.tolist()``, wrapped
here since it bypasses the dispatcher) and those whose output *size* depends on the data (``nonzero``, ``unique``,
``masked_select``, boolean indexing, ``repeat_interleave`` without ``output_size``). Each hit is recorded with
the first frame of ``centrifuge`` code that led to it, so a test can hold the step to a budget and a person can
see where the reads are.

``Tensor.cpu()`` is counted too (wrapped: on the CPU it is a no-op that never reaches the dispatcher), as the read
it is on a GPU. Not seen: ``.to("cpu")`` and syncs inside a library's own C++ code.
"""

from __future__ import annotations

import collections
import dataclasses
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN = torch.ops.aten
# Ops whose result is read by the host (a scalar) or whose output shape depends on the data.
SYNCING_OPS = {
    _ATEN._local_scalar_dense.default: "item",
    _ATEN.nonzero.default: "nonzero",
    _ATEN.nonzero.out: "nonzero",
    _ATEN._unique2.default: "unique",
    _ATEN.unique_dim.default: "unique",
    _ATEN.unique_consecutive.default: "unique",
    _ATEN.masked_select.default: "masked_select",
    _ATEN.repeat_interleave.Tensor: "repeat_interleave",
    _ATEN.is_nonzero.default: "item",
    _ATEN.equal.default: "equal",
}


# Ops that allocate or describe but run no kernel on a GPU (not counted as launches).
_NOT_LAUNCHES = {"aten::empty.memory_format", "aten::empty_strided", "aten::_local_scalar_dense",
                 "aten::detach", "aten::lift_fresh"}


@dataclasses.dataclass
class SyncRecord:
    """One host-syncing op: its kind and the ``file:line function`` of the centrifuge frame that caused it."""

    kind: str
    site: str


def _site() -> str | None:
    """The innermost frame in centrifuge's own code (not this module), else the innermost frame outside torch;
    None for ops inside ``torch.optim`` (the optimizers' step counters live on the CPU: no GPU sync)."""
    frames = [f for f in traceback.extract_stack() if not f.filename.endswith("bench/syncs.py")]
    if any("/torch/optim/" in f.filename for f in frames):
        return None
    for frame in reversed(frames):
        if "centrifuge" in frame.filename:
            return f"{frame.filename.split('centrifuge/')[-1]}:{frame.lineno} {frame.name}"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"


def _record(records: list[SyncRecord], kind: str) -> None:
    site = _site()
    if site is not None:
        records.append(SyncRecord(kind, site))


class _Counter(TorchDispatchMode):
    def __init__(self, records: list[SyncRecord], launches: collections.Counter | None):
        super().__init__()
        self.records, self.launches = records, launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.launches is not None and not func.is_view and func.name() not in _NOT_LAUNCHES:
            site = _site()
            if site is not None:
                self.launches[(func.name().removeprefix("aten::"), site)] += 1
        kind = SYNCING_OPS.get(func)
        if kind is None and func is _ATEN.index.Tensor:  # x[bool_mask] is a nonzero underneath
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                kind = "bool_index"
        if kind is None and func is _ATEN.index_put_.default:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                kind = "bool_index"
        if kind is not None:
            _record(self.records, kind)
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """``with HostSyncs() as syncs: ...`` records every host-syncing op run inside (``syncs.records``).

    ``Tensor.tolist()`` and ``Tensor.cpu()`` do not pass through the dispatcher on the CPU; they are counted by
    wrapping them for the duration."""

    def __init__(self, *, count_launches: bool = False) -> None:
        self.records: list[SyncRecord] = []
        # (op, site) → times, with ``count_launches``: every op that would run a kernel on a GPU — each costs the
        # host a dispatch and a launch (~5-20 µs), which a host-bound step pays in full
        self.launches: collections.Counter | None = collections.Counter() if count_launches else None
        self._mode = _Counter(self.records, self.launches)
        self._originals: dict[str, object] = {}

    def __enter__(self) -> HostSyncs:
        records = self.records
        for name in ("tolist", "cpu"):
            original = self._originals[name] = getattr(torch.Tensor, name)

            def counted(t: torch.Tensor, *args, _name=name, _original=original, **kwargs):
                _record(records, _name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    @property
    def count(self) -> int:
        return len(self.records)

    def by_site(self) -> collections.Counter:
        """{(kind, site): times}."""
        return collections.Counter((r.kind, r.site) for r in self.records)

    def table(self) -> str:
        rows = [f"{n:4d}  {kind:<17} {site}" for (kind, site), n in self.by_site().most_common()]
        return "\n".join([f"{self.count} host syncs", *rows])

