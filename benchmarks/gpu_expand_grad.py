"""The full-size gradient of a weight slice: ``expand_slice`` (one Triton pass) vs the reference (zeros +
``index_copy_``), bf16, TinyLlama-1.1B shapes at rate 0.5.

    PYTHONPATH=src python benchmarks/gpu_expand_grad.py OUT_DIR [--reps 100] [--sweep]
    PYTHONPATH=src python benchmarks/gpu_expand_grad.py OUT_DIR --device cpu     # smoke: tiny shapes, reference

Cases (output shape, sliced dim, kept ids):

- ``gate_up``  [5632, 2048] dim 0, 2816 random sorted rows (gate_proj / up_proj);
- ``down``     [2048, 5632] dim 1, 2816 random sorted columns (down_proj);
- ``q``        [2048, 2048] dim 0, rows of 2 of 4 groups of 512 (q_proj, heads omitted in groups);
- ``o``        [2048, 2048] dim 1, the same ids as columns (o_proj);
- ``kv``       [256, 2048]  dim 0, rows of 2 of 4 groups of 64 (k_proj / v_proj).

Each case first checks that both implementations equal ``torch.zeros + index_copy_`` exactly, then times
each: GPU µs from CUDA events around each call with the calls queued behind a sleep kernel (so launch time
does not count), host µs per call from the wall clock of that loop (median of ``--reps`` after ``--warmup``;
wall clock on the CPU). GB/s counts the ideal traffic: one write of the full output and one read of the
slice. ``--sweep`` also times the kernel over a few (BLOCK_L, BLOCK_N, num_warps) choices. The per-step
line sums the cases as a TinyLlama layer uses them (gate_up × 2, down, q, kv × 2, o) over 22 layers.

Writes ``OUT_DIR/expand_grad.json`` (versions, device, every timing) and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch

from centrifuge.ops.expand_grad import expand_slice_reference, expand_slice_triton, triton_supports

# name: (output shape, dim, kind of kept ids, uses per TinyLlama layer)
CASES = {
    "gate_up": ((5632, 2048), 0, "random", 2),
    "down": ((2048, 5632), 1, "random", 1),
    "q": ((2048, 2048), 0, "groups512", 1),
    "o": ((2048, 2048), 1, "groups512", 1),
    "kv": ((256, 2048), 0, "groups64", 2),
}
LAYERS = 22
SWEEP = {0: [(1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (4, 1024, 8), (8, 512, 4), (8, 1024, 8), (16, 256, 4)],
         1: [(64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 64, 8), (256, 16, 4), (32, 128, 4), (256, 32, 8)]}


def ids_for(kind: str, size: int, scale: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted kept ids: half of ``range(size)`` at random, or 2 of 4 contiguous groups."""
    if kind == "random":
        return torch.randperm(size, generator=gen)[: size // 2].sort().values
    group = {"groups512": 512, "groups64": 64}[kind] // scale
    chosen = torch.randperm(4, generator=gen)[:2].sort().values
    return torch.cat([torch.arange(g * group, (g + 1) * group) for g in chosen.tolist()])


def timer(device: torch.device, fn, reps: int, warmup: int) -> tuple[float, float]:
    """(GPU µs, host µs) per ``fn()``: medians over ``reps`` calls after ``warmup``.

    On a GPU the calls are queued behind a ``torch.cuda._sleep`` long enough to cover their launches, so the
    CUDA events around each call measure its kernels back to back, not the host's launch time (a Triton
    launch costs tens of µs of Python, more than these kernels run); the host time is the wall clock of the
    queued loop over ``reps``. On the CPU both are the wall clock per call."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), statistics.median(times)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    bound = (time.perf_counter() - t0) / reps  # max(host, GPU) per call: what the sleep must cover
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(int(3 * bound * reps * 2e9))  # ~2 GHz: cycles for 3x the estimate
    t0 = time.perf_counter()
    for start, end in events:
        start.record()
        fn()
        end.record()
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events), host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel block / warp choices")
    args = ap.parse_args()
    device = torch.device(args.device)
    # the CPU smoke run: shapes / 16 (so the groups stay groups), the reference only unless the interpreter is on
    scale = 1 if device.type == "cuda" else 16
    reps, warmup = (max(args.reps, 50), args.warmup) if device.type == "cuda" else (5, 1)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, (shape, dim, kind, uses) in CASES.items():
        shape = tuple(s // scale for s in shape)
        size = shape[dim]
        kept = ids_for(kind, size, scale, gen)
        mask = torch.ones(size, dtype=torch.bool)
        mask[kept] = False
        dropped = mask.nonzero().squeeze(1)
        kept, dropped = kept.to(device), dropped.to(device)
        slice_shape = list(shape)
        slice_shape[dim] = kept.numel()
        grad = torch.randn(slice_shape, generator=gen).to(device, dtype)
        # the oracle, spelled out (not through the module)
        expected = grad.new_zeros(shape).index_copy_(dim, kept, grad)
        es = grad.element_size()
        nbytes = (expected.numel() + grad.numel()) * es
        row = {"case": name, "shape": list(shape), "dim": dim, "k": kept.numel(), "ids": kind, "uses": uses,
               "bytes": nbytes}
        ref = expand_slice_reference(grad, dim=dim, kept=kept, size=size)
        if not torch.equal(ref, expected):
            sys.exit(f"{name}: the reference differs from zeros + index_copy_")
        row["reference_us"], row["reference_host_us"] = timer(
            device, functools.partial(expand_slice_reference, grad, dim=dim, kept=kept, size=size), reps, warmup)
        if triton_supports(grad, allow_interpreter=True):
            triton_fn = functools.partial(expand_slice_triton, grad, dim=dim, kept=kept, dropped=dropped, size=size)
            if not torch.equal(triton_fn(), expected):
                sys.exit(f"{name}: expand_slice_triton differs from the reference")
            row["triton_us"], row["triton_host_us"] = timer(device, triton_fn, reps, warmup)
            if args.sweep:
                sweep = []
                for bl, bn, warps in SWEEP[dim]:
                    fn = functools.partial(triton_fn, block=(bl, bn), num_warps=warps)
                    if not torch.equal(fn(), expected):
                        sys.exit(f"{name}: block {(bl, bn, warps)} differs from the reference")
                    sweep.append({"block": [bl, bn], "num_warps": warps, "us": timer(device, fn, reps, warmup)[0]})
                row["sweep"] = sweep
        for impl in ("reference", "triton"):
            if f"{impl}_us" in row:
                row[f"{impl}_GBps"] = nbytes / row[f"{impl}_us"] / 1e3
        results.append(row)

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    step = {impl: LAYERS * sum(r[f"{impl}_us"] * r["uses"] for r in results)
            for impl in ("reference", "triton") if all(f"{impl}_us" in r for r in results)}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "dtype": str(dtype), "reps": reps, "warmup": warmup, "scale": scale, "cases": results,
        "tinyllama_step_us": step, "argv": sys.argv,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "expand_grad.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"{report['device']}  torch {report['torch']}  triton {triton_version}  bf16, median of {reps}")
    print(f"{'case':8} {'shape':>12} {'dim':>3} {'k':>5}  {'ref µs':>7} {'GB/s':>5} {'host':>5}  "
          f"{'triton µs':>9} {'GB/s':>5} {'host':>5}  {'speedup':>7}")
    for r in results:
        tri = (f"{r['triton_us']:9.1f} {r['triton_GBps']:5.0f} {r['triton_host_us']:5.1f}  "
               f"{r['reference_us'] / r['triton_us']:6.2f}x" if "triton_us" in r else f"{'-':>9}")
        print(f"{r['case']:8} {'x'.join(map(str, r['shape'])):>12} {r['dim']:>3} {r['k']:>5}  "
              f"{r['reference_us']:7.1f} {r['reference_GBps']:5.0f} {r['reference_host_us']:5.1f}  {tri}")
        for s in r.get("sweep", []):
            print(f"{'':8} block {s['block']} warps {s['num_warps']}: {s['us']:.1f} µs")
    for impl, us in step.items():
        host = LAYERS * sum(r[f"{impl}_host_us"] * r["uses"] for r in results)
        print(f"per TinyLlama step ({LAYERS} layers): {impl} {us / 1e3:.3f} ms GPU, {host / 1e3:.3f} ms host")


if __name__ == "__main__":
    main()
