"""Schedules of a ratio over training: one module for the token keep ratio and the neuron omission rate.

A schedule maps a step in [0, total_steps) to a value. All are plain, picklable-free dataclasses built by
``make_schedule(kind, **params)`` from config; ``average(schedule, total_steps)`` gives the run-average
(the number SAT reports for LORS).

* ``constant(value)``
* ``linear(start, end)``: straight line from ``start`` at step 0 to ``end`` at the last step;
* ``cosine(start, end)``: half cosine from ``start`` to ``end``;
* ``ladder(start, hold_fraction, rungs, end=0)``: SAT's Ladder Omission Rate Scheduler (LORS): ``start``
  for the first ``hold_fraction`` of training, then ``rungs`` equal steps down to ``end`` over the rest,
  the last rung reached at the end (so with ``end=0`` training ends dense).
"""

from __future__ import annotations

import dataclasses
import math


def _fraction(step: int, total_steps: int) -> float:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    return step / max(total_steps - 1, 1)


@dataclasses.dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: int, total_steps: int) -> float:
        _fraction(step, total_steps)
        return self.value


@dataclasses.dataclass(frozen=True)
class Linear:
    start: float
    end: float

    def __call__(self, step: int, total_steps: int) -> float:
        f = _fraction(step, total_steps)
        return self.start + (self.end - self.start) * f


@dataclasses.dataclass(frozen=True)
class Cosine:
    start: float
    end: float

    def __call__(self, step: int, total_steps: int) -> float:
        f = _fraction(step, total_steps)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))


@dataclasses.dataclass(frozen=True)
class Ladder:
    """LORS: hold ``start`` for ``hold_fraction`` of the steps, then ``rungs`` equal steps down to ``end``."""

    start: float
    hold_fraction: float
    rungs: int
    end: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.hold_fraction <= 1.0:
            raise ValueError(f"hold_fraction must be in [0, 1], got {self.hold_fraction}")
        if self.rungs < 1:
            raise ValueError(f"rungs must be ≥ 1, got {self.rungs}")

    def __call__(self, step: int, total_steps: int) -> float:
        _fraction(step, total_steps)
        hold = int(round(self.hold_fraction * total_steps))
        if step < hold:
            return self.start
        rest = total_steps - hold
        # rung i (1..rungs) starts at hold + (i-1)·rest/rungs; the last rung reaches `end`
        rung = min(self.rungs, 1 + (step - hold) * self.rungs // max(rest, 1))
        return self.start + (self.end - self.start) * rung / self.rungs


KINDS = {"constant": Constant, "linear": Linear, "cosine": Cosine, "ladder": Ladder}


def make_schedule(kind: str, **params):
    """Build a schedule from config, e.g. ``make_schedule("ladder", start=0.5, hold_fraction=0.6, rungs=4)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(KINDS)}")
    cls = KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - names
    if unknown:
        raise ValueError(f"schedule {kind!r} takes {', '.join(sorted(names))}; unknown: {', '.join(sorted(unknown))}")
    return cls(**params)


def average(schedule, total_steps: int) -> float:
    """Mean value of ``schedule`` over a run of ``total_steps`` steps."""
    return sum(schedule(s, total_steps) for s in range(total_steps)) / total_steps
