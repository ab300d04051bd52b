"""Numbers of one run from the training loop's own ``metrics.jsonl`` (``log.every=1``, ``eval.every=K``).

Wall-clock: each record carries the time it was written. With one train record per step, the time from the
record just before step s's train record (the previous step's, or an evaluation's) to it is step s's own time:
the loop's ``train_step`` plus batch building; the loss is read back with ``.item()`` inside the step, so on
CUDA the time includes the GPU work. Evaluation time is therefore excluded from the training clock. Step 1
also carries one-time costs (kernel compilation, autotuning, allocator warm-up) that do not grow with
training length, so the clock counts it at the run's median step time, and so does any later step slower
than ``OUTLIER`` x the median (a recompilation for a new shape, an allocator or autotuning stall). Their raw
times stay in the record: ``first_step_s``, ``slow_steps``, ``slow_excess_s`` and ``train_seconds_raw``.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

OUTLIER = 3.0  # a step slower than this many medians counts at the median on the training clock


def read_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_numbers(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Eval curve vs step and training seconds, final eval loss, step time and tokens/s of one run."""
    step_seconds: dict[int, float] = {}
    previous_time: float | None = None
    train: list[dict[str, Any]] = []
    for rec in records:
        if rec["kind"] == "train" and previous_time is not None:
            step_seconds[int(rec["step"])] = max(0.0, rec["time"] - previous_time)
            train.append(rec)
        previous_time = rec["time"]
    if not step_seconds:
        raise ValueError("metrics.jsonl holds no timed training step (needs log.every=1 and an eval at step 0)")
    later = [s for step, s in step_seconds.items() if step > 1] or list(step_seconds.values())
    median_step = statistics.median(later)
    clock, elapsed = {0: 0.0}, 0.0
    slow = [step for step, s in step_seconds.items() if step > 1 and s > OUTLIER * median_step]
    for step in sorted(step_seconds):
        elapsed += median_step if step == 1 or step in slow else step_seconds[step]
        clock[step] = elapsed
    evals = [r for r in records if r["kind"] == "eval"]
    curve = [{"step": int(r["step"]), "seconds": clock.get(int(r["step"]), math.nan), "loss": float(r["loss"])}
             for r in evals]  # fmt: skip
    speeds = [r["tokens_per_s"] for r in train if int(r["step"]) > 1] or [r["tokens_per_s"] for r in train]
    return {
        "curve": curve,
        "final_eval_loss": curve[-1]["loss"] if curve else math.nan,
        "steps": max(step_seconds),
        "train_seconds": elapsed,
        "train_seconds_raw": sum(step_seconds.values()),
        "first_step_s": step_seconds.get(1, math.nan),
        "slow_steps": len(slow),
        "slow_excess_s": sum(step_seconds[step] - median_step for step in slow),
        "median_step_s": median_step,
        "tokens_per_s": statistics.median(speeds),
        "kept_fraction": statistics.fmean(r.get("counted_fraction", 1.0) for r in train),
        "omit_mean": statistics.fmean(r.get("omit", 0.0) for r in train),  # neuron omission rate over the run
        "final_train_loss": float(train[-1]["loss"]),
    }
