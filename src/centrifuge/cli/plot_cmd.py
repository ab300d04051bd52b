"""`centrifuge plot RUN [RUN ...] [--out FILE]`: loss curves of one run or several runs overlaid."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  centrifuge plot runs/dense runs/filtered --out compare.png   # two runs overlaid
  centrifuge plot runs/                                        # every run directly inside runs/
  centrifuge plot runs/my-run                                  # one run (writes runs/my-run/metrics.png)

Panels: loss by optimizer step, by tokens trained on and by training time (seconds in training steps:
evaluation and checkpoints excluded), and the kept-token fraction and omission rate by step. Thin lines are
the logged training loss, thick lines with markers the held-out loss; the legend names each run by the
config keys in which the runs differ. Live curves: tensorboard --logdir runs/ (one stream per run).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot",
        help="plot loss curves of runs (by step, tokens and wall-clock), several runs overlaid",
        description="Draw the metrics.jsonl of one or more `centrifuge train` runs into a PNG.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or a directory of runs)")
    parser.add_argument("--out", default=None, metavar="FILE.png",
                        help="output file (default: RUN/metrics.png for one run, compare.png for several)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from centrifuge.train.plot import PLOT_FILE, PlotError, find_runs, plot_runs

    try:
        runs = find_runs(args.runs)
        out = args.out or (os.path.join(runs[0], PLOT_FILE) if len(runs) == 1 else "compare.png")
        plot_runs(runs, out, title=args.title)
    except (PlotError, OSError) as err:
        print(f"centrifuge plot: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(runs)})")
    return 0
