"""`centrifuge train [CONFIG.yaml] [--set section.key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  centrifuge train                                   # tiny model on the Python docs, CPU, ~1.5 minutes
  centrifuge train my.yaml --set train.steps=1000    # your config, one key changed
  centrifuge train --resume                          # continue the newest run under runs/
  centrifuge train --print-config > my.yaml          # start a config from the built-in default

exit status: 0 done, 1 training stopped (non-finite loss), 2 bad input (config, data, checkpoint),
130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a model (built-in default: a tiny Llama on the Python docs, on the CPU)",
        description="Train a Hugging Face causal LM from a YAML config (default: the built-in demo config).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="config file (default: built-in)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set train.steps=100",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in train.out_dir (with no CONFIG: with the run's own config)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from centrifuge.train import distributed
    from centrifuge.train.config_doc import commented_yaml
    from centrifuge.train.errors import TrainError
    from centrifuge.train.loop import load_run_config, run_training

    # Under torchrun every rank reads the same config and files, so bad input fails alike on all of them:
    # rank 0 alone reports it.
    main = os.environ.get("RANK", "0") == "0"
    try:
        config = load_run_config(args.config, args.overrides, resume=args.resume)
        if args.print_config:
            if main:  # with default.yaml's comment on every key: a config to start from that explains itself
                sys.stdout.write(commented_yaml(config))
            return 0
        result = run_training(config, resume=args.resume)
    except TrainError as err:
        if main:
            # one line, whatever the message quotes (library errors may span several)
            print(f"centrifuge train: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("centrifuge train: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return result.exit_code
