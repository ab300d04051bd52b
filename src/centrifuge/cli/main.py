"""`centrifuge` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; imports of the heavy
parts (torch, transformers) happen inside ``run`` so that ``centrifuge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under centrifuge.cli
COMMANDS = {
    "train": "centrifuge.cli.train_cmd",
    "bench": "centrifuge.cli.bench_cmd",
    "score-reference": "centrifuge.cli.score_cmd",
    "plot": "centrifuge.cli.plot_cmd",
}


def package_version() -> str:
    """The installed distribution's version (``centrifuge-llm``), without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("centrifuge-llm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; pip install -e . from the repository)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centrifuge",
        description="Faster training of Hugging Face decoder LLMs by skipping tokens and neurons.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
