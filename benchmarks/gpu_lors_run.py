"""Training runs with the ladder omission-rate schedule (LORS) against dense: throughput and loss curves.

Three `centrifuge train` runs of the same model, data order and seed (TinyLlama-1.1B shape by default,
bf16 autocast, 8 × 2048 tokens a step, the built-in Python-docs corpus):

* dense: ``tokens.keep_ratio=1.0``, no omission;
* lors: neuron omission (MLP channels + KV groups) at ρ₀ for half the steps, then ``rungs`` steps down to 0;
* tokens+lors: the same LORS together with token filtering at keep ratio κ (random selection, fast path).

Average throughput = tokens / training time over all steps after the first logging window (warm-up,
compilation of kernels), from each run's own ``metrics.jsonl`` (tokens/s per window of ``log.every`` steps,
combined as total tokens over total time). The held-out loss is evaluated every ``eval.every`` steps.
Results: OUT_DIR/lors_runs.json and, where matplotlib is importable, OUT_DIR/lors_runs.png (else run
``python3 benchmarks/gpu_lors_run.py --replot OUT_DIR`` later).

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_lors_run.py OUT_DIR [--steps 60]
CPU smoke run:       PYTHONPATH=src python3 benchmarks/gpu_lors_run.py /tmp/lors --device cpu --preset tiny \\
                         --batch 4 --seq 128 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

TARGET = 1.45  # SAT's continual pre-training throughput claim, × dense


def arms(args) -> dict[str, list[str]]:
    lors = [f"neurons.rate={args.rate}", "neurons.schedule=ladder", "neurons.hold_fraction=0.5",
            f"neurons.rungs={args.rungs}"]
    return {
        "dense": ["tokens.keep_ratio=1.0"],
        "lors": ["tokens.keep_ratio=1.0", *lors],
        "tokens+lors": [f"tokens.keep_ratio={args.keep}", *lors],
    }


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            (evals if record.get("split") == "eval" or "perplexity" in record else train).append(record)
    return train, evals


def average_throughput(train: list[dict], log_every: int) -> float:
    """Tokens / second over every logged window but the first (equal steps per window, equal tokens per
    step, so total tokens over total time is the harmonic mean of the window rates)."""
    rates = [r["tokens_per_s"] for r in train[1:]]
    return len(rates) / sum(1.0 / r for r in rates)


def run_arm(name: str, sets: list[str], args, root: str) -> dict:
    from centrifuge.train.config import load_config
    from centrifuge.train.loop import run_training

    common = [
        f"model.preset={args.preset}", f"data.seq_len={args.seq}", f"train.batch_size={args.batch}",
        f"train.steps={args.steps}", f"train.device={args.device}", "train.warmup_steps=10", "train.lr=6e-4",
        f"eval.every={args.eval_every}", f"eval.max_batches={args.eval_batches}", "checkpoint.every=0",
        "checkpoint.keep=1", f"log.every={args.log_every}", "log.progress=false", "log.tensorboard=false",
        f"train.out_dir={os.path.join(root, name)}", f"data.cache_dir={os.path.join(root, 'cache')}",
    ]
    tic = time.perf_counter()
    result = run_training(load_config(None, [*common, *sets]))
    wall = time.perf_counter() - tic
    train, evals = read_metrics(result.run_dir)
    return {
        "sets": sets, "wall_s": wall, "tokens_per_s": average_throughput(train, args.log_every),
        "train": [{k: r[k] for k in ("step", "loss", "tokens_per_s", "omit", "counted_fraction") if k in r}
                  for r in train],
        "eval": [{"step": r["step"], "loss": r["loss"]} for r in evals],
        "final_eval_loss": result.last_eval.loss if result.last_eval else None,
    }


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_rate) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["runs"].items():
        label = f"{name} ({r['throughput_x_dense']:.2f}× dense tokens/s)"
        ax_loss.plot([e["step"] for e in r["eval"]], [e["loss"] for e in r["eval"]], marker="o", label=label)
        steps = [t["step"] for t in r["train"]]
        ax_rate.plot(steps, [t["tokens_per_s"] / 1e3 for t in r["train"]], label=name)
    ax_loss.set(xlabel="step", ylabel="held-out loss", title="held-out loss")
    ax_rate.set(xlabel="step", ylabel="k tokens / s (window)", title="throughput")
    ax_loss.legend(fontsize=8)
    ax_rate.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"LORS runs, {meta['preset']} {meta['batch']}×{meta['seq']}, {meta['device']}, "
                 f"torch {meta['torch']}, transformers {meta['transformers']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--replot", action="store_true", help="only redraw OUT_DIR/lors_runs.png from the JSON")
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rate", type=float, default=0.5, help="ρ₀ of the ladder")
    p.add_argument("--rungs", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.5, help="token keep ratio of the tokens+lors run")
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arms", default="dense,lors,tokens+lors")
    args = p.parse_args()
    json_path = os.path.join(args.out_dir, "lors_runs.json")
    png_path = os.path.join(args.out_dir, "lors_runs.png")
    if args.replot:
        with open(json_path, encoding="utf-8") as f:
            print("plot:", png_path if plot(json.load(f), png_path) else "matplotlib missing")
        return 0

    import torch
    import transformers

    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device(args.device)
    result = {"meta": {
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rate": args.rate,
        "rungs": args.rungs, "keep": args.keep, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join(["python3", *sys.argv]),
    }, "runs": {}}
    chosen = args.arms.split(",")
    with tempfile.TemporaryDirectory() as root:
        for name, sets in arms(args).items():
            if name in chosen:
                result["runs"][name] = run_arm(name, sets, args, root)
                print(f"{name}: {result['runs'][name]['tokens_per_s']:,.0f} tokens/s, final held-out loss "
                      f"{result['runs'][name]['final_eval_loss']:.4f}", flush=True)
    base = result["runs"].get("dense")
    for r in result["runs"].values():
        r["throughput_x_dense"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    drawn = plot(result, png_path)
    print(f"\n{args.preset}, {args.batch}×{args.seq} tokens a step, {args.steps} steps, LORS ρ₀={args.rate} "
          f"(hold half, {args.rungs} rungs), tokens κ={args.keep}")
    print(f"{'run':14s} {'tokens/s':>10s} {'× dense':>8s} {'final held-out loss':>20s}")
    for name, r in result["runs"].items():
        print(f"{name:14s} {r['tokens_per_s']:10,.0f} {r['throughput_x_dense']:8.3f} {r['final_eval_loss']:20.4f}")
    print(f"target: a LORS run ≥ {TARGET}× dense throughput (SAT). results: {json_path}"
          + ("" if drawn else " (no matplotlib: --replot later)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
