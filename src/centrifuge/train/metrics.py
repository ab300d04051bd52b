"""What a run reports: a tqdm progress bar, ``metrics.jsonl`` and (when installed) TensorBoard.

``metrics.jsonl`` has one JSON object per line: ``{"step": 40, "kind": "train", "loss": ..., ...}`` for
training and ``"kind": "eval"`` for held-out evaluations. Both carry ``tokens`` (input tokens trained on so
far) and ``train_seconds`` (time spent in training steps so far, evaluation and checkpoints excluded), which
continue across resumes (``RunClock``), so runs compare by tokens and by wall-clock (``centrifuge plot``).
A resumed run first drops the records written after its checkpoint (they belong to the lost part of the
interrupted run), so the file reads as one run; its TensorBoard events are rewritten the same way into one
events file (``tb/``), so TensorBoard shows one unbroken stream per run.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from centrifuge._io import write_text_atomic
from centrifuge.train.step import StepStats

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors numbers to TensorBoard (``<run>/tb``)."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = _summary_writer(SummaryWriter, os.path.join(run_dir, "tb"), resume_step)

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every record written so far
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(writer_type: Any, tb_dir: str, resume_step: int | None) -> Any:
    """A TensorBoard writer for ``tb_dir``. On resume, the earlier events up to ``resume_step`` are copied
    into the new writer's file and the older files deleted, so a run keeps one events file however often it
    is resumed (TensorBoard would otherwise read overlapping files of one run; with ``purge_step`` alone the
    directory still gains a file per resume)."""
    old_files = sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))) if resume_step is not None else []
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        EventFileLoader = None
    if not old_files or EventFileLoader is None:
        return writer_type(tb_dir, purge_step=None if resume_step is None else resume_step + 1)
    writer = writer_type(tb_dir)
    file_writer = writer._get_file_writer()
    for path in old_files:
        try:
            for event in EventFileLoader(path).Load():
                if event.HasField("file_version") or event.step > resume_step:
                    continue
                file_writer.add_event(event, walltime=event.wall_time)
        except Exception:  # a file cut short by a kill: keep what was read
            pass
    writer.flush()
    for path in old_files:
        os.remove(path)
    return writer


@dataclass
class RunClock:
    """Tokens trained on and seconds spent in training steps since the run began, across resumes."""

    tokens: int = 0
    train_seconds: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> RunClock:
        """From a checkpoint's ``state.json`` (zero for a fresh run or an older checkpoint)."""
        clock = (state or {}).get("clock") or {}
        return cls(int(clock.get("tokens", 0)), float(clock.get("train_seconds", 0.0)))

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += int(tokens)
        self.train_seconds += seconds

    def record(self) -> dict[str, float]:
        """The fields added to every metrics record."""
        return {"tokens": self.tokens, "train_seconds": round(self.train_seconds, 3)}

    def state_dict(self) -> dict[str, Any]:
        return {"clock": {"tokens": self.tokens, "train_seconds": self.train_seconds}}


def _truncate_after(path: str, step: int) -> None:
    """Rewrite ``path`` keeping only records up to ``step`` (atomically)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    write_text_atomic(path, "".join(kept))


def step_record(stats: StepStats, tokens_per_s: float) -> dict[str, float]:
    """The numbers of one step for metrics.jsonl / TensorBoard."""
    record = {
        "loss": stats.loss,
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "tokens_per_s": tokens_per_s,
        "num_counted": stats.num_counted,
        "num_valid": stats.num_valid,
        "counted_fraction": stats.counted_fraction,
    }
    record.update(stats.stats)
    return record


class Progress:
    """Step progress: a tqdm bar on a terminal, plain lines otherwise.

    Postfix / line: loss, tokens/s, lr, kept-token % (when below 100) and loss-fn stats (e.g. ``omit``).
    When stderr is not a terminal (output redirected to a file, a CI log), redrawn bars would pile up as
    carriage-return debris, so the bar is off and one plain line per ``every`` steps (and the last) is
    printed to stdout instead, between the run's other messages."""

    def __init__(self, total: int, initial: int, *, enabled: bool, every: int = 10,
                 interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.enabled, self.total, self.step, self.every = enabled, total, initial, max(1, every)
        self._start, self._start_step = time.perf_counter(), initial
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not (enabled and self.interactive),
            unit="step",
            dynamic_ncols=True,
            mininterval=0.2,
            file=sys.stderr,
        )

    def update(self, stats: StepStats, tokens_per_s: float) -> None:
        fields: dict[str, Any] = {
            "loss": f"{stats.loss:.3f}",
            "tok/s": f"{tokens_per_s:,.0f}",
            "lr": f"{stats.lr:.2e}",
        }
        if stats.num_counted < stats.num_valid:
            fields["kept"] = f"{100 * stats.counted_fraction:.0f}%"
        for key, value in stats.stats.items():
            fields[key] = f"{value:.3g}"
        self.step += 1
        if not self.bar.disable:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.step % self.every == 0 or self.step == self.total):
            print(self._line(fields), flush=True)

    def _line(self, fields: dict[str, Any]) -> str:
        """``step 10/200 | loss 7.822 | tok/s 3,265 | ... | 0:12 elapsed, ~3:41 left``."""
        elapsed = time.perf_counter() - self._start
        done = self.step - self._start_step
        left = elapsed / done * (self.total - self.step) if done else 0.0
        width = len(str(self.total))
        parts = [f"step {self.step:>{width}}/{self.total}", *(f"{k} {v}" for k, v in fields.items())]
        return " | ".join(parts) + f" | {_clock(elapsed)} elapsed, ~{_clock(left)} left"

    def write(self, message: str) -> None:
        """Print a line above the bar (plain print when the bar is off)."""
        if self.bar.disable:
            print(message, flush=True)
        else:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
