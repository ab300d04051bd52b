"""`centrifuge score-reference`: precompute a reference model's per-token losses for Rho-1 selection.

The training data is read, split, tokenized and packed exactly as `centrifuge train` does with the same
config (same functions, same ``data`` section and ``train.seed``), so the scores line up with the training
sequences; the manifest records the dataset fingerprint, tokenizer hash and sequence length, and training
refuses scores that do not match.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_cmd: busy-waiting OpenMP threads on shared CPUs

EPILOG = """\
examples:
  centrifuge score-reference --model runs/ref/checkpoints/step-0000240 --out scores/ref
  centrifuge score-reference my.yaml --model /models/ref --out scores/ref --batch 16
  centrifuge score-reference --model /models/ref --data corpus/ --seq-len 2048 --out scores/ref

The data options mean what the training config's keys mean (CONFIG.yaml, else the built-in default, then
--set, then the shortcuts --data / --seq-len / --tokenizer / --eval-fraction / --seed). Use the SAME data
settings for training, and point training at --out. An interrupted run resumes: run the same command again.

tokenizer "auto": the training model's directory (model.path) if it has a tokenizer, else the reference
model's directory if it has one, else a byte-level BPE trained like `centrifuge train` does.

exit status: 0 done, 2 bad input (config, data, model, an --out directory holding another job).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score-reference",
        help="precompute reference per-token losses for Rho-1 token selection",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="the training config whose data to score (default: built-in)")
    p.add_argument("--model", required=True, metavar="REF",
                   help="reference model: a local Hugging Face directory (e.g. a centrifuge checkpoint), or a "
                        "preset name (random init: for tests only)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one training-config key (repeatable), e.g. --set data.seq_len=512")
    p.add_argument("--data", default=None, metavar="PATH", help="shortcut for --set data.path=PATH")
    p.add_argument("--seq-len", type=int, default=None, help="shortcut for --set data.seq_len=N")
    p.add_argument("--tokenizer", default=None, help="shortcut for --set data.tokenizer=auto|train|PATH")
    p.add_argument("--eval-fraction", type=float, default=None, help="shortcut for --set data.eval_fraction=F")
    p.add_argument("--seed", type=int, default=None, help="shortcut for --set train.seed=N (it decides the split)")
    p.add_argument("--batch", type=int, default=8, help="sequences per reference forward (default 8)")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per output shard (default 1024)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="reference model weights (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--store", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the stored losses (default float32: 4 bytes per token)")
    p.add_argument("--chunk-size", type=int, default=2048, help="LM-head rows per cross-entropy chunk")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (off when stderr is not a terminal)")
    p.set_defaults(func=run)
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("data", "data.path"), ("seq_len", "data.seq_len"), ("tokenizer", "data.tokenizer"),
                      ("eval_fraction", "data.eval_fraction"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def _model_id(spec: str) -> str:
    return os.path.realpath(spec) if os.path.isdir(spec) else spec


def score_reference(
    config: Any,
    model: str,
    out_dir: str,
    *,
    batch_size: int = 8,
    shard_size: int = 1024,
    device: str = "auto",
    dtype: str = "auto",
    store: str = "float32",
    chunk_size: int = 2048,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Score the training split that ``config`` (a ``centrifuge.train.config.Config``) defines with the
    reference ``model`` (directory or preset) and write ``out_dir``. Returns the manifest.

    Raises ``TrainError`` (bad config / data), ``ReferenceScoresError`` (another job in ``out_dir``, a
    reference tokenizer that differs from the training one) or ``FileNotFoundError`` (no such model)."""
    import torch

    from centrifuge.tokens.reference import (
        STORE_DTYPES,
        OnlineReference,
        ReferenceScoresError,
        load_reference_model,
        tokenizer_hash,
        write_reference_scores,
    )
    from centrifuge.train.data import build_datasets, read_documents, split_documents
    from centrifuge.train.errors import ConfigError
    from centrifuge.train.loop import model_config, obtain_tokenizer, resolve_device
    from centrifuge.train.tokenizer import has_tokenizer, load_tokenizer

    hf_config = model_config(config)  # the *training* model's config: vocabulary size, seq_len limit
    docs, source = read_documents(config.data)
    train_docs, eval_docs = split_documents(docs, config.data.eval_fraction, seed=config.train.seed)
    choice = config.data.tokenizer
    if choice == "auto":
        if config.model.path is not None and has_tokenizer(config.model.path):
            choice = config.model.path
        elif os.path.isdir(model) and has_tokenizer(model):
            choice = model
        else:
            choice = "train"
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=choice))
    tokenizer, how = obtain_tokenizer(config, train_docs, int(hf_config.vocab_size), run_dir="", resume=False)
    tok_hash = tokenizer_hash(tokenizer)
    if os.path.isdir(model) and has_tokenizer(model) and os.path.realpath(model) != os.path.realpath(choice):
        ref_hash = tokenizer_hash(load_tokenizer(model))
        if ref_hash != tok_hash:
            raise ReferenceScoresError(
                f"the reference model's tokenizer ({model}) differs from the training tokenizer ({how}); "
                "reference losses are only meaningful with the same tokenizer (set data.tokenizer to the "
                "reference's, or use a reference trained with the training tokenizer)"
            )
    data = build_datasets(train_docs, eval_docs, tokenizer, seq_len=config.data.seq_len, source=source,
                          token_cache=config.data.token_cache)
    train = data.train
    log(f"data: {data.describe().splitlines()[0]}")
    log(f"tokenizer: {how}")

    dev = resolve_device(device)
    weights = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else torch.float32
    if os.path.isdir(model) and not any(name.endswith(".safetensors") for name in os.listdir(model)):
        raise ConfigError(f"--model {model!r} holds no .safetensors weights (is it a model directory? pickled "
                          ".bin weights are never loaded)")
    try:
        ref_model = load_reference_model(model, dtype=weights, seed=config.train.seed).to(dev)
    except FileNotFoundError:
        raise
    except Exception as err:  # not a model directory, unknown model_type, unreadable weights, ...
        raise ConfigError(f"--model {model!r}: cannot load a model from it ({' '.join(str(err).split())})") \
            from None
    params = sum(p.numel() for p in ref_model.parameters())
    log(f"reference: {model} ({ref_model.config.model_type}, {params / 1e6:.2f}M parameters) on {dev}, "
        f"{str(weights).removeprefix('torch.')}")
    reference = OnlineReference(ref_model, chunk_size=chunk_size, model_id=_model_id(model))
    extra = {"data": dataclasses.asdict(config.data), "seed": config.train.seed, "source": source,
             "tokenizer": how}
    started = time.perf_counter()
    manifest = write_reference_scores(
        reference, train, out_dir, tokenizer_hash=tok_hash, model_id=_model_id(model), batch_size=batch_size,
        shard_size=shard_size, dtype=STORE_DTYPES[store], progress=progress, extra=extra,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    log(f"scored {manifest['num_sequences']} sequences of {manifest['seq_len']} tokens "
        f"({len(manifest['shards'])} shards) in {seconds:.1f} s -> {os.path.join(out_dir, 'manifest.json')}")
    return manifest


def run(args: argparse.Namespace) -> int:
    from centrifuge.tokens.reference import ReferenceScoresError
    from centrifuge.train.config import load_config
    from centrifuge.train.errors import TrainError

    if args.batch < 1 or args.shard_size < 1 or args.chunk_size < 1:
        print("centrifuge score-reference: error: --batch, --shard-size and --chunk-size must be ≥ 1",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, _overrides(args))
        score_reference(
            config, args.model, args.out, batch_size=args.batch, shard_size=args.shard_size, device=args.device,
            dtype=args.dtype, store=args.store, chunk_size=args.chunk_size,
            progress=not args.no_progress and sys.stderr.isatty(),  # no bar debris in a log file
        )  # fmt: skip
    except (TrainError, ReferenceScoresError, FileNotFoundError) as err:
        print(f"centrifuge score-reference: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("centrifuge score-reference: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"train with: --set tokens.reference_scores={args.out}")
    return 0
