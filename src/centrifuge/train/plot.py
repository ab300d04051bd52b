"""Pictures of runs: loss curves of one or several ``centrifuge train`` runs from their ``metrics.jsonl``.

``plot_runs([run_a, run_b], "compare.png")`` draws four panels — loss against optimizer steps, against
tokens trained on, against training time (seconds spent in steps: evaluation and checkpoints excluded), and
the kept-token fraction and neuron-omission rate against steps. Training loss is a thin line, held-out loss a
thick line with markers, one colour per run; the legend names each run by the config keys in which the runs
differ (``tokens.keep_ratio=0.5``), read from each run's ``config.yaml``. ``centrifuge plot`` is the command,
and every ``centrifuge train`` run writes ``<run>/metrics.png`` of itself at its end (``log.plot``).

Only matplotlib's Agg canvas is used (no pyplot, no global backend), so plotting works without a display.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from centrifuge._io import atomic_write

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
# Keys that differ between any two runs without making them different experiments.
_IGNORED_KEYS = {"train.out_dir", "data.cache_dir", "log.progress", "log.tensorboard", "log.plot", "log.every",
                 "eval.every", "checkpoint.every", "checkpoint.keep"}


class PlotError(ValueError):
    """A run directory without metrics to plot."""


@dataclass
class RunMetrics:
    """One run's records: ``train`` and ``eval`` lists of dicts (``step``, ``loss``, ...) and its config."""

    path: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path)) or self.path


def find_runs(paths: Sequence[str]) -> list[str]:
    """Run directories named by ``paths``: a run directory or its ``metrics.jsonl`` as it is, a directory of
    runs (e.g. ``runs/``) as every run directly inside it, in name order."""
    found: list[str] = []
    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) == METRICS_FILE:
            found.append(os.path.dirname(path) or ".")
        elif os.path.isfile(os.path.join(path, METRICS_FILE)):
            found.append(path)
        elif os.path.isdir(path):
            inner = sorted(os.path.join(path, d) for d in os.listdir(path)
                           if os.path.isfile(os.path.join(path, d, METRICS_FILE)))
            if not inner:
                raise PlotError(f"{path}: no {METRICS_FILE} in it or in the directories directly inside it")
            found.extend(inner)
        else:
            raise PlotError(f"{path}: not a run directory (no {METRICS_FILE})")
    return found


def load_run(run_dir: str) -> RunMetrics:
    """``run_dir``'s ``metrics.jsonl`` (lines cut short by a kill are skipped) and ``config.yaml``."""
    run = RunMetrics(run_dir)
    with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train":
                run.train.append(record)
            elif record.get("kind") == "eval":
                run.eval.append(record)
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            run.config = yaml.safe_load(f) or {}
    return run


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """``section.key`` names whose values are not the same in all ``configs`` (bookkeeping keys such as
    ``train.out_dir`` left out), in config order."""
    flat = [_flatten(c) for c in configs]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    return [k for k in keys if k not in _IGNORED_KEYS and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def run_labels(runs: Sequence[RunMetrics]) -> list[str]:
    """A legend label per run: its values of the differing config keys, else its directory name."""
    keys = differing_keys([r.config for r in runs]) if len(runs) > 1 else []
    labels = []
    for run in runs:
        flat = _flatten(run.config)
        parts = [f"{k}={_short(flat.get(k))}" for k in keys]
        labels.append(", ".join(parts) if parts else run.name)
    if len(set(labels)) < len(labels):  # same settings (e.g. a repeat): tell them apart by directory
        pairs = zip(runs, labels, strict=True)
        labels = [f"{run.name}: {label}" if label != run.name else label for run, label in pairs]
    return labels


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return text if len(text) <= 40 else text[:37] + "..."


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(paths: Sequence[str], out: str, *, title: str | None = None) -> str:
    """Draw the runs named by ``paths`` (see ``find_runs``) into the PNG ``out``; returns ``out``."""
    fig = figure([load_run(p) for p in find_runs(paths)], title=title)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90), suffix=".png")  # (the format is read off the name)
    return out


def figure(runs: Sequence[RunMetrics], *, title: str | None = None) -> Any:
    """The ``matplotlib.figure.Figure`` of ``runs``: a 2 × 2 grid of axes (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not any(r.train or r.eval for r in runs):
        raise PlotError("no train or eval records to plot in " + ", ".join(r.path for r in runs))
    labels = run_labels(runs)
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], "step", "optimizer step"), (axes[0, 1], "tokens", "tokens trained on"),
              (axes[1, 0], "train_seconds", "seconds in training steps (eval and checkpoints excluded)")]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    # rates often coincide between runs (e.g. two at keep ratio 0.5): earlier runs drawn wider stay visible
    widths = [4.5 - 3.0 * i / max(1, len(runs) - 1) for i in range(len(runs))]
    for run, color, width in zip(runs, colors, widths, strict=True):
        for ax, x, _ in panels:
            xs, ys = _series(run.train, x, "loss")
            ax.plot(xs, ys, color=color, lw=1.0, alpha=0.55)
            xs, ys = _series(run.eval, x, "loss")
            ax.plot(xs, ys, color=color, lw=2.2, marker="o", ms=4)
        ax = axes[1, 1]
        xs, ys = _series(run.train, "step", "counted_fraction")
        ax.plot(xs, ys, color=color, lw=width)
        xs, ys = _series(run.train, "step", "omit")
        if xs:
            ax.plot(xs, ys, color=color, lw=width, ls="--")
    for ax, x, xlabel in panels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if not any(_series(r.train, x, "loss")[0] or _series(r.eval, x, "loss")[0] for r in runs):
            ax.text(0.5, 0.5, f"not recorded ('{x}' is missing:\nrun made by an older version)",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
    axes[0, 0].set_title("loss by step")
    axes[0, 1].set_title("loss by tokens")
    axes[1, 0].set_title("loss by training time")
    ax = axes[1, 1]
    ax.set_title("kept-token fraction (solid) and omission rate (dashed)")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2.2) for c in colors]
    handles += [Line2D([], [], color="0.3", lw=1.0, alpha=0.55), Line2D([], [], color="0.3", lw=2.2, marker="o")]
    fig.legend(handles, [*labels, "train loss (logged steps)", "held-out loss"], loc="outside lower center",
               ncols=min(3, len(handles)), frameon=False)
    fig.suptitle(title or ("run " + runs[0].name if len(runs) == 1 else f"{len(runs)} runs"))
    return fig
