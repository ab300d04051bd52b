"""Merge the runs of one or more study directories into a table, a plot and a summary.

``python -m experiments.utility.report DIR [DIR ...] [--out OUT]`` reads every ``runs/<arm>/seed<k>/result.json``
under the given directories (e.g. the outputs of two device calls) and writes to OUT (default ``DIR/report``):

- ``results.csv`` / ``results.json``: per arm, the final held-out clean loss (mean, std, min, max over seeds),
  its change against dense, tokens/s, training seconds, kept-token fraction; the JSON adds the curves, the
  devices, library versions, commands and the corpus / reference-score fingerprints;
- ``curves.png``: held-out clean loss vs step and vs training wall-clock, mean over seeds, min-max shaded;
- ``summary.md``: the table and what the numbers say about each expectation, computed here from the data.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
from collections import defaultdict
from typing import Any

from experiments.utility.profiles import ARMS

TOLERANCE = 0.01  # "within 1%": LORS vs dense, Centrifuge vs loss-only at equal steps


def load_results(directories: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(results, invocations, failures) found under ``directories``; a later directory wins for a run."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    invocations, failures = [], []
    for directory in directories:
        for path in sorted(glob.glob(os.path.join(directory, "runs", "*", "seed*", "result.json"))):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            runs[(result["arm"], int(result["seed"]))] = result
        for path in sorted(glob.glob(os.path.join(directory, "runs", "*", "seed*", "error.txt"))):
            with open(path, encoding="utf-8") as f:
                failures.append(f"{os.path.relpath(path, directory)}: {f.readline().strip()}")
        log = os.path.join(directory, "invocations.jsonl")
        if os.path.isfile(log):
            with open(log, encoding="utf-8") as f:
                invocations += [json.loads(line) for line in f if line.strip()]
    order = {arm: i for i, arm in enumerate(ARMS)}
    results = sorted(runs.values(), key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"]))
    return results, invocations, failures


# ---------------------------------------------------------------------------------------------- numbers


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per eval step present in every run: mean step time, mean / min / max loss over the runs (seeds)."""
    by_step: dict[int, list[dict[str, float]]] = defaultdict(list)
    for run in runs:
        for point in run["curve"]:
            by_step[point["step"]].append(point)
    out = []
    for step in sorted(by_step):
        points = by_step[step]
        if len(points) != len(runs):
            continue
        losses = [p["loss"] for p in points]
        out.append({"step": step, "seconds": statistics.fmean(p["seconds"] for p in points),
                    "loss": statistics.fmean(losses), "min": min(losses), "max": max(losses)})  # fmt: skip
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Arm -> seeds, final-loss spread, speed and the mean curve."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["arm"]].append(r)
    arms = {}
    for arm, runs in groups.items():
        arms[arm] = {
            "seeds": [r["seed"] for r in runs],
            "final_eval_loss": _spread([r["final_eval_loss"] for r in runs]),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "median_step_s": statistics.fmean(r["median_step_s"] for r in runs),
            "kept_fraction": statistics.fmean(r["kept_fraction"] for r in runs),
            "slow_steps": sum(r.get("slow_steps", 0) for r in runs),
            "devices": sorted({r["environment"]["device"] for r in runs}),
            "curve": mean_curve(runs),
        }
    dense = arms.get("dense")
    for stats in arms.values():
        base = dense["final_eval_loss"]["mean"] if dense else math.nan
        stats["vs_dense"] = stats["final_eval_loss"]["mean"] / base - 1.0 if dense else math.nan
    return arms


def loss_at_seconds(curve: list[dict[str, float]], seconds: float) -> float:
    """The mean curve's loss at ``seconds`` of training, interpolated linearly between evaluations."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a["seconds"] <= seconds <= b["seconds"]:
            w = 0.0 if b["seconds"] == a["seconds"] else (seconds - a["seconds"]) / (b["seconds"] - a["seconds"])
            return a["loss"] + w * (b["loss"] - a["loss"])
    return curve[-1]["loss"] if curve and seconds >= curve[-1]["seconds"] else math.nan


# -------------------------------------------------------------------------------------------- findings


def compare(arms: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Final held-out loss of ``a`` against ``b``: difference, relative change, whether seed ranges overlap."""
    if a not in arms or b not in arms:
        return None
    fa, fb = arms[a]["final_eval_loss"], arms[b]["final_eval_loss"]
    diff = fa["mean"] - fb["mean"]
    seeds = min(len(arms[a]["seeds"]), len(arms[b]["seeds"]))
    # one seed has no spread to compare against: never call that a separation
    separated = seeds >= 2 and (fa["max"] < fb["min"] or fb["max"] < fa["min"])
    return {"a": a, "b": b, "mean_a": fa["mean"], "mean_b": fb["mean"], "diff": diff, "rel": diff / fb["mean"],
            "separated": separated, "seeds": seeds}  # fmt: skip


def _describe(c: dict[str, Any]) -> str:
    word = "lower" if c["diff"] < 0 else "higher"
    if c["separated"]:
        how = f"seed ranges do not overlap, {c['seeds']} seeds"
    elif c["seeds"] < 2:
        how = "one seed: no spread to judge against"
    else:
        how = f"within the seed-to-seed range of {c['seeds']} seeds: not distinguishable here"
    return (f"`{c['a']}` {c['mean_a']:.4f} is {abs(c['diff']):.4f} {word} than `{c['b']}` {c['mean_b']:.4f} "
            f"({100 * c['rel']:+.2f}%; {how})")  # fmt: skip


def _verdict(c: dict[str, Any], want_lower: bool) -> str:
    if not c["separated"]:
        return "inconclusive"
    return "as expected" if (c["diff"] < 0) == want_lower else "NOT as expected"


def findings(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences on each expectation of the study, each computed from ``arms`` (missing arms are said so)."""
    lines: list[str] = []

    def add(title: str, items: list[str]) -> None:
        lines.append(f"**{title}**")
        lines.extend(f"- {item}" for item in items)
        lines.append("")

    # 1. excess-loss selection vs dense and random at equal steps
    items = []
    for sel in ("rho1_loss_only_k0.6", "rho1_loss_only_k0.5", "centrifuge_k0.6", "centrifuge_k0.5"):
        for base in ("dense", "random_k0.5"):
            if base == "random_k0.5" and not sel.endswith("0.5"):
                continue
            c = compare(arms, sel, base)
            if c:
                items.append(f"{_describe(c)} → {_verdict(c, want_lower=True)}")
    c = compare(arms, "self_loss_k0.5", "random_k0.5")
    if c:
        items.append(f"(control) {_describe(c)}")
    add("Expectation 1 — excess-loss selection beats dense and random at equal steps (final held-out clean loss)",
        items or ["not measured: the excess-loss, dense or random arms are missing"])

    # 2. Centrifuge backward vs loss-only, equal steps and equal wall-clock
    items = []
    for k in ("0.6", "0.5"):
        fast, slow = f"centrifuge_k{k}", f"rho1_loss_only_k{k}"
        c = compare(arms, fast, slow)
        if not c:
            continue
        if abs(c["rel"]) <= TOLERANCE:
            verdict = "same quality within 1% → as expected"
        elif not c["separated"]:
            verdict = "more than 1% apart, not separated by the seed spread → inconclusive"
        else:
            verdict = f"Centrifuge {'lower' if c['diff'] < 0 else 'higher'}, beyond 1% and the seed spread"
        items.append(f"equal steps, k={k}: {_describe(c)} → {verdict}")
        a, b = arms[fast], arms[slow]
        speed = a["median_step_s"] / b["median_step_s"]
        budget = min(a["curve"][-1]["seconds"], b["curve"][-1]["seconds"])
        la, lb = loss_at_seconds(a["curve"], budget), loss_at_seconds(b["curve"], budget)
        same_device = a["devices"] == b["devices"]
        items.append(
            f"equal wall-clock, k={k}: step time {fast} / {slow} = {speed:.3f}; at {budget:.3g} s of training "
            f"(the faster arm's whole run) held-out loss {la:.4f} vs {lb:.4f} "
            f"({'Centrifuge lower' if la < lb else 'Centrifuge not lower'})"
            + ("" if same_device else f" — measured on different devices {a['devices']} / {b['devices']}")
        )
    add("Expectation 2 — Centrifuge's token-sparse backward keeps loss-only (Rho-1) quality at equal steps and "
        "is ahead at equal wall-clock", items or ["not measured: the centrifuge / rho1_loss_only arms are missing"])

    # 3. LORS within 1% of dense
    items = []
    c = compare(arms, "neurons_lors", "dense")
    if c:
        ok = c["rel"] <= TOLERANCE
        items.append(f"{_describe(c)} → {'within' if ok else 'NOT within'} 1% of dense")
        speed = arms["neurons_lors"]["median_step_s"] / arms["dense"]["median_step_s"]
        items.append(f"median step time neurons_lors / dense = {speed:.3f} (ladder: half the run at rate 0.5)")
    c = compare(arms, "tokens_neurons", "centrifuge_k0.5")
    if c:
        items.append(f"combined: {_describe(c)}")
    c = compare(arms, "tokens_neurons", "dense")
    if c:
        items.append(f"combined: {_describe(c)}")
    add("Expectation 3 — neuron omission with LORS ends within 1% of dense", items or ["not measured"])
    return lines


# ------------------------------------------------------------------------------------------------ output

COLUMNS = ("arm", "seeds", "final_loss_mean", "final_loss_std", "final_loss_min", "final_loss_max", "vs_dense_pct",
           "tokens_per_s", "median_step_ms", "train_seconds", "kept_fraction", "slow_steps", "devices")  # fmt: skip


def table_rows(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm, s in arms.items():
        f = s["final_eval_loss"]
        rows.append({
            "arm": arm, "seeds": " ".join(map(str, s["seeds"])), "final_loss_mean": round(f["mean"], 5),
            "final_loss_std": round(f["std"], 5), "final_loss_min": round(f["min"], 5),
            "final_loss_max": round(f["max"], 5), "vs_dense_pct": round(100 * s["vs_dense"], 3),
            "tokens_per_s": round(s["tokens_per_s"]), "median_step_ms": round(1000 * s["median_step_s"], 2),
            "train_seconds": round(s["train_seconds"], 2), "kept_fraction": round(s["kept_fraction"], 4),
            "slow_steps": s["slow_steps"], "devices": "; ".join(s["devices"]),
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("arm", "seeds", "final held-out loss (mean ± std) [min, max]", "vs dense", "tokens/s", "step ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['final_loss_mean']:.4f} ± {r['final_loss_std']:.4f} "
            f"[{r['final_loss_min']:.4f}, {r['final_loss_max']:.4f}] | {r['vs_dense_pct']:+.2f}% | "
            f"{r['tokens_per_s']:,} | {r['median_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(arms: dict[str, dict[str, Any]], path: str) -> str | None:
    """``curves.png``; returns None when matplotlib is missing (the tables are written regardless)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for arm, s in arms.items():
        curve = [p for p in s["curve"] if p["step"] > 0]  # step 0 (random init) would flatten the scale
        if not curve:
            continue
        loss = [p["loss"] for p in curve]
        low, high = [p["min"] for p in curve], [p["max"] for p in curve]
        for ax, key in zip(axes, ("step", "seconds"), strict=True):
            x = [p[key] for p in curve]
            (line,) = ax.plot(x, loss, label=f"{arm} (n={len(s['seeds'])})", linewidth=1.4)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    late = [p for s in arms.values() for p in s["curve"] if s["curve"] and p["step"] >= 0.2 * s["curve"][-1]["step"]]
    if late:  # zoom on the part after the first fifth of training, where the arms differ
        low, high = min(p["min"] for p in late), max(p["max"] for p in late)
        pad = 0.05 * (high - low) or 0.01
        for ax in axes:
            ax.set_ylim(low - pad, high + pad)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training wall-clock (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("held-out clean loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Held-out clean loss: mean over seeds, min-max shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_meta(results: list[dict[str, Any]], invocations: list[dict[str, Any]], directories: list[str]
             ) -> dict[str, Any]:
    """What a report says about where its runs come from: devices, versions, profiles, data fingerprints,
    the commands that made them (shared by this study's report and time_to_quality's)."""
    envs = [r["environment"] for r in results]
    return {
        "devices": sorted({e["device"] for e in envs}),
        "torch": sorted({e["torch"] for e in envs}),
        "transformers": sorted({e["transformers"] for e in envs}),
        "python": sorted({e["python"] for e in envs}),
        "profiles": sorted({r["profile"] for r in results}),
        "corpus_fingerprints": sorted({r["corpus_fingerprint"] for r in results}),
        "scores_fingerprints": sorted({r["scores_fingerprint"] for r in results}),
        "commands": [i["argv"] for i in invocations],
        "report_inputs": directories,
    }


def write_csv(path: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(path: str, text: list[str], meta: dict[str, Any], failures: list[str], png: str | None) -> None:
    """``text`` lines, then the plot's name, the commands and any failed runs, to ``path``."""
    text = [
        *text,
        f"Plot: {os.path.basename(png)}" if png else "Plot: not drawn (matplotlib is not installed here).",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in meta["commands"]],
    ]
    if failures:
        text += ["", "Failed runs:", "", *[f"- {f}" for f in failures]]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")


def write_report(directories: list[str], out: str | None = None) -> dict[str, Any]:
    """Write the report files (see the module docstring) and return the JSON payload."""
    out = out or os.path.join(directories[0], "report")
    results, invocations, failures = load_results(directories)
    if not results:
        raise FileNotFoundError(f"no finished run (runs/*/seed*/result.json) under {', '.join(directories)}")
    arms = summarize(results)
    rows = table_rows(arms)
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
    meta = run_meta(results, invocations, directories)
    lines = findings(arms)
    payload = {"meta": meta, "table": rows, "arms": arms, "findings": lines, "failures": failures}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    png = plot(arms, os.path.join(out, "curves.png"))
    write_summary(os.path.join(out, "summary.md"), meta, rows, lines, failures, png)
    return payload


def write_summary(path: str, meta: dict, rows: list[dict], lines: list[str], failures: list[str], png) -> None:
    warn = []
    if len(meta["corpus_fingerprints"]) > 1 or len(meta["scores_fingerprints"]) > 1:
        warn.append("**Warning:** the runs used more than one corpus or reference-score set (fingerprints "
                    f"{meta['corpus_fingerprints']} / {meta['scores_fingerprints']}); arms are not comparable.")
    if len(meta["devices"]) > 1:
        warn.append(f"**Note:** runs come from several devices ({', '.join(meta['devices'])}); compare wall-clock "
                    "only between arms measured on the same one.")
    text = [
        "# Utility study: held-out clean loss under token filtering and neuron omission",
        "",
        f"Profile {', '.join(meta['profiles'])}; device {', '.join(meta['devices'])}; torch "
        f"{', '.join(meta['torch'])}; transformers {', '.join(meta['transformers'])}; python "
        f"{', '.join(meta['python'])}; corpus {', '.join(meta['corpus_fingerprints'])}, reference scores "
        f"{', '.join(meta['scores_fingerprints'])}.",
        "",
        *warn,
        "",
        markdown_table(rows),
        "",
        "Final loss = held-out **clean** loss after the last step (nats/token). Step times exclude evaluation; "
        "the first step counts at the median (compilation). Verdicts: 'as expected' / 'NOT as expected' only "
        "when the seed ranges (min-max) do not overlap, else 'inconclusive'.",
        "",
        *lines,
    ]
    write_markdown(path, text, meta, failures, png)


def report_args(prog: str, doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The report command's arguments (``dirs``, ``--out``), shared with time_to_quality's report."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="study output directories (--out of the runner)")
    parser.add_argument("--out", default=None, help="report directory (default: DIR/report of the first DIR)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = report_args("python -m experiments.utility.report", __doc__, argv)
    payload = write_report(args.dirs, args.out)
    print(markdown_table(payload["table"]))
    print("\n".join(payload["findings"]))
    print(f"report written to {args.out or os.path.join(args.dirs[0], 'report')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
