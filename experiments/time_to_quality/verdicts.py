"""The issue's goals as checks on held-out loss curves; pure functions, unit-tested on fixed curves.

A run is a dict with ``curve`` = [{"step", "seconds", "loss"}, ...] (held-out clean loss at each
evaluation, training seconds excluding evaluation, step 0 first) as ``experiments.utility.curves`` makes it.
An arm is a list of runs (one per seed). Each check returns a dict with ``verdict`` ("yes", "no" or
"inconclusive"), the numbers it was computed from and a sentence saying so.

Goals (issue 21):

1. ``reach``: excess-loss selection reaches dense's final held-out loss within ``REACH_RATIO`` (0.75) of
   dense's training wall-clock. Target = dense's final loss (mean over seeds); dense's time = its mean
   training seconds. Every run of the arm is checked: "yes" if every run reaches the target in time, "no" if
   none does, "inconclusive" if the seeds disagree.
2. ``lower_at_time``: at equal wall-clock (the shorter of the two arms' mean training times) the arm's loss is
   lower than the other's. "yes" / "no" only when every run of one arm is below every run of the other and
   there are at least three runs in all (one seed each has no spread to judge against): else inconclusive.
3. ``within_at_steps``: at equal steps the arm's final loss (mean) is at most ``TOLERANCE`` (1%) above the
   other's; "inconclusive" when the step counts differ.

And the condition on the shape: ``step_ratio``: the token-sparse step's median time below ``STEP_RATIO`` (0.7)
of dense's, measured in the same runs (each run's median step time, mean over seeds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

REACH_RATIO = 0.75
TOLERANCE = 0.01
STEP_RATIO = 0.7  # the shape condition: the token-sparse step below 0.7x dense's

Run = dict[str, Any]


def time_to_loss(curve: Sequence[dict[str, float]], target: float) -> float | None:
    """Training seconds at which ``curve`` first gets down to ``target`` (linear between evaluations);
    None if it never does."""
    for i, point in enumerate(curve):
        if point["loss"] <= target:
            if i == 0:
                return point["seconds"]
            a = curve[i - 1]
            w = (a["loss"] - target) / (a["loss"] - point["loss"])
            return a["seconds"] + w * (point["seconds"] - a["seconds"])
    return None


def value_at(curve: Sequence[dict[str, float]], x: float, key: str = "seconds") -> float:
    """Loss at ``x`` of ``key`` (seconds, step or tokens), linear between evaluations; NaN outside the curve."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a[key] <= x <= b[key]:
            w = 0.0 if b[key] == a[key] else (x - a[key]) / (b[key] - a[key])
            return a["loss"] + w * (b["loss"] - a["loss"])
    if curve and math.isclose(x, curve[-1][key]):
        return curve[-1]["loss"]
    return math.nan


def final_loss(runs: Sequence[Run]) -> float:
    return statistics.fmean(r["curve"][-1]["loss"] for r in runs)


def train_seconds(runs: Sequence[Run]) -> float:
    return statistics.fmean(r["curve"][-1]["seconds"] for r in runs)


def reach(arm: Sequence[Run], dense: Sequence[Run], *, ratio: float = REACH_RATIO, name: str = "arm") -> dict:
    """Goal 1: does every run of ``arm`` reach dense's final loss within ``ratio`` x dense's wall-clock?"""
    target, budget = final_loss(dense), ratio * train_seconds(dense)
    times = [time_to_loss(r["curve"], target) for r in arm]
    fractions = [None if t is None else t / train_seconds(dense) for t in times]
    ok = [t is not None and t <= budget for t in times]
    verdict = "yes" if all(ok) else "no" if not any(ok) else "inconclusive"
    shown = ", ".join("never" if f is None else f"{f:.3f}x" for f in fractions)
    return {"verdict": verdict, "target_loss": target, "dense_seconds": train_seconds(dense), "ratio": ratio,
            "times_s": times, "fractions": fractions,
            "text": f"`{name}` reaches dense's final loss {target:.4f} at {shown} of dense's "
                    f"{train_seconds(dense):.4g} s (goal <= {ratio:g}x, {len(arm)} run(s)) -> {verdict}"}  # fmt: skip


def lower_at_time(a: Sequence[Run], b: Sequence[Run], *, names: tuple[str, str] = ("a", "b")) -> dict:
    """Goal 2: at equal wall-clock (the shorter mean training time) is ``a``'s loss below ``b``'s?"""
    at = min(train_seconds(a), train_seconds(b))
    la = [value_at(r["curve"], min(at, r["curve"][-1]["seconds"])) for r in a]
    lb = [value_at(r["curve"], min(at, r["curve"][-1]["seconds"])) for r in b]
    spread = len(la) + len(lb) >= 3
    if spread and max(la) < min(lb):
        verdict = "yes"
    elif spread and max(lb) < min(la):
        verdict = "no"
    else:
        verdict = "inconclusive"
    ma, mb = statistics.fmean(la), statistics.fmean(lb)
    why = "" if spread else " (one seed each: no spread to judge against)"
    if spread and verdict == "inconclusive":
        why = " (the seed ranges overlap)"
    return {"verdict": verdict, "seconds": at, "loss_a": la, "loss_b": lb,
            "text": f"at {at:.4g} s: `{names[0]}` {ma:.4f} [{min(la):.4f}, {max(la):.4f}] vs `{names[1]}` {mb:.4f} "
                    f"[{min(lb):.4f}, {max(lb):.4f}] ({100 * (ma / mb - 1):+.2f}%){why} -> {verdict}"}  # fmt: skip


def within_at_steps(a: Sequence[Run], b: Sequence[Run], *, tolerance: float = TOLERANCE,
                    names: tuple[str, str] = ("a", "b")) -> dict:  # fmt: skip
    """Goal 3a: at equal steps is ``a``'s final loss at most ``tolerance`` above ``b``'s (means)?"""
    steps_a = {r["curve"][-1]["step"] for r in a}
    steps_b = {r["curve"][-1]["step"] for r in b}
    rel = final_loss(a) / final_loss(b) - 1.0
    if steps_a != steps_b or len(steps_a) != 1:
        verdict, why = "inconclusive", f" (step counts differ: {sorted(steps_a)} vs {sorted(steps_b)})"
    else:
        verdict, why = ("yes" if rel <= tolerance else "no"), f" at {steps_a.pop()} steps"
    return {"verdict": verdict, "relative": rel,
            "text": f"`{names[0]}` {final_loss(a):.4f} vs `{names[1]}` {final_loss(b):.4f} ({100 * rel:+.2f}%, "
                    f"goal <= {100 * tolerance:g}%){why} -> {verdict}"}  # fmt: skip


def step_ratio(a: Sequence[Run], b: Sequence[Run], *, limit: float = STEP_RATIO,
               names: tuple[str, str] = ("a", "b")) -> dict:  # fmt: skip
    """Is ``a``'s median step time below ``limit`` x ``b``'s (means over runs)?"""
    ratio = statistics.fmean(r["median_step_s"] for r in a) / statistics.fmean(r["median_step_s"] for r in b)
    verdict = "yes" if ratio < limit else "no"
    return {"verdict": verdict, "ratio": ratio,
            "text": f"median step `{names[0]}` / `{names[1]}` = {ratio:.3f} (condition < {limit:g}) -> {verdict}"}


def goals(arms: dict[str, Sequence[Run]]) -> list[dict]:
    """Every goal of the issue that the arms present allow, in order; each with a ``goal`` title."""
    out: list[dict] = []

    def add(goal: str, check: dict | None) -> None:
        if check is not None:
            out.append({"goal": goal, **check})

    dense = arms.get("dense")
    excess = arms.get("centrifuge_k0.5")
    if dense and excess and all("median_step_s" in r for r in [*dense, *excess]):
        add("shape condition: the token-sparse step below 0.7x dense's",
            step_ratio(excess, dense, names=("centrifuge_k0.5", "dense")))
    if dense and excess:
        add("excess-loss selection reaches dense's final loss in <= 0.75x dense's wall-clock",
            reach(excess, dense, name="centrifuge_k0.5"))
        add("at equal wall-clock, excess-loss selection is below dense",
            lower_at_time(excess, dense, names=("centrifuge_k0.5", "dense")))
        if arms.get("random_k0.5"):
            add("at equal wall-clock, excess-loss selection is below random selection at the same keep ratio",
                lower_at_time(excess, arms["random_k0.5"], names=("centrifuge_k0.5", "random_k0.5")))
        if arms.get("rho1_loss_only_k0.5"):
            add("at equal wall-clock, the token-sparse backward is below loss-only masking (same selection)",
                lower_at_time(excess, arms["rho1_loss_only_k0.5"], names=("centrifuge_k0.5", "rho1_loss_only_k0.5")))
    if dense and arms.get("neurons_lors_eqsteps"):
        add("LORS within 1% of dense at equal steps",
            within_at_steps(arms["neurons_lors_eqsteps"], dense, names=("neurons_lors_eqsteps", "dense")))
    if dense and arms.get("neurons_lors"):
        add("LORS ahead of dense at equal wall-clock",
            lower_at_time(arms["neurons_lors"], dense, names=("neurons_lors", "dense")))
    if dense and arms.get("tokens_neurons"):
        add("tokens + LORS ahead of dense at equal wall-clock",
            lower_at_time(arms["tokens_neurons"], dense, names=("tokens_neurons", "dense")))
        add("tokens + LORS reaches dense's final loss in <= 0.75x dense's wall-clock",
            reach(arms["tokens_neurons"], dense, name="tokens_neurons"))
    return out
