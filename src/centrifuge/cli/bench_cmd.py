"""``centrifuge bench``: time dense (eager, compiled, Liger-Kernel), loss-only, ideal, narrow and Centrifuge
training steps in one process; ratios are to the strongest dense measured.

Examples::

    centrifuge bench                                   # GPU: TinyLlama shape, 8×2048, κ=0.5, default variants
    centrifuge bench --keep 0.2 0.3 0.5 0.7 0.9        # keep-ratio sweep
    centrifuge bench --seq 2048 4096 16384 --tokens 16384          # sequence sweep, constant tokens
    centrifuge bench --preset llama2-7b qwen3-0.6b --variants dense,ideal,ideal+ckpt,dense+ckpt
    centrifuge bench --device cpu --reps 2             # CPU smoke run (tiny preset)
    centrifuge bench --list                            # registered variants and modifiers
    centrifuge bench --replot DIR                      # redraw table and plot from DIR/results.json

Results go to ``--out DIR`` (default ``runs/bench/<time>``): results.json, results.csv, table.txt,
bench.png. The ratio table is printed last.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

DEFAULT_VARIANTS = "default"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark training-step variants against dense (ratios in one process)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", nargs="+", default=None, metavar="NAME",
                   help="model preset(s) (default: tinyllama-1.1b on CUDA, tiny on the CPU)")
    p.add_argument("--layers", nargs="+", default=None, metavar="N|PRESET=N",
                   help="truncate to N decoder layers (all presets, or per preset as PRESET=N); "
                        "default: llama2-7b=8, gemma3-4b=8, qwen3-moe-30b-a3b=2, others full depth")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--seq", nargs="+", type=int, default=None, metavar="T",
                   help="sequence length(s) (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per step: batch = tokens // seq for every --seq (default with several "
                        "--seq values: batch × the first seq)")
    p.add_argument("--keep", nargs="+", type=float, default=[0.5], metavar="κ",
                   help="keep ratio(s) of the token-filtering variants (default 0.5)")
    p.add_argument("--omit", type=float, default=0.5, metavar="ρ",
                   help="omission rate of narrow / narrow_heads shapes (default 0.5)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma list: dense,dense_compiled,dense_liger,loss_only,ideal,narrow,narrow_heads,"
                        "centrifuge,... with modifiers +ckpt, +narrow, +narrow_heads (e.g. ideal+ckpt); 'default', "
                        "'all' (see --list). Ratios are to the fastest dense variant measured")
    p.add_argument("--reps", type=int, default=10, help="measured repetitions (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up repetitions (default 3)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "amp-bf16"], default=None,
                   help="weight dtype (default bf16 on CUDA, fp32 on CPU); amp-bf16 = fp32 weights with the forwards "
                        "under bf16 autocast (mixed precision, as centrifuge train and Trainer(bf16=True) run)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: from the device name, 989 for H100/H200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--count-flops", action="store_true",
                   help="also count forward/backward FLOPs of one step with FlopCounterMode")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="skip the remaining measurements after S seconds (results so far are kept)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/bench/<time>)")
    p.add_argument("--no-plot", action="store_true", help="do not draw bench.png")
    p.add_argument("--list", action="store_true", help="list variants and modifiers, then exit")
    p.add_argument("--replot", default=None, metavar="DIR",
                   help="redraw table.txt and bench.png from DIR/results.json (into --out or DIR)")
    return p


def _parse_layers(items: list[str] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or []:
        preset, sep, n = item.rpartition("=")
        out[preset if sep else "*"] = int(n)
    return out


def _command_line(args: argparse.Namespace, resolved: dict[str, Any]) -> str:
    """A canonical ``centrifuge bench ...`` reproducing this run (every default made explicit)."""
    parts = ["centrifuge", "bench", "--preset", *resolved["presets"], "--batch", str(resolved["batch"]),
             "--seq", *map(str, resolved["seqs"])]
    if resolved["tokens"] is not None:
        parts += ["--tokens", str(resolved["tokens"])]
    if args.layers:
        parts += ["--layers", *args.layers]
    parts += ["--keep", *(f"{k:g}" for k in args.keep), "--omit", f"{args.omit:g}",
              "--variants", resolved["variants"], "--reps", str(args.reps), "--warmup", str(args.warmup),
              "--device", resolved["device"], "--dtype", resolved["dtype"], "--seed", str(args.seed),
              "--lr", f"{args.lr:g}"]
    if args.peak_tflops is not None:
        parts += ["--peak-tflops", f"{args.peak_tflops:g}"]
    if args.count_flops:
        parts.append("--count-flops")
    if args.time_limit is not None:
        parts += ["--time-limit", f"{args.time_limit:g}"]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def _replot(args: argparse.Namespace) -> int:
    from centrifuge.bench import report

    meta, rows = report.load_json(args.replot)
    paths = report.write_results(args.out or args.replot, meta, rows, plot_file=not args.no_plot)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(report.format_table(rows, meta))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        from centrifuge.bench.variants import describe_variants
        from centrifuge.models.presets import PRESETS

        print(describe_variants())
        print("presets:")
        for name, preset in PRESETS.items():
            print(f"  {name:22s}{preset.description}")
        return 0
    if args.replot:
        return _replot(args)

    import torch

    from centrifuge.bench import report
    from centrifuge.bench.flops import peak_tflops
    from centrifuge.bench.harness import BenchOptions, compositions, run_bench
    from centrifuge.bench.variants import parse_variants
    from centrifuge.models.presets import PRESETS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("centrifuge bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    presets = args.preset or (["tinyllama-1.1b"] if gpu else ["tiny"])
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        print(f"centrifuge bench: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}",
              file=sys.stderr)
        return 2
    batch = args.batch or (8 if gpu else 2)
    seqs = args.seq or ([2048] if gpu else [128])
    tokens = args.tokens
    if tokens is None and len(seqs) > 1:
        tokens = batch * seqs[0]
        print(f"[bench] several --seq values: {tokens} tokens per step (batch = {tokens} // seq)")
    bad = [k for k in args.keep if not 0.0 < k <= 1.0]
    if bad or not 0.0 <= args.omit < 1.0 or args.reps < 1 or args.warmup < 0:
        print("centrifuge bench: need 0 < --keep ≤ 1, 0 ≤ --omit < 1, --reps ≥ 1, --warmup ≥ 0",
              file=sys.stderr)
        return 2
    try:
        specs = parse_variants(args.variants)
    except ValueError as err:
        print(f"centrifuge bench: {err}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    if not gpu and any(p not in ("tiny", "qwen2-tiny") for p in presets):
        print("[bench] warning: large preset on the CPU; CPU runs are smoke tests only", file=sys.stderr)
    try:
        opts = BenchOptions(
            presets=presets, variants=specs, seqs=seqs, batch=batch, tokens=tokens, keeps=list(args.keep),
            omit=args.omit, layers=_parse_layers(args.layers), reps=args.reps, warmup=args.warmup,
            device=device, dtype=dtype, seed=args.seed, lr=args.lr, peak_tflops=args.peak_tflops,
            count_flops=args.count_flops, time_limit=args.time_limit,
        )
        opts.groups()  # validates --tokens against every --seq
    except ValueError as err:
        print(f"centrifuge bench: {err}", file=sys.stderr)
        return 2
    out_dir = args.out or f"runs/bench/{time.strftime('%Y%m%d-%H%M%S')}"
    resolved = {"presets": presets, "batch": batch, "seqs": seqs, "tokens": tokens, "device": device,
                "dtype": dtype, "variants": ",".join(s.label for s in specs)}
    env = report.environment(device)
    meta: dict[str, Any] = {
        "tool": "centrifuge bench",
        "started": report.now(),
        "command": _command_line(args, resolved),
        "argv": list(sys.argv),
        "config": {
            "presets": presets, "layers": opts.layers, "groups": _groups(opts),
            "batch": batch, "seqs": seqs, "tokens": tokens, "keeps": list(args.keep), "omit": args.omit,
            "variants": [s.label for s in specs], "reps": args.reps, "warmup": args.warmup, "device": device,
            "dtype": dtype, "seed": args.seed, "lr": args.lr, "optimizer": "AdamW (fused on CUDA)",
            "attn_implementation": "sdpa", "count_flops": args.count_flops, "time_limit": args.time_limit,
            "peak_tflops": peak_tflops(env["device_name"] or "", args.peak_tflops),
        },
        "environment": env,
        "compositions": compositions(specs),
    }
    print(f"[bench] {env['device_name']} · torch {env['torch']} · transformers {env['transformers']} · "
          f"out {out_dir}")

    def save(rows: list[dict[str, Any]]) -> None:
        report.write_results(out_dir, meta, rows, final=False)

    rows = run_bench(opts, on_row=save)
    meta["finished"] = report.now()
    paths = report.write_results(out_dir, meta, rows, plot_file=not args.no_plot)
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}")
    print()
    print(report.format_table(rows, meta))
    return 1 if any(str(r["status"]).startswith("error") for r in rows) else 0


def _groups(opts: Any) -> list[Any]:
    import dataclasses

    return [dataclasses.asdict(g) for g in opts.groups()]
