"""Per-step omission plans: which MLP channels and KV groups of each decoder layer take part in a step.

Units and their weights (d = hidden size, m = intermediate size, H query heads, Hkv KV heads, D head dim,
G = H / Hkv query heads per KV group):

* MLP channel i: row i of ``gate_proj`` and ``up_proj`` (and of their biases), column i of ``down_proj``.
* KV group j: rows j·D … (j+1)·D−1 of ``k_proj`` / ``v_proj``; its G query heads j·G … (j+1)·G−1, i.e. rows
  j·G·D … (j+1)·G·D−1 of ``q_proj`` and the same columns of ``o_proj``. Whole groups are kept or omitted, so
  every kept query head still has its own key/value head and G stays the same (under plain multi-head
  attention a group is one head).

A ``LayerPlan`` holds the kept (and omitted) unit ids of one layer; an ``OmissionPlan`` maps layer index →
``LayerPlan`` for one step (a layer that is absent runs dense). Plans are plain values: the ``Omitter`` makes
one per step and sets it on the patched layers before the forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import torch


class OmissionRateError(ValueError):
    """An omission rate outside [0, 1)."""


def check_rate(rate: float, where: str = "") -> float:
    """Return ``rate`` as a float, or raise ``OmissionRateError`` unless 0 ≤ rate < 1."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        at = f" {where}" if where else ""
        raise OmissionRateError(
            f"omission rate must be in [0, 1) (the fraction of MLP channels / KV groups left out; 0 = dense), "
            f"got {rate}{at}"
        )
    return rate


def kept_count(total: int, rate: float, multiple: int = 1) -> int:
    """How many of ``total`` units to keep at omission ``rate``.

    ⌈(1 − rate)·total / multiple⌉·multiple, capped at ``total`` and never zero: rounding goes up, so a step
    never omits more than asked (tensor-core friendly sizes with ``multiple`` = 64 or 128).
    """
    check_rate(rate)
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    if rate == 0.0:
        return total
    k = math.ceil((1.0 - rate) * total / multiple - 1e-9) * multiple
    return max(1, min(total, k))


def _sorted_ids(ids, device) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device).flatten()
    return t.sort().values


def _complement(kept: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


def group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of the units ``groups`` [..., g] when unit j owns rows j·width … (j+1)·width − 1 → [..., g·width]
    (batched over leading dimensions: the ``Omitter`` does every layer in one kernel)."""
    offsets = torch.arange(width, device=groups.device)
    return (groups[..., None] * width + offsets).flatten(-2)


def keep_vector(dropped: torch.Tensor, total: int) -> torch.Tensor:
    """dropped [..., n − k] ids → bool [..., total], False at the dropped ids (batched over leading dims)."""
    keep = torch.ones(*dropped.shape[:-1], total, dtype=torch.bool, device=dropped.device)
    return keep.scatter_(-1, dropped, False)


class PlanBatch:
    """Kept / dropped ids of one unit kind in the plans of many layers, and what the plans derive from them,
    computed for all the layers at once (one kernel or two per tensor kind instead of one per layer) and only on
    first use: ``Omitter.plan`` sits on the critical path before the first forward kernel, so it stays cheap.

    Args:
        kind: "channels" (MLP channels) or "groups" (KV groups).
        kept: [L, k] int64, each row sorted; dropped: [L, n − k], the complements.
        num_units: n; heads_per_group, head_dim: G and D of the layers (for "groups").
    """

    def __init__(self, kind: str, kept: torch.Tensor, dropped: torch.Tensor, num_units: int, *,
                 heads_per_group: int = 1, head_dim: int = 1):
        if kind not in ("channels", "groups"):
            raise ValueError(f"PlanBatch kind must be 'channels' or 'groups', got {kind!r}")
        self.kind, self.kept, self.dropped, self.num_units = kind, kept, dropped, num_units
        self.widths = {"q": heads_per_group * head_dim, "kv": head_dim}
        self._done: dict[str, torch.Tensor] = {}

    def total(self, name: str) -> int:
        """Length of keep vector ``name`` ("keep_channels", "keep_q_rows", "keep_kv_rows")."""
        if name == "keep_channels":
            return self.num_units
        return self.num_units * self.widths[name.removeprefix("keep_").removesuffix("_rows")]

    def get(self, name: str, row: int) -> torch.Tensor:
        """Row ``row`` of ``name``: "q_rows", "kv_rows", "dropped_q_rows", "dropped_kv_rows" ([L, ·] ids) or a
        keep vector "keep_channels", "keep_q_rows", "keep_kv_rows" ([L, ·] bool)."""
        done = self._done.get(name)
        if done is None:
            done = self._done[name] = self._compute(name)
        return done[row]

    def _compute(self, name: str) -> torch.Tensor:
        if name == "keep_channels" and self.kind == "channels":
            return keep_vector(self.dropped, self.num_units)
        if self.kind != "groups":
            raise KeyError(f"PlanBatch({self.kind!r}) has no {name!r}")
        if name.startswith("keep_"):  # keep_q_rows / keep_kv_rows: the groups' keep vector, widened
            groups = self._done.get("keep_groups")
            if groups is None:
                groups = self._done["keep_groups"] = keep_vector(self.dropped, self.num_units)
            return groups.repeat_interleave(self.widths[name[5:-5]], dim=1)
        ids, rest = (self.dropped, name[8:]) if name.startswith("dropped_") else (self.kept, name)
        return group_rows(ids, self.widths[rest.removesuffix("_rows")])


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlan:
    """The kept units of one decoder layer for one step.

    Attributes:
        channels: [k] int64 sorted kept MLP channel ids, or None = all channels.
        dropped_channels: [m − k] int64 sorted omitted channel ids (None when ``channels`` is None).
        groups: [g] int64 sorted kept KV group ids, or None = all heads.
        dropped_groups: [Hkv − g] int64 sorted omitted group ids (None when ``groups`` is None).
        heads_per_group: G, query heads per KV group.
        head_dim: D.
    """

    channels: torch.Tensor | None = None
    dropped_channels: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    dropped_groups: torch.Tensor | None = None
    heads_per_group: int = 1
    head_dim: int = 1

    @classmethod
    def build(cls, *, channels: Sequence[int] | torch.Tensor | None = None,
              groups: Sequence[int] | torch.Tensor | None = None, num_channels: int = 0, num_groups: int = 0,
              heads_per_group: int = 1, head_dim: int = 1, device: torch.device | str | None = None) -> LayerPlan:
        """A plan from hand-picked kept ids (sorted here; omitted ids are the complement)."""
        kwargs = {}
        if channels is not None:
            kept = _sorted_ids(channels, device)
            kwargs.update(channels=kept, dropped_channels=_complement(kept, num_channels))
        if groups is not None:
            kept = _sorted_ids(groups, device)
            kwargs.update(groups=kept, dropped_groups=_complement(kept, num_groups))
        return cls(heads_per_group=heads_per_group, head_dim=head_dim, **kwargs)

    @property
    def omits_channels(self) -> bool:
        return self.channels is not None

    @property
    def omits_heads(self) -> bool:
        return self.groups is not None

    @functools.cached_property
    def q_rows(self) -> torch.Tensor | None:
        """[g·G·D] kept rows of ``q_proj`` (= kept columns of ``o_proj``), or None."""
        return self._rows("q_rows", self.groups, self.heads_per_group * self.head_dim)

    @functools.cached_property
    def kv_rows(self) -> torch.Tensor | None:
        """[g·D] kept rows of ``k_proj`` and ``v_proj``, or None."""
        return self._rows("kv_rows", self.groups, self.head_dim)

    @functools.cached_property
    def dropped_q_rows(self) -> torch.Tensor | None:
        return self._rows("dropped_q_rows", self.dropped_groups, self.heads_per_group * self.head_dim)

    @functools.cached_property
    def dropped_kv_rows(self) -> torch.Tensor | None:
        return self._rows("dropped_kv_rows", self.dropped_groups, self.head_dim)

    def _rows(self, name: str, groups: torch.Tensor | None, width: int) -> torch.Tensor | None:
        if groups is None:
            return None
        batch = self.__dict__.get("_groups_batch")
        return group_rows(groups, width) if batch is None else batch[0].get(name, batch[1])

    # Keep vectors (bool, False at omitted units), for the optimizer mask. The lengths are not stored in the
    # plan, so these need ``num_channels`` / ``num_groups``.

    def keep_channels(self, num_channels: int) -> torch.Tensor | None:
        """[m] bool: True at kept MLP channels, or None when the plan keeps every channel."""
        return self._keep("keep_channels", self.dropped_channels, num_channels)

    def keep_q_rows(self, num_groups: int) -> torch.Tensor | None:
        """[Hkv·G·D] bool: True at the kept rows of ``q_proj`` (= columns of ``o_proj``), or None."""
        return self._keep("keep_q_rows", self.dropped_q_rows, num_groups * self.heads_per_group * self.head_dim)

    def keep_kv_rows(self, num_groups: int) -> torch.Tensor | None:
        """[Hkv·D] bool: True at the kept rows of ``k_proj`` / ``v_proj``, or None."""
        return self._keep("keep_kv_rows", self.dropped_kv_rows, num_groups * self.head_dim)

    def _keep(self, name: str, dropped: torch.Tensor | None, total: int) -> torch.Tensor | None:
        if dropped is None:
            return None
        keep = self.__dict__.get("_" + name)
        if keep is None or keep.numel() != total:
            batch = self.__dict__.get("_channels_batch" if name == "keep_channels" else "_groups_batch")
            if batch is not None and batch[0].total(name) == total:
                keep = batch[0].get(name, batch[1])
            else:
                keep = keep_vector(dropped, total)
            self.__dict__["_" + name] = keep
        return keep

    def use_batch(self, batch: PlanBatch, row: int) -> LayerPlan:
        """Take row ids and keep vectors from ``batch`` (row ``row``: this layer), computed there for every layer
        at once on first use. Its kept / dropped ids must be this plan's channels or groups. Returns the plan."""
        # cached_property and _keep keep their values in __dict__ (frozen is no obstacle)
        self.__dict__["_groups_batch" if batch.kind == "groups" else "_channels_batch"] = (batch, row)
        return self

    def slices(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(kept output rows, kept input columns) of the projection ``name`` (e.g. "gate_proj", "o_proj")."""
        return self._pair(name, "")

    def dropped(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(omitted output rows, omitted input columns) of the projection ``name``: the complements of
        ``slices(name)``."""
        return self._pair(name, "dropped_")

    def _pair(self, name: str, prefix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        where = _PROJECTION_SLICES.get(name)
        if where is None:
            raise KeyError(f"no omission slice for projection {name!r}")
        ids = getattr(self, prefix + where[0])
        return (ids, None) if where[1] == 0 else (None, ids)


# projection → (the LayerPlan attribute of its kept ids, the weight dimension they index: 0 rows, 1 columns)
_PROJECTION_SLICES = {"gate_proj": ("channels", 0), "up_proj": ("channels", 0), "down_proj": ("channels", 1),
                      "q_proj": ("q_rows", 0), "k_proj": ("kv_rows", 0), "v_proj": ("kv_rows", 0),
                      "o_proj": ("q_rows", 1)}


@dataclasses.dataclass(frozen=True, eq=False)
class OmissionPlan:
    """Kept units of every decoder layer for one step.

    Attributes:
        rate: the omission rate asked for (kept sizes are rounded up, see ``kept_count``).
        layers: layer index → ``LayerPlan``; a layer that is absent runs dense.
        step: the training step the plan was made for (None for hand-made plans).
        dense_layers: layers the rate asked to omit in but that ran dense because their importance
            metric had no statistics yet (the first training forward gathers them).
    """

    rate: float
    layers: Mapping[int, LayerPlan]
    step: int | None = None
    dense_layers: tuple[int, ...] = ()

    def get(self, layer_idx: int) -> LayerPlan | None:
        return self.layers.get(layer_idx)

    def summary(self) -> dict[str, float | int | None]:
        """Numbers to log: the asked rate and the realised omitted fractions (no GPU synchronisation)."""
        def realised(kept_attr: str, dropped_attr: str) -> float | None:
            kept = dropped = 0
            for lp in self.layers.values():
                k, d = getattr(lp, kept_attr), getattr(lp, dropped_attr)
                if k is not None:
                    kept, dropped = kept + k.numel(), dropped + d.numel()
            return None if kept + dropped == 0 else dropped / (kept + dropped)

        return {
            "step": self.step, "rate": self.rate,
            "channels_omitted": realised("channels", "dropped_channels"),
            "groups_omitted": realised("groups", "dropped_groups"),
            "dense_layers": len(self.dense_layers),
        }
