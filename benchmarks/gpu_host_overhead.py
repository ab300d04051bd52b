"""Is a training step limited by the GPU or by the host (Python, dispatch, kernel launches, synchronisations)?

For each variant (dense; token-sparse with compiled / eager element-wise ops, with the autograd replay instead
of the hand-written backward, and with stock attention kernels; neuron omission; both), three measurements:

* ``host_ms``: the step time of the *same depth* model made so narrow (hidden 256, 4 heads of 64) that GPU
  work is negligible — the host's cost of issuing one step;
* ``issue_ms`` / ``step_ms`` at the full shape: the time until ``optimizer.step()`` returns on the host,
  and until the GPU has finished (synchronised). ``issue ≈ step`` means the GPU waited for the host;
* ``syncs``: host-device synchronisations in one step (``torch.cuda.set_sync_debug_mode``), with the first
  few call sites.

``--cprofile`` adds a cProfile of a few steps per variant (``--cprofile-variants``, default the token-sparse
ones) at the full shape and at the narrow one (where every second is host time): the top functions by own
time and by cumulative time. Results: OUT_DIR/host_overhead.json (+ cprofile_<variant>[_narrow].txt).

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_host_overhead.py OUT_DIR [--cprofile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback
import warnings

import torch
import transformers

import centrifuge
from centrifuge import neurons
from centrifuge.bench.variants import random_keep_mask
from centrifuge.models.presets import build_model, preset_config

VARIANTS = ("dense", "tokens", "tokens/replay", "tokens/eager", "tokens/sdpa", "omit", "tokens+omit")


def build(config, device):
    config.use_cache = False
    with torch.device(device):
        model = build_model(config, dtype=torch.bfloat16, attn_implementation="sdpa", seed=0)
    return model.to(device).train()


def setup(model, variant: str, keep):
    """Patch ``model`` for ``variant``; returns (step kwargs, per-step hook, undo)."""
    omitter = None
    kwargs = {}
    if variant.startswith("tokens"):
        compile_ = False if variant == "tokens/eager" else None
        attention = "sdpa" if variant == "tokens/sdpa" else "auto"
        backward = "replay" if variant == "tokens/replay" else "auto"
        centrifuge.apply(model, mode="fast", compile=compile_, attention=attention, backward=backward)
        kwargs = {"keep_mask": keep}
    if "omit" in variant:
        omitter = neurons.attach(model, rate=0.5, metric="activation", select="sample", heads=True, seed=0)

    def hook(step: int) -> None:
        if omitter is not None:
            omitter.plan(step)

    def undo() -> None:
        if omitter is not None:
            omitter.revert()
        if variant.startswith("tokens"):
            centrifuge.revert(model)
    return kwargs, hook, omitter, undo


def make_step(model, ids, variant, keep):
    kwargs, hook, omitter, undo = setup(model, variant, keep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    if omitter is not None:
        omitter.protect(opt)
    counter = [0]

    def step(record=lambda name: contextlib.nullcontext()) -> list[float]:
        """One step; returns the host seconds of its phases (plan, forward, backward, optimizer).
        ``record(name)``: a context around each phase (``gpu_step_trace.py`` passes the profiler's)."""
        t = [time.perf_counter()]
        with record("plan"):
            hook(counter[0])
        counter[0] += 1
        t.append(time.perf_counter())
        with record("forward"):
            loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
        t.append(time.perf_counter())
        with record("backward"):
            loss.backward()
        t.append(time.perf_counter())
        with record("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]
    return step, undo


def timed(step, *, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    issue, total, phases = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        phases.append(step())
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        issue.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    # issue time per phase (the host's own time where the GPU keeps up, as in the narrow model)
    names = ("plan", "forward", "backward", "optimizer")
    return {"issue_ms": statistics.median(issue), "step_ms": statistics.median(total),
            "phase_issue_ms": {n: statistics.median(p[i] for p in phases) * 1e3 for i, n in enumerate(names)}}


def count_syncs(step) -> dict:
    sites: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites.append(f"{os.path.relpath(w.filename)}:{w.lineno}")
    return {"syncs": len(sites), "sites": sorted(set(sites))[:12]}


def slug(variant: str) -> str:
    return variant.replace("/", "_").replace("+", "_")


def write_profile(step, path: str, steps: int = 3) -> None:
    """cProfile of ``steps`` steps: the top functions by own time, then by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    text.write(f"{steps} steps\n")
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(50)
    stats.sort_stats("cumulative").print_stats(90)
    with open(path, "w") as f:
        f.write(text.getvalue())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--cprofile-variants", default=None,
                   help="comma-separated variants to profile (default: those starting with 'tokens')")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device("cuda")
    variants = args.variants.split(",")
    profiled = args.cprofile_variants.split(",") if args.cprofile_variants else None
    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name(), "args": vars(args), "variants": {}}
    t_start = time.time()
    for size in ("narrow", "full"):
        if size == "narrow":
            config = preset_config("tinyllama-1.1b", hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64)
            batch, seq = 1, 512
        else:
            config = preset_config("tinyllama-1.1b")
            batch, seq = args.batch, args.seq
        model = build(config, device)
        ids = torch.randint(1, config.vocab_size, (batch, seq), device=device)
        keep = random_keep_mask(batch, seq, 0.5, seed=0, device=device)
        for variant in variants:
            entry = result["variants"].setdefault(variant, {})
            try:
                step, undo = make_step(model, ids, variant, keep)
                out = timed(step, warmup=4, reps=args.reps)
                if size == "narrow":
                    entry["host_ms"] = out["step_ms"]
                    entry["host_phase_ms"] = out["phase_issue_ms"]
                else:
                    entry.update(out)
                    entry.update(count_syncs(step))
                if args.cprofile and (variant in profiled if profiled else variant.startswith("tokens")):
                    suffix = "_narrow" if size == "narrow" else ""
                    write_profile(step, os.path.join(args.out_dir, f"cprofile_{slug(variant)}{suffix}.txt"))
                undo()
            except Exception:  # keep going: one variant's failure should not lose the others
                entry[f"error_{size}"] = traceback.format_exc()[-2000:]
            print(size, variant, entry, flush=True)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    result["wall_s"] = time.time() - t_start
    with open(os.path.join(args.out_dir, "host_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'variant':14s} {'host ms (narrow)':>17s} {'issue ms':>9s} {'step ms':>9s} {'syncs':>6s}")
    for name, e in result["variants"].items():
        print(f"{name:14s} {e.get('host_ms', float('nan')):17.1f} {e.get('issue_ms', float('nan')):9.1f} "
              f"{e.get('step_ms', float('nan')):9.1f} {e.get('syncs', -1):6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
