"""Where does a training step's GPU wait? A torch.profiler trace of a few steps, summarised.

For each variant (as in ``gpu_host_overhead.py``): the step's wall time, the GPU's busy time (union of its
kernels and copies), the idle gaps longer than ``--gap-ms`` with the phase they fall in (plan / forward /
backward / optimizer) and the kernels on either side, and the host calls that blocked on the GPU
(synchronisations, device-to-host copies) with their durations. ``busy ≈ step`` means GPU-bound; large gaps
after a blocking call mean the host restarted from an empty queue there.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_step_trace.py OUT_DIR [--variants tokens+omit]
Writes OUT_DIR/step_trace.json (+ trace_<variant>.json.gz with ``--keep-trace``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from gpu_host_overhead import build, make_step, slug  # noqa: E402
from multi_gpu import union  # noqa: E402  (merged busy intervals: one definition)

from centrifuge.bench.variants import random_keep_mask  # noqa: E402
from centrifuge.models.presets import preset_config  # noqa: E402

PHASES = ("plan", "forward", "backward", "optimizer")
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
            "cudaMemcpyAsync", "cudaStreamWaitEvent")


def summarise(trace: dict, *, gap_ms: float) -> dict:
    """Per profiled step: wall, GPU busy, idle gaps (> gap_ms) and blocking host calls (> 0.05 ms)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    marks = [e for e in events if e.get("cat") == "user_annotation"]
    steps = sorted((e for e in marks if e["name"].startswith("step ")), key=lambda e: e["ts"])
    phases = [e for e in marks if e["name"] in PHASES]
    gpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    out = []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        inside = sorted((g for g in gpu if t0 <= g[0] < t1), key=lambda g: g[0])
        busy = union([(a, min(b, t1)) for a, b, _ in inside])
        busy_us = sum(b - a for a, b in busy)

        def phase_at(t: float) -> str:
            for p in phases:
                if p["ts"] <= t < p["ts"] + p["dur"]:
                    return p["name"]
            return "between"

        gaps = []
        prev_end, prev_name = t0, "(step start)"
        for a, b, name in inside:
            if a - prev_end > gap_ms * 1e3:
                gaps.append({"ms": (a - prev_end) / 1e3, "at_ms": (prev_end - t0) / 1e3,
                             "phase": phase_at(prev_end), "after": prev_name[:80], "before": name[:80]})
            if b > prev_end:
                prev_end, prev_name = b, name
        blocking = [{"name": e["name"], "ms": e["dur"] / 1e3, "at_ms": (e["ts"] - t0) / 1e3,
                     "phase": phase_at(e["ts"])}
                    for e in runtime if t0 <= e["ts"] < t1 and e["name"].startswith(BLOCKING) and e["dur"] > 50]
        phase_ms = {p["name"]: p["dur"] / 1e3 for p in phases if t0 <= p["ts"] < t1}
        out.append({"step_ms": s["dur"] / 1e3, "gpu_busy_ms": busy_us / 1e3, "kernels": len(inside),
                    "phase_host_ms": phase_ms, "idle_ms": (s["dur"] - busy_us) / 1e3,
                    "gaps": sorted(gaps, key=lambda g: -g["ms"])[:15], "gaps_total_ms": sum(g["ms"] for g in gaps),
                    "blocking": sorted(blocking, key=lambda b: -b["ms"])[:15]})
    return {"steps": out}


def annotated(step):
    """``step`` (from ``make_step``) with record_function ranges per phase (the hook / model / backward /
    optimizer calls are inside it, so the ranges are drawn around the whole call and its parts by time)."""
    counter = [0]

    def run():
        with torch.profiler.record_function(f"step {counter[0]}"):
            counter[0] += 1
            return step(record=torch.profiler.record_function)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--variants", default="dense,tokens,tokens+omit")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gap-ms", type=float, default=0.2)
    p.add_argument("--keep-trace", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device("cuda")
    config = preset_config("tinyllama-1.1b")
    model = build(config, device)
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), device=device)
    keep = random_keep_mask(args.batch, args.seq, 0.5, seed=0, device=device)
    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name(), "args": vars(args), "variants": {}}
    t_start = time.time()
    for variant in args.variants.split(","):
        step, undo = make_step(model, ids, variant, keep)
        run = annotated(step)
        for _ in range(4):
            run()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                run()
            torch.cuda.synchronize()
        path = os.path.join(args.out_dir, f"trace_{slug(variant)}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            summary = summarise(json.load(f), gap_ms=args.gap_ms)
        if args.keep_trace:
            with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.remove(path)
        result["variants"][variant] = summary
        for i, s in enumerate(summary["steps"]):
            print(f"{variant} step {i}: {s['step_ms']:.1f} ms, GPU busy {s['gpu_busy_ms']:.1f}, "
                  f"idle {s['idle_ms']:.1f} (gaps > {args.gap_ms} ms: {s['gaps_total_ms']:.1f}), host phases "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s["phase_host_ms"].items()), flush=True)
            for g in s["gaps"][:6]:
                print(f"    gap {g['ms']:.2f} ms at {g['at_ms']:.1f} ({g['phase']}): after {g['after'][:40]} "
                      f"before {g['before'][:40]}")
            for b in s["blocking"][:6]:
                print(f"    blocking {b['name']} {b['ms']:.2f} ms at {b['at_ms']:.1f} ({b['phase']})")
        undo()
        torch.cuda.empty_cache()
    result["wall_s"] = time.time() - t_start
    with open(os.path.join(args.out_dir, "step_trace.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
