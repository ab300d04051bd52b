"""The ``Omitter``: patches a model for neuron omission and makes one ``OmissionPlan`` per training step.

    from centrifuge import neurons
    omitter = neurons.attach(model, rate=0.5, schedule="ladder", total_steps=1000)   # or OmissionConfig
    omitter.protect(optimizer)              # omitted rows (and their AdamW state) do not move in a step
    for step in range(1000):
        omitter.plan(step)                  # choose and set this step's kept channels / KV groups
        model(**batch).loss.backward()      # forward and backward on the kept units only
        optimizer.step(); optimizer.zero_grad()
    omitter.revert()

Selection happens in ``plan`` from statistics the training forwards gathered (see ``importance``); a layer
whose metric has no statistics yet runs dense for that step (with the ``uniform`` metric, never). Under
``torch.distributed`` every rank uses rank 0's choice (broadcast in ``plan``, a few KB), so data-parallel
replicas omit the same units and their optimizer masks agree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from centrifuge import schedules
from centrifuge.models.registry import UnsupportedModelError, spec_for
from centrifuge.neurons import importance, statistics
from centrifuge.neurons.layers import STATE_ATTR, LayerOmission, install, uninstall
from centrifuge.neurons.plan import (
    LayerPlan,
    OmissionPlan,
    OmissionRateError,
    PlanBatch,
    check_rate,
    kept_count,
)

log = logging.getLogger("centrifuge")
_OMITTER_ATTR = "_centrifuge_omitter"
# unit kind → (its number in the selection's random seed, its statistics kind in ``LayerOmission.scores``)
_UNITS = {"channels": (0, "mlp"), "groups": (1, "group")}


@dataclasses.dataclass(frozen=True)
class OmissionConfig:
    """How to omit neurons. Mirrors the proposed ``neurons:`` section of the ``centrifuge train`` config.

    Attributes:
        rate: omission rate (fraction of MLP channels / KV groups left out) — the constant value, or the
            starting value of the schedule. In [0, 1).
        schedule: "constant", "linear" / "cosine" (``rate`` → ``end``), or "ladder" (LORS: ``rate`` for
            ``hold_fraction`` of the steps, then ``rungs`` equal steps down to ``end``).
        end, hold_fraction, rungs: schedule parameters (unused by "constant").
        metric: "uniform", "magnitude", "wanda" or "activation" (see ``centrifuge.neurons.importance``).
        select: "topk" or "sample" (without replacement, p ∝ softmax(standardised score / temperature)).
        temperature: of "sample".
        mlp: omit MLP channels.
        heads: omit attention heads (whole KV groups).
        multiple: kept MLP channels are rounded up to a multiple of this (tensor cores); KV groups are whole.
        layers: decoder layer indices that omit; None = all.
        ema: decay of the EMA statistics (activation RMS, input-feature RMS); 0 = last forward only.
        stat_tokens: the statistics read at most this many tokens of each forward (evenly strided); 0 = all.
        seed: of the random choices; a plan depends only on (seed, step, statistics).
    """

    rate: float = 0.5
    schedule: str = "constant"
    end: float = 0.0
    hold_fraction: float = 0.5
    rungs: int = 4
    metric: str = "activation"
    select: str = "sample"
    temperature: float = 1.0
    mlp: bool = True
    heads: bool = True
    multiple: int = 64
    layers: tuple[int, ...] | None = None
    ema: float = 0.9
    stat_tokens: int = 4096
    seed: int = 0

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        self.validate()

    def validate(self) -> None:
        """Raise ``OmissionRateError`` for a bad rate, ``ValueError`` for any other bad field."""
        check_rate(self.rate, "(neurons.rate)")
        if self.schedule != "constant":
            check_rate(self.end, "(neurons.end)")
        if self.schedule not in schedules.KINDS:
            raise ValueError(f"neurons.schedule: unknown {self.schedule!r}; choose one of {', '.join(schedules.KINDS)}")
        if self.metric not in importance.METRICS:
            raise ValueError(f"neurons.metric: unknown {self.metric!r}; choose one of {', '.join(importance.METRICS)}")
        if self.select not in importance.SELECTIONS:
            raise ValueError(
                f"neurons.select: unknown {self.select!r}; choose one of {', '.join(importance.SELECTIONS)}")
        if not self.temperature > 0:
            raise ValueError(f"neurons.temperature must be > 0, got {self.temperature}")
        if self.multiple < 1:
            raise ValueError(f"neurons.multiple must be ≥ 1, got {self.multiple}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"neurons.ema must be in [0, 1), got {self.ema}")
        if isinstance(self.stat_tokens, bool) or not isinstance(self.stat_tokens, int) or self.stat_tokens < 0:
            raise ValueError(f"neurons.stat_tokens must be an integer ≥ 0 (0 = all tokens), got {self.stat_tokens!r}")
        if not (self.mlp or self.heads):
            raise ValueError("neurons: set mlp or heads (or both) to true")
        self.make_schedule()  # checks hold_fraction / rungs

    def make_schedule(self) -> Callable[[int, int], float]:
        """The rate schedule ``f(step, total_steps) -> rate``."""
        if self.schedule == "constant":
            return schedules.Constant(self.rate)
        if self.schedule == "ladder":
            return schedules.Ladder(self.rate, self.hold_fraction, self.rungs, self.end)
        return schedules.make_schedule(self.schedule, start=self.rate, end=self.end)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OmissionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"neurons: unknown keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        return cls(**values)


def check_omission_support(spec, *, heads: bool) -> None:
    """Refuse, with the reason, a family (``ArchSpec.omission``) that neuron omission does not cover."""
    if spec.omission is None:
        raise UnsupportedModelError(
            f"neuron omission does not support model_type {spec.model_type!r} (fused projections: omission slices "
            "separate gate / up / down and q / k / v / o weights); the token-sparse backward does support it")
    if heads and spec.omission == "mlp":
        raise UnsupportedModelError(
            f"neuron omission of attention heads does not support model_type {spec.model_type!r}: its q / k norm "
            "spans all heads, so a kept head's output would depend on the omitted ones; set heads=False "
            "(neurons.heads: false) to omit MLP channels only")


class Omitter:
    """Neuron omission on one HF causal LM (the registry's families; see ``check_omission_support``):
    patches, plans, statistics."""

    def __init__(self, model: nn.Module, config: OmissionConfig | None = None, *, total_steps: int | None = None):
        self.model = model
        self.config = config or OmissionConfig()
        self.total_steps = total_steps
        self.schedule = self.config.make_schedule()
        self.spec = spec_for(model)
        check_omission_support(self.spec, heads=self.config.heads)
        if hasattr(model, _OMITTER_ATTR):
            raise RuntimeError("model already has an Omitter attached; call its revert() first")
        layers = model.model.layers
        chosen = range(len(layers)) if self.config.layers is None else self.config.layers
        for i in chosen:
            if not 0 <= i < len(layers):
                raise ValueError(f"neurons.layers: no decoder layer {i} (the model has {len(layers)})")
        self._layers: dict[int, LayerOmission] = {}
        try:
            for i in sorted(set(chosen)):
                om = LayerOmission(layers[i], self.spec, i, metric=self.config.metric, ema=self.config.ema,
                                   stat_tokens=self.config.stat_tokens)
                install(layers[i], om, mlp=self.config.mlp, heads=self.config.heads)
                self._layers[i] = om
        except Exception:
            self.revert()
            raise
        sizes = {(om.num_channels, om.num_groups, om.heads_per_group) for om in self._layers.values()}
        if len(sizes) > 1:
            self.revert()
            raise ValueError(f"neuron omission needs equal layer shapes; found (channels, KV groups, G) {sizes}")
        setattr(model, _OMITTER_ATTR, self)
        self.current: OmissionPlan | None = None
        self._since_step: list[OmissionPlan] = []
        self._masks: list = []  # OptimizerMask objects registered by protect()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._last_planned: tuple[int, int | None] | None = None  # (step, total_steps) of the last plan()
        self._prefetched: tuple[tuple, OmissionPlan] | None = None  # (plan key, plan) made ahead by prefetch
        log.info("centrifuge: neuron omission on %d of %d layers (%s%s, metric=%s, select=%s)", len(self._layers),
                 len(layers), "mlp" if self.config.mlp else "", "+heads" if self.config.heads else "",
                 self.config.metric, self.config.select)

    # ------------------------------------------------------------------------------------------ rates

    def rate_at(self, step: int, total_steps: int | None = None) -> float:
        """The scheduled omission rate at ``step`` (checked to lie in [0, 1))."""
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            if self.config.schedule != "constant":
                raise ValueError(f"a {self.config.schedule!r} schedule needs total_steps (Omitter or plan())")
            total = step + 1
        return check_rate(self.schedule(step, total), f"(schedule value at step {step})")

    def average_rate(self, total_steps: int | None = None) -> float:
        """The run-average omission rate over ``total_steps`` steps (before rounding kept sizes up)."""
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            raise ValueError("average_rate needs total_steps")
        return schedules.average(self.schedule, total)

    # ------------------------------------------------------------------------------------------ plans

    def plan(self, step: int, total_steps: int | None = None) -> OmissionPlan:
        """Choose the kept units of every omitting layer for ``step``, set them on the layers, return them.

        One selection per unit kind for all the layers of a device; the plans' row ids and keep vectors come
        later, batched too, on first use (``PlanBatch``). No synchronisation. This runs before the first
        forward kernel, so its host time (~2 ms for 22 layers) is time the GPU waits — unless the plan was
        prefetched: a protected optimizer's step (``protect``) makes the next step's plan while the GPU is
        still busy, and ``plan`` takes it when step, total and statistics are the same (a plan depends on
        nothing else, so it is the plan ``plan`` would make)."""
        total = total_steps if total_steps is not None else self.total_steps
        key = self._plan_key(step, total)
        prefetched, self._prefetched = self._prefetched, None
        plan = prefetched[1] if prefetched is not None and prefetched[0] == key else self._make_plan(step, total)
        self._last_planned = (step, total)
        self.set_plan(plan)
        return plan

    def prefetch(self, step: int, total_steps: int | None = None) -> None:
        """Make ``step``'s plan now (not set on the layers); the next ``plan(step)`` uses it if the statistics
        have not changed in between."""
        total = total_steps if total_steps is not None else self.total_steps
        self._prefetched = (self._plan_key(step, total), self._make_plan(step, total))

    def _plan_key(self, step: int, total: int | None) -> tuple:
        return step, total, tuple(om.version for om in self._layers.values())

    def _make_plan(self, step: int, total_steps: int | None) -> OmissionPlan:
        rate = self.rate_at(step, total_steps)
        cfg = self.config
        units: dict[int, dict] = {}  # layer → LayerPlan fields
        batches: dict[int, list[tuple[PlanBatch, int]]] = {}  # layer → (batch, row) of its derived tensors
        waiting: set[int] = set()
        if rate > 0.0 and self._layers:
            first = next(iter(self._layers.values()))
            for kind, on, n, multiple in (("channels", cfg.mlp, first.num_channels, cfg.multiple),
                                          ("groups", cfg.heads, first.num_groups, 1)):
                k = kept_count(n, rate, multiple)
                if not on or k == n:
                    continue
                chosen, w = self._choose(step, kind, k, n)
                waiting |= w
                for layer_ids, kept, dropped in chosen:
                    batch = PlanBatch(kind, kept, dropped, n, heads_per_group=first.heads_per_group,
                                      head_dim=first.head_dim)
                    for row, i in enumerate(layer_ids):
                        units.setdefault(i, {}).update({kind: kept[row], f"dropped_{kind}": dropped[row]})
                        batches.setdefault(i, []).append((batch, row))
        layers = {}
        for i, fields in units.items():
            om = self._layers[i]
            lp = layers[i] = LayerPlan(**fields, heads_per_group=om.heads_per_group, head_dim=om.head_dim)
            for batch, row in batches[i]:
                lp.use_batch(batch, row)
        layers = dict(sorted(layers.items()))
        return OmissionPlan(rate=rate, layers=layers, step=step, dense_layers=tuple(sorted(waiting)))

    def _generator(self, device: torch.device, step: int, unit: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed((self.config.seed * 1_000_003 + step) * 4 + unit)
        return gen

    def _choose(self, step: int, kind: str, k: int, n: int):
        """Kept / dropped ids of unit ``kind`` ("channels" / "groups") in the layers whose metric is ready,
        batched per device.

        Returns ([(layer ids, kept [L, k], dropped [L, n − k]) per device], layers still waiting for
        statistics)."""
        cfg = self.config
        uniform = cfg.metric == "uniform"
        unit, stat = _UNITS[kind]
        ready = [(i, om) for i, om in self._layers.items() if uniform or om.has_score(stat)]
        waiting = set(self._layers).difference(i for i, _ in ready)
        by_device: dict[torch.device, list[tuple[int, LayerOmission]]] = {}
        for i, om in ready:
            by_device.setdefault(self._device(i), []).append((i, om))
        batches = []
        for device, members in by_device.items():
            scores = None
            if not uniform:
                statistics.flush([om for _, om in members], stat)  # every layer's pending update at once
                scores = torch.stack([om.scores[stat] for _, om in members])
            kept, dropped = importance.select(
                scores, k, method=cfg.select, temperature=cfg.temperature,
                generator=self._generator(device, step, unit), shape=(len(members), n), device=device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # statistics differ between data-parallel ranks: every rank uses rank 0's choice
                dist.broadcast(kept, src=0)
                dist.broadcast(dropped, src=0)
            batches.append(([i for i, _ in members], kept, dropped))
        return batches, waiting

    def _device(self, layer_idx: int) -> torch.device:
        # the Parameter object outlives model.to() (which swaps its data): no module lookups per step
        return self._layers[layer_idx].probe.device

    def set_plan(self, plan: OmissionPlan | None) -> None:
        """Run the next training forwards with ``plan`` (None = dense)."""
        for i, om in self._layers.items():
            om.plan = None if plan is None else plan.get(i)
        self.current = plan
        if self._masks:
            self._since_step.append(plan)  # the optimizer mask intersects the plans of one step (None = dense)
        else:
            self._since_step = [plan]

    def clear(self) -> None:
        """Dense from now on (until the next ``plan`` / ``set_plan``)."""
        self.set_plan(None)

    # ------------------------------------------------------------------------------------------ optimizer

    def protect(self, optimizer: torch.optim.Optimizer, *, fast: bool | None = None):
        """Keep omitted rows of parameters and of their optimizer state unchanged by ``optimizer.step()``.

        ``fast``: None = masked AdamW update where exact (AdamW / Adam), save / restore elsewhere; True =
        masked AdamW or an error; False = always save / restore (see ``centrifuge.neurons.optim``).
        Returns the ``OptimizerMask`` (its ``remove()`` takes the hooks off)."""
        from centrifuge.neurons.optim import OptimizerMask

        return OptimizerMask(self, optimizer, fast=fast)

    def omitted_slices(self) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, ids) of the weights omitted by every plan set since the last optimizer step (a
        ``clear()`` in between counts as a dense plan; with none set since, the current plan counts).

        When one plan was used (the usual case), no host synchronisation happens; with several plans per
        step (e.g. one per micro-batch) the omitted set is their intersection."""
        return [(param, dim, ids) for param, dim, ids, _ in self.omitted_units()]

    def omitted_units(self) -> list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor | None]]:
        """``omitted_slices`` with a fourth entry: the keep vector (bool [param.shape[dim]], False at ``ids``)
        when the plan has it ready (one plan in the step: precomputed by ``plan``), else None. Parameters of
        one layer that share ids (gate / up / down, q / o, k / v) share the very same tensors."""
        plans = self._since_step or [self.current]
        layers = self.model.model.layers
        out = []
        for i, om in self._layers.items():
            per_layer = [None if p is None else p.get(i) for p in plans]
            if not per_layer or any(lp is None for lp in per_layer):
                continue
            channels = _intersect([lp.dropped_channels for lp in per_layer], om.num_channels)
            groups = _intersect([lp.dropped_groups for lp in per_layer], om.num_groups)
            mlp, attn = layers[i].mlp, layers[i].self_attn
            lp = per_layer[0]
            if channels is not None and channels.numel():
                keep = lp.keep_channels(om.num_channels) if channels is lp.dropped_channels else None
                for lin in (mlp.gate_proj, mlp.up_proj):
                    out.append((lin.weight, 0, channels, keep))
                    if lin.bias is not None:
                        out.append((lin.bias, 0, channels, keep))
                out.append((mlp.down_proj.weight, 1, channels, keep))
            if groups is not None and groups.numel():
                if groups is lp.dropped_groups:  # cached on the plan
                    q_rows, kv_rows = lp.dropped_q_rows, lp.dropped_kv_rows
                    keep_q, keep_kv = lp.keep_q_rows(om.num_groups), lp.keep_kv_rows(om.num_groups)
                else:
                    probe = LayerPlan(groups=groups, heads_per_group=om.heads_per_group, head_dim=om.head_dim)
                    q_rows, kv_rows = probe.q_rows, probe.kv_rows
                    keep_q = keep_kv = None
                for lin, rows, keep in ((attn.q_proj, q_rows, keep_q), (attn.k_proj, kv_rows, keep_kv),
                                        (attn.v_proj, kv_rows, keep_kv)):
                    out.append((lin.weight, 0, rows, keep))
                    if lin.bias is not None:
                        out.append((lin.bias, 0, rows, keep))
                out.append((attn.o_proj.weight, 1, q_rows, keep_q))
        return out

    def _optimizer_stepped(self) -> None:
        """Called by a protected optimizer after its step: start the next step's plan (``prefetch``) — on one
        process only (with several, ``plan`` broadcasts rank 0's choice, kept where every rank calls it)."""
        self._since_step = []
        if self._last_planned is None or (dist.is_available() and dist.is_initialized()
                                          and dist.get_world_size() > 1):
            return
        step, total = self._last_planned
        try:
            self.prefetch(step + 1, total)
        except ValueError:  # e.g. past the schedule's end: the next plan() call reports it, if it comes
            self._prefetched = None

    # ------------------------------------------------------------------------------------------ state

    _STAT_NAMES = ("mlp_score", "group_score", "mlp_x_ms", "attn_x_ms")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The importance statistics (``"<layer>.<name>"`` → tensor), for checkpoints: with the same seed
        and step, a resumed run makes the same plans."""
        return {f"{i}.{name}": t.detach().clone() for i, om in self._layers.items() for name in self._STAT_NAMES
                if (t := getattr(om, name)) is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            layer, name = key.split(".", 1)
            om = self._layers.get(int(layer))
            if om is None or name not in self._STAT_NAMES:
                raise KeyError(f"unexpected omission statistic {key!r}")
            setattr(om, name, value.to(self._device(int(layer))))
            om.version += 1

    def layer_state(self, layer_idx: int) -> LayerOmission:
        """The ``LayerOmission`` (plan and statistics) of one omitting layer."""
        return self._layers[layer_idx]

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(self._layers)

    def revert(self) -> nn.Module:
        """Remove every patch: the layers' original forwards come back. Returns the model."""
        layers = self.model.model.layers
        for i, om in self._layers.items():
            uninstall(layers[i], om)
        self._layers = {}
        if getattr(self.model, _OMITTER_ATTR, None) is self:
            delattr(self.model, _OMITTER_ATTR)
        return self.model


def _intersect(dropped: list[torch.Tensor | None], total: int) -> torch.Tensor | None:
    """Ids present in every tensor of ``dropped`` (None = nothing dropped)."""
    if any(d is None for d in dropped):
        return None
    if len(dropped) == 1 or all(d is dropped[0] for d in dropped):
        return dropped[0]
    mask = torch.ones(total, dtype=torch.bool, device=dropped[0].device)
    for d in dropped:
        m = torch.zeros_like(mask)
        m[d] = True
        mask &= m
    return mask.nonzero().flatten()


def attach(model: nn.Module, config: OmissionConfig | None = None, *, total_steps: int | None = None,
           **fields: Any) -> Omitter:
    """Patch ``model`` for neuron omission; ``fields`` are ``OmissionConfig`` fields (e.g. ``rate=0.5``)."""
    if config is not None and fields:
        raise TypeError("pass either an OmissionConfig or its fields, not both")
    config = config or OmissionConfig.from_dict(fields)
    return Omitter(model, config, total_steps=total_steps)


def omitter_of(model: nn.Module) -> Omitter | None:
    """The ``Omitter`` attached to ``model``, or None."""
    return getattr(model, _OMITTER_ATTR, None)


def revert(model: nn.Module) -> nn.Module:
    """Undo ``attach`` (a no-op for a model without omission)."""
    omitter = omitter_of(model)
    return model if omitter is None else omitter.revert()


__all__ = ["OmissionConfig", "Omitter", "OmissionRateError", "attach", "omitter_of", "revert", "STATE_ATTR"]
