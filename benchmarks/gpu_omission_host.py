"""Host cost of neuron omission, phase by phase: where do the Python / dispatch milliseconds of a step go?

The TinyLlama-1.1B depth (22 layers) made so narrow (hidden 256, 4 heads of 64, batch 1 × 512) that GPU work
is negligible, so wall time ≈ host time. Per variant (dense, omit-mlp, omit-mlp+heads and the same with
token filtering), the median host milliseconds of each phase of a step: ``plan`` (``omitter.plan``),
``forward``, ``backward``, ``optimizer`` (``step`` + ``zero_grad``, with the omission optimizer mask), then
the host-device synchronisations of one step and a cProfile of a few steps (own time, and cumulative time
of ``centrifuge`` functions). Results: OUT_DIR/omission_host.json and cprofile_<variant>.txt.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_omission_host.py OUT_DIR [--variants a,b]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
from gpu_host_overhead import count_syncs  # a sibling script: benchmarks/ is sys.path[0] when run

import centrifuge
from centrifuge import neurons
from centrifuge.bench.variants import random_keep_mask
from centrifuge.models.presets import build_model, preset_config

VARIANTS = ("dense", "omit-mlp", "omit-mlp+heads", "tokens", "tokens+omit-mlp", "tokens+omit-mlp+heads")
PHASES = ("plan", "forward", "backward", "optimizer")


def make_step(model, ids, kwargs: dict, omitter, opt):
    """One training step; ``step(times)`` appends each phase's host milliseconds to ``times[phase]``."""
    counter = [0]

    def step(times: dict | None = None) -> None:
        marks = [time.perf_counter()]
        if omitter is not None:
            omitter.plan(counter[0])
        counter[0] += 1
        marks.append(time.perf_counter())
        loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if times is not None:
            for name, a, b in zip(PHASES, marks, marks[1:], strict=False):
                times[name].append((b - a) * 1e3)
    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = preset_config("tinyllama-1.1b", hidden_size=256, intermediate_size=704, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64)
    config.use_cache = False
    with torch.device(device):
        model = build_model(config, dtype=torch.bfloat16, attn_implementation="sdpa", seed=0)
    model = model.to(device).train()
    ids = torch.randint(1, config.vocab_size, (1, 512), device=device)
    keep = random_keep_mask(1, 512, 0.5, seed=0, device=device)
    result: dict = {"torch": torch.__version__, "args": vars(args), "variants": {}}
    for variant in args.variants.split(","):
        kwargs = {}
        if variant.startswith("tokens"):
            centrifuge.apply(model, mode="fast")
            kwargs = {"keep_mask": keep}
        omitter = None
        if "omit" in variant:
            omitter = neurons.attach(model, rate=0.5, metric="activation", select="sample", heads="heads" in variant,
                                     multiple=64, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=cuda)
        if omitter is not None:
            omitter.protect(opt)
        step = make_step(model, ids, kwargs, omitter, opt)
        for _ in range(5):
            step()
        sync()
        times = {name: [] for name in PHASES}
        totals = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step(times)
            sync()
            totals.append((time.perf_counter() - t0) * 1e3)
        entry = {name: statistics.median(v) for name, v in times.items()}
        entry["step"] = statistics.median(totals)
        if cuda:
            entry["sync_sites"] = count_syncs(step)["sites"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        sync()
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumtime").print_stats("centrifuge", 45)
        with open(os.path.join(args.out_dir, f"cprofile_{variant.replace('+', '_')}.txt"), "w") as f:
            f.write(text.getvalue())
        result["variants"][variant] = entry
        print(variant, {k: round(v, 2) if isinstance(v, float) else v for k, v in entry.items()}, flush=True)
        if omitter is not None:
            omitter.revert()
        if variant.startswith("tokens"):
            centrifuge.revert(model)
        del opt, step
    with open(os.path.join(args.out_dir, "omission_host.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'variant':24s} " + " ".join(f"{n:>9s}" for n in (*PHASES, "step")))
    for name, e in result["variants"].items():
        print(f"{name:24s} " + " ".join(f"{e[n]:9.2f}" for n in (*PHASES, "step")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
