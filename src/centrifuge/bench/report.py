"""Results of ``centrifuge bench``: ratios to dense, the printed table, CSV, JSON, and the PNG plot.

Output directory (5 files): ``results.json`` (environment, configuration, command line, every row),
``results.csv`` (the rows), ``table.txt`` (what is printed last), ``bench.png`` (per group: step ratio of
the headline variants against the keep ratio, with the ideal and the dense baselines; peak-memory bars) and
``bench_secondary.png`` (the other variants). Ratios are to the strongest dense measured in the same group.
Only the plots need matplotlib; without it the other files are written and ``centrifuge bench --replot DIR``
draws them later elsewhere.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The metrics of the table: (row key, header, ratio key, formatter).
METRICS: list[tuple[str, str]] = [
    ("fwd_ms", "fwd ms"),
    ("bwd_ms", "bwd ms"),
    ("step_ms", "step ms"),
    ("opt_ms", "opt ms"),
    ("peak_mem_gib", "peak GiB"),
    ("act_mem_gib", "act GiB"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
]

CSV_FIELDS = [
    "preset", "layers", "batch", "seq", "tokens", "variant", "base", "modifiers", "keep", "omit", "dtype",
    "status", "baseline",
    "fwd_ms", "fwd_ms_p20", "fwd_ms_p80", "bwd_ms", "bwd_ms_p20", "bwd_ms_p80",
    "step_ms", "step_ms_p20", "step_ms_p80", "opt_ms", "opt_ms_p20", "opt_ms_p80",
    "mem_before_gib", "peak_mem_gib", "act_mem_gib", "peak_full_gib", "tokens_per_s", "model_tflop", "mfu",
    *[f"ratio_{key}" for key, _ in METRICS], "eager_ratio_step_ms", "liger_ratio_peak_mem_gib",
    "loss", "optimizer", "n_params", "n_linear_params", "shape", "reps", "warmup", "note",
]

GROUP_KEYS = ("preset", "layers", "batch", "seq")


# --------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_hash() -> str:
    """sha256 over the package's .py files (identifies the code where there is no .git, e.g. a copy)."""
    pkg = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def environment(device: str) -> dict[str, Any]:
    """Device, library versions and code identity of this run."""
    import torch

    on_cuda = device.startswith("cuda")
    env: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor()
        or platform.machine() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("CENTRIFUGE_GIT_COMMIT"),
        "git_dirty": None,
        "source_sha256": source_hash(),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        env["git_dirty"] = bool(status)
    if on_cuda:
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_count"] = torch.cuda.device_count()
    return env


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: UP017 (Python 3.10)


# --------------------------------------------------------------------------------------------------------
# Ratios
# --------------------------------------------------------------------------------------------------------


def _group_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in GROUP_KEYS)


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


# The dense variants whose fastest step is the baseline of its group (what a user could run instead).
DENSE_BASELINES = ("dense", "dense_compiled", "dense_liger", "dense_compiled_model")


def strongest_dense(group: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The measured dense baseline with the shortest median step in a group (``variant`` -> row), or None."""
    rows = [group[n] for n in DENSE_BASELINES if n in group and isinstance(group[n].get("step_ms"), int | float)]
    return min(rows, key=lambda r: r["step_ms"]) if rows else None


def _ratio_of(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> float | None:
    if base is None:
        return None
    v, b = row.get(key), base.get(key)
    return v / b if isinstance(v, int | float) and isinstance(b, int | float) and b else None


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``baseline`` and ``ratio_<metric>`` (variant / baseline) to every successful row, in place.

    The baseline is the **strongest dense** of the same group: the fastest step among the dense variants
    measured (``DENSE_BASELINES``: eager HF, compiled, Liger-Kernel), except that a ``+ckpt`` variant is
    compared with ``dense+ckpt`` when that was measured (``dense+ckpt`` itself against the strongest dense).
    Secondary columns: ``eager_ratio_step_ms`` (step / eager ``dense``'s) and ``liger_ratio_peak_mem_gib``
    (peak memory / ``dense_liger``'s)."""
    by_group: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if _ok(row) and row.get("keep") is None:
            by_group.setdefault(_group_key(row), {})[row["variant"]] = row
    for row in rows:
        row.setdefault("baseline", None)
        if not _ok(row):
            continue
        group = by_group.get(_group_key(row), {})
        mods = [m for m in str(row.get("modifiers") or "").split("+") if m]
        base = strongest_dense(group)
        if "ckpt" in mods and row["variant"] != "dense+ckpt" and "dense+ckpt" in group:
            base = group["dense+ckpt"]
        row["eager_ratio_step_ms"] = _ratio_of(row, group.get("dense"), "step_ms")
        row["liger_ratio_peak_mem_gib"] = _ratio_of(row, group.get("dense_liger"), "peak_mem_gib")
        if base is None:
            continue
        row["baseline"] = base["variant"]
        for key, _ in METRICS:
            row[f"ratio_{key}"] = _ratio_of(row, base, key)
    return rows


# --------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "tokens_per_s":
        return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"
    v = float(v)
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _ratio(v: Any) -> str:
    return "" if v is None else f"{v:.3f}"


def _group_title(row: dict[str, Any]) -> str:
    layers = f", {row['layers']} layers" if row.get("layers") else ""
    shape = f" [{row['shape']}]" if row.get("shape") else ""
    return f"{row['preset']}{layers}, {row['batch']}×{row['seq']} tokens{shape}"


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """Notes on composition, then one ratio table per group: every metric's median and ratio."""
    meta = meta or {}
    lines: list[str] = []
    comps = meta.get("compositions") or {}
    if comps:
        lines.append("How each variant is measured:")
        lines.extend(f"  {name}: {text}" for name, text in comps.items())
    notes = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
    lines.extend(f"  note: {n}" for n in notes)
    lines.append("  fwd, bwd, opt (AdamW step) are timed back to back in each training step, step = fwd + "
                 "bwd + opt; median over the repetitions (p20/p80 in the CSV/JSON). ratio × = variant / "
                 "baseline of the same group ('vs': the strongest dense measured, i.e. the fastest step of "
                 "dense / dense_compiled / dense_liger; +ckpt variants: dense+ckpt); × eager = step / the "
                 "eager HF dense step. act = peak − memory held before the forward. MFU = "
                 "the variant's own model FLOPs (6·N·tokens + causal attention; the ideal's and "
                 "Centrifuge's backward on κ of the tokens) / step time / peak; tokens/s counts all B×T "
                 "tokens of the step for every variant.")
    env = meta.get("environment") or {}
    cfg = meta.get("config") or {}
    if env:
        lines.append(f"  device {env.get('device_name')}, torch {env.get('torch')}, transformers "
                     f"{env.get('transformers')}, triton {env.get('triton')}, commit "
                     f"{(env.get('git_commit') or 'unknown')[:12]}, {cfg.get('dtype', '')}, "
                     f"{cfg.get('reps', '?')} reps after {cfg.get('warmup', '?')} warm-up (median)")
    headers = ["variant", "κ", "vs"]
    for key, title in METRICS:
        headers += [title, "×"] + (["× eager"] if key == "step_ms" else [])
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    for group_rows in groups.values():
        titled = next((r for r in group_rows if r.get("shape")), group_rows[0])
        table: list[list[str]] = []
        statuses: list[str | None] = []  # the message of rows that did not run
        for row in group_rows:
            cells = [row["variant"], "-" if row.get("keep") is None else f"{row['keep']:g}",
                     row.get("baseline") or "-"]
            if _ok(row):
                for key, _ in METRICS:
                    cells += [_fmt(key, row.get(key)), _ratio(row.get(f"ratio_{key}"))]
                    if key == "step_ms":
                        cells.append(_ratio(row.get("eager_ratio_step_ms")))
                statuses.append(None)
            else:
                statuses.append(str(row.get("status")))
            table.append(cells)
        widths = [len(h) for h in headers]
        for cells in table:
            for i, c in enumerate(cells):
                widths[i] = max(widths[i], len(c))
        lines.append("")
        lines.append(f"== {_group_title(titled)} ==")
        lines.append(_join(headers, widths))
        for cells, status in zip(table, statuses, strict=True):
            lines.append(_join(cells, widths) + (f"  {status}" if status else ""))
    return "\n".join(lines)


def _join(cells: list[str], widths: list[int]) -> str:
    """Names left-aligned (first three columns), numbers right-aligned."""
    return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=False))).rstrip()


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + extra, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable({**meta, "results": rows}), f, indent=1, ensure_ascii=False)
        f.write("\n")


def load_json(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a ``results.json`` (or of the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    rows = data.pop("results")
    return data, rows


def write_results(out_dir: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], *,
                  final: bool = True, plot_file: bool = True) -> dict[str, Path]:
    """Write JSON and CSV (always), the table and the plot (when ``final``). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    write_json(paths["json"], meta, rows)
    write_csv(paths["csv"], rows)
    if final:
        paths["table"] = out / "table.txt"
        paths["table"].write_text(format_table(rows, meta) + "\n")
        if plot_file:
            png = plot(out / "bench.png", rows)
            if png is not None:
                paths["png"] = png
    return paths


# --------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------


# Variants drawn in the headline figure (the others go to the secondary one).
HEADLINE = ("ideal", "centrifuge", "centrifuge_liger")


def plot(path: str | Path, rows: list[dict[str, Any]]) -> Path | None:
    """Two figures, one row per group. ``path`` (bench.png): step ratio vs κ of the headline variants
    (``HEADLINE``) against the strongest dense (= 1) and the other dense baselines, and a peak-memory panel.
    ``<stem>_secondary.png`` beside it: step and backward ratios of every other variant (κ-dependent ones
    as lines, the rest as levels). Legends sit outside the axes. Returns ``path``, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        print(f"[bench] no plot: matplotlib unavailable ({err}); run `centrifuge bench --replot DIR` "
              "where it is installed", file=sys.stderr)
        return None
    add_ratios(rows)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    path = Path(path)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 6.0 * len(groups)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.35, 1]})
    for (ax_k, ax_m), group_rows in zip(axes, groups.values(), strict=True):
        base = _baseline_text(group_rows)
        _plot_keep(ax_k, group_rows, headline=True)
        _plot_memory(ax_m, group_rows)
        ax_k.set_title(f"{_title(group_rows)}\nstep time / strongest dense ({base}) vs keep ratio κ", fontsize=9)
        ax_m.set_title("peak memory, GiB and ratio to the strongest dense\n(hatched: held before the forward)",
                       fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 6.0 * len(groups)), squeeze=False)
    for (ax,), group_rows in zip(axes, groups.values(), strict=True):
        _plot_keep(ax, group_rows, headline=False)
        ax.set_title(f"{_title(group_rows)}\nother variants: step (solid) and backward (dashed) time / "
                     f"strongest dense ({_baseline_text(group_rows)}); +ckpt variants: / dense+ckpt", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_name(f"{path.stem}_secondary{path.suffix}"), dpi=110)
    plt.close(fig)
    return path


def _title(rows: list[dict[str, Any]]) -> str:
    return _group_title(next((r for r in rows if r.get("shape")), rows[0]))


def _baseline_text(rows: list[dict[str, Any]]) -> str:
    base = next((r["baseline"] for r in rows if _ok(r) and r.get("keep") is None and r.get("baseline")
                 and not r.get("modifiers")), None)
    row = next((r for r in rows if r.get("variant") == base and _ok(r)), None)
    return "none measured" if row is None else f"{base}, {row['step_ms']:.1f} ms"


def _plot_keep(ax: Any, rows: list[dict[str, Any]], *, headline: bool) -> None:
    ok = [r for r in rows if _ok(r) and r.get("ratio_step_ms") is not None]
    keep_rows: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        if r.get("keep") is not None and (r["variant"] in HEADLINE) == headline:
            keep_rows.setdefault(r["variant"], []).append(r)
    cycle = iter(["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan"])
    keeps = sorted({r["keep"] for r in ok if r.get("keep") is not None})
    for label, rs in keep_rows.items():
        rs = sorted(rs, key=lambda r: r["keep"])
        color = "black" if label == "ideal" else next(cycle, "gray")
        xs = [r["keep"] for r in rs]
        ax.plot(xs, [r["ratio_step_ms"] for r in rs], "-o", color=color, lw=2 if label == "ideal" else 1.5,
                label=f"{label} step")
        if not headline:
            ax.plot(xs, [r["ratio_bwd_ms"] for r in rs], "--s", color=color, lw=1, ms=4, label=f"{label} bwd")
    if headline and len(keeps) > 1:
        ax.plot(keeps, keeps, ":", color="gray", lw=1, label="y = κ")
    levels = [r for r in ok if r.get("keep") is None
              and ((r["base"] in DENSE_BASELINES and not r.get("modifiers")) == headline)]
    styles = iter(["-.", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1))])
    for r in levels:
        if r["ratio_step_ms"] == 1.0 and headline:
            continue  # the baseline itself: the black line at 1
        ax.axhline(r["ratio_step_ms"], color="dimgray", lw=1, ls=next(styles, "-."),
                   label=f"{r['variant']} step ({r['ratio_step_ms']:.3f})")
    ax.axhline(1.0, color="black", lw=0.8, label="strongest dense = 1" if headline else None)
    ax.set_xlabel("keep ratio κ")
    ax.set_ylabel("time / strongest dense time")
    shown = [r["ratio_step_ms"] for rs in keep_rows.values() for r in rs] + [1.0]
    shown += [r["ratio_bwd_ms"] for rs in keep_rows.values() for r in rs if not headline and r.get("ratio_bwd_ms")]
    shown += [r["ratio_step_ms"] for r in levels if r["ratio_step_ms"] < 2.5]  # off-scale levels: in the legend
    ax.set_ylim(0, 1.12 * max(shown))
    if keeps:
        ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    else:
        ax.text(0.5, 0.5, "no variant of this kind measured", ha="center", va="center", transform=ax.transAxes)


def _plot_memory(ax: Any, rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if _ok(r) and r.get("peak_mem_gib") is not None]
    if not ok:
        ax.text(0.5, 0.5, "no memory panel: CUDA allocator statistics exist only on a GPU run\n"
                "(this was a CPU run: times are a smoke test, not a measurement)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
        return
    keeps = sorted({r["keep"] for r in ok if r.get("keep") is not None})
    mid = min(keeps, key=lambda k: abs(k - 0.5)) if keeps else None
    chosen = [r for r in ok if r.get("keep") is None or r["keep"] == mid]
    names = [r["variant"] + ("" if r.get("keep") is None else f"\nκ={r['keep']:g}") for r in chosen]
    before = [r.get("mem_before_gib") or 0.0 for r in chosen]
    peaks = [r["peak_mem_gib"] for r in chosen]
    xs = range(len(chosen))
    ax.bar(xs, peaks, color="tab:blue", alpha=0.75)
    ax.bar(xs, before, color="none", edgecolor="black", hatch="//", lw=0.5)
    for x, r in zip(xs, chosen, strict=True):
        ratio = r.get("ratio_peak_mem_gib")
        ax.text(x, r["peak_mem_gib"], f"{r['peak_mem_gib']:.1f}" + (f"\n{ratio:.2f}×" if ratio else ""),
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("GiB")
    ax.grid(axis="y", alpha=0.3)
