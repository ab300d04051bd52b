"""Plot the hybrid kept-token attention backward against version 1 and SDPA from the benchmark's JSON.

Usage: python benchmarks/plot_attention_hybrid.py RESULTS/attention_hybrid.json OUT.png
(one panel per S × B case: backward time over SDPA's full causal backward, per keep fraction κ).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("v1", "version 1 (Triton dq + dkdv)"),
          ("hybrid_cudnn_dense", "hybrid, the benchmark's own (no size gate)"),
          ("lib", "library, _dqf after cuDNN (in place)"),
          ("lib_overlap", "library, _dqf on a side stream (default)")]


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        res = json.load(f)
    cases = [c for c in res["cases"] if any("ratios" in r for r in c["rows"])]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.4 * len(cases), 4.0), sharey=True)
    axes = axes if len(cases) > 1 else [axes]
    width = 0.8 / len(SERIES)
    for ax, case in zip(axes, cases, strict=True):
        rows = [r for r in case["rows"] if "ratios" in r]
        for i, (key, label) in enumerate(SERIES):
            xs = [j + (i - (len(SERIES) - 1) / 2) * width for j in range(len(rows))]
            ys = [r["ratios"].get(key, float("nan")) for r in rows]
            bars = ax.bar(xs, ys, width, label=label)
            for b, y, r in zip(bars, ys, rows, strict=True):
                path = r.get(f"{key}_path", "")
                tag = f"{y:.2f}" + ("*" if key.startswith("lib") and path == "triton" else "")
                ax.text(b.get_x() + b.get_width() / 2, y + 0.01, tag, ha="center", va="bottom", fontsize=6,
                        rotation=90)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(0.45, color="red", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), [f"κ={r['kappa']}" for r in rows])
        ax.set_title(f"S={case['S']} × B={case['B']} (SDPA bwd {case['sdpa_bwd']['ms']:.2f} ms)", fontsize=9)
    axes[0].set_ylabel("backward time / SDPA full causal backward")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Kept-token attention backward, {res['device']}, H=32 Hkv=4 D=64 bf16 "
                 "(* = library took version 1; red: 0.45 target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
