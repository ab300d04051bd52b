"""Report of the time-to-quality study: table, one plot, the issue's verdicts, all computed from the runs.

``python -m experiments.time_to_quality.report DIR [DIR ...] [--out OUT]`` reads every
``runs/<arm>/seed<k>/result.json`` under the given directories (e.g. one per device call; a later directory
wins for the same arm and seed) and writes to OUT (default ``DIR/report``):

- ``results.csv`` / ``results.json``: per arm, seeds, step count, training seconds, step time, tokens/s,
  final held-out clean loss (mean, std, min, max), change against dense, time to reach dense's final loss
  (as a fraction of dense's training time; per seed), next-line exact match, kept fraction; the JSON adds the
  curves, verdicts, devices, versions, commands and corpus / reference-score fingerprints;
- ``curves.png``: held-out clean loss against training wall-clock and against tokens seen (mean over seeds,
  min-max shaded), dense's final loss dotted;
- ``summary.md``: the table and each goal of issue 21 with its verdict (``verdicts.goals``).
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Any

from experiments.time_to_quality import verdicts
from experiments.time_to_quality.profiles import RUNNABLE
from experiments.utility.report import load_results, mean_curve, report_args, run_meta, write_csv, write_markdown

COLUMNS = ("arm", "seeds", "steps", "train_seconds", "median_step_ms", "tokens_per_s", "final_loss_mean",
           "final_loss_std", "final_loss_min", "final_loss_max", "vs_dense_pct", "reach_dense_fraction",
           "nextline_exact_match", "kept_fraction", "devices")  # fmt: skip


def group(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Arm -> its runs (seeds), in the study's arm order."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        runs[r["arm"]].append(r)
    order = {arm: i for i, arm in enumerate(RUNNABLE)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def table_rows(arms: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    dense = arms.get("dense")
    rows = []
    for arm, runs in arms.items():
        finals = [r["curve"][-1]["loss"] for r in runs]
        reach = verdicts.reach(runs, dense, name=arm)["fractions"] if dense else []
        rows.append({
            "arm": arm, "seeds": " ".join(str(r["seed"]) for r in runs),
            "steps": " ".join(sorted({str(r["steps"]) for r in runs})),
            "train_seconds": round(statistics.fmean(r["train_seconds"] for r in runs), 3),
            "median_step_ms": round(1000 * statistics.fmean(r["median_step_s"] for r in runs), 3),
            "tokens_per_s": round(statistics.fmean(r["tokens_per_s"] for r in runs)),
            "final_loss_mean": round(statistics.fmean(finals), 5),
            "final_loss_std": round(statistics.stdev(finals), 5) if len(finals) > 1 else 0.0,
            "final_loss_min": round(min(finals), 5), "final_loss_max": round(max(finals), 5),
            "vs_dense_pct": (round(100 * (statistics.fmean(finals) / verdicts.final_loss(dense) - 1), 3)
                             if dense else None),
            "reach_dense_fraction": " ".join("never" if f is None else f"{f:.3f}" for f in reach),
            "nextline_exact_match": _mean([r.get("nextline_exact_match") for r in runs]),
            "kept_fraction": round(statistics.fmean(r["kept_fraction"] for r in runs), 4),
            "devices": "; ".join(sorted({r["environment"]["device"] for r in runs})),
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("arm", "seeds", "steps", "training s", "step ms", "tokens/s", "final held-out loss (mean ± std) [min, max]",
            "vs dense", "reaches dense's final loss at (x dense time)", "next-line EM")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        em = "—" if r["nextline_exact_match"] is None else f"{100 * r['nextline_exact_match']:.1f}%"
        vs = "—" if r["vs_dense_pct"] is None else f"{r['vs_dense_pct']:+.2f}%"
        reach = r["reach_dense_fraction"] or "—"
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['steps']} | {r['train_seconds']:.4g} "
                     f"| {r['median_step_ms']:.4g} | {r['tokens_per_s']:,} | {r['final_loss_mean']:.4f} ± "
                     f"{r['final_loss_std']:.4f} [{r['final_loss_min']:.4f}, {r['final_loss_max']:.4f}] | {vs} "
                     f"| {reach} | {em} |")  # fmt: skip
    return "\n".join(lines)


def curves(arms: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, float]]]:
    """Mean curve per arm with ``tokens`` (tokens seen = step x tokens per step) added."""
    out = {}
    for arm, runs in arms.items():
        per_step = runs[0].get("tokens_per_step", 0)
        out[arm] = [{**p, "tokens": p["step"] * per_step} for p in mean_curve(runs)]
    return out


def plot(arms: dict[str, list[dict[str, Any]]], path: str) -> str | None:
    """``curves.png`` (loss vs wall-clock, loss vs tokens seen); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    mean = curves(arms)
    for arm, curve in mean.items():
        shown = [p for p in curve if p["step"] > 0]  # the loss at initialization would flatten the scale
        if not shown:
            continue
        for ax, key in zip(axes, ("seconds", "tokens"), strict=True):
            x = [p[key] for p in shown]
            (line,) = ax.plot(x, [p["loss"] for p in shown], label=f"{arm} (n={len(arms[arm])})", linewidth=1.4)
            ax.fill_between(x, [p["min"] for p in shown], [p["max"] for p in shown], color=line.get_color(),
                            alpha=0.15, linewidth=0)  # fmt: skip
    if arms.get("dense"):
        for ax in axes:
            ax.axhline(verdicts.final_loss(arms["dense"]), color="gray", linestyle=":", linewidth=1)
    late = [p for c in mean.values() for p in c if c and p["step"] >= 0.2 * c[-1]["step"] and p["step"] > 0]
    if late:  # zoom on the part after the first fifth of training, where the arms differ
        low, high = min(p["min"] for p in late), max(p["max"] for p in late)
        pad = 0.05 * (high - low) or 0.01
        for ax in axes:
            ax.set_ylim(low - pad, high + pad)
    axes[0].set_xlabel("training wall-clock (s, evaluation excluded)")
    axes[1].set_xlabel("tokens seen (processed, kept or not)")
    for ax in axes:
        ax.set_ylabel("held-out clean loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out clean loss at equal wall-clock budgets: mean over seeds, min-max shaded; "
                 "dotted: dense's final loss")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(directories: list[str], out: str | None = None) -> dict[str, Any]:
    """Write the report files (see the module docstring) and return the JSON payload."""
    out = out or os.path.join(directories[0], "report")
    results, invocations, failures = load_results(directories)
    if not results:
        raise FileNotFoundError(f"no finished run (runs/*/seed*/result.json) under {', '.join(directories)}")
    arms = group(results)
    rows = table_rows(arms)
    checks = verdicts.goals(arms)
    meta = run_meta(results, invocations, directories)
    meta["budgets_s"] = sorted({r.get("budget_s") for r in results if r.get("budget_s") is not None})
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
    payload = {"meta": meta, "table": rows, "verdicts": checks, "curves": curves(arms), "failures": failures}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    png = plot(arms, os.path.join(out, "curves.png"))
    write_summary(os.path.join(out, "summary.md"), meta, rows, checks, failures, png)
    return payload


def write_summary(path: str, meta: dict, rows: list[dict], checks: list[dict], failures: list[str], png) -> None:
    warn = []
    if len(meta["corpus_fingerprints"]) > 1 or len(meta["scores_fingerprints"]) > 1:
        warn.append("**Warning:** the runs used more than one corpus or reference-score set (fingerprints "
                    f"{meta['corpus_fingerprints']} / {meta['scores_fingerprints']}); arms are not comparable.")
    if len(meta["devices"]) > 1 or len(meta["budgets_s"]) > 1:
        warn.append(f"**Warning:** several devices ({', '.join(meta['devices'])}) or budgets {meta['budgets_s']}: "
                    "wall-clock is only comparable on one device kind with one budget.")
    text = [
        "# Time to quality: held-out clean loss at equal wall-clock",
        "",
        f"Profile {', '.join(meta['profiles'])}; budget {meta['budgets_s']} s of training per arm; device "
        f"{', '.join(meta['devices'])}; torch {', '.join(meta['torch'])}; transformers "
        f"{', '.join(meta['transformers'])}; python {', '.join(meta['python'])}; corpus "
        f"{', '.join(meta['corpus_fingerprints'])}, reference scores {', '.join(meta['scores_fingerprints'])}.",
        "",
        *warn,
        "",
        markdown_table(rows),
        "",
        "Loss = held-out **clean** loss (nats/token) after the last step. Training seconds exclude evaluation; "
        "the first step (compilation) counts at the median step time. Next-line EM = greedy next-line exact "
        "match on held-out code.",
        "",
        "## Goals of issue 21 (computed by experiments/time_to_quality/verdicts.py)",
        "",
        *[f"- **{c['goal']}**: {c['text']}" for c in checks],
        "" if checks else "- no goal can be checked: the dense arm or its counterpart is missing",
        "",
    ]
    write_markdown(path, text, meta, failures, png)


def main(argv: list[str] | None = None) -> int:
    args = report_args("python -m experiments.time_to_quality.report", __doc__, argv)
    payload = write_report(args.dirs, args.out)
    print(markdown_table(payload["table"]))
    print("\n".join(f"- {c['goal']}: {c['text']}" for c in payload["verdicts"]))
    print(f"report written to {args.out or os.path.join(args.dirs[0], 'report')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
