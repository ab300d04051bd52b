"""Where a training step spends its GPU time: Liger dense vs Centrifuge, by kernel category and phase.

    python benchmarks/gpu_liger_profile.py OUT_DIR [--variants dense_liger,centrifuge:0.5,centrifuge:1.0]

For each variant (``centrifuge bench``'s, on the TinyLlama shape, 8×2048, bf16): warm-up steps, then one
step under ``torch.profiler`` with the forward and the backward + optimizer profiled separately. CUDA kernel
times are summed per category (GEMM, attention, LM head + CE, RMSNorm / RoPE / SwiGLU, optimizer,
copies / gathers, other) and phase, next to the phase's wall time (CUDA events), so a phase whose kernels
sum to much less than its wall time waits on the host. Writes ``profile.json`` and ``profile.txt`` (the
table, printed last) and the top kernels per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from centrifuge.bench.harness import Group, build_group_model, make_optimizer, make_run
from centrifuge.bench.variants import parse_variant

CATEGORIES = (
    ("lm head + CE", ("cross_entropy", "logsumexp", "log_softmax", "nll_loss", "element_mul", "liger_cross",
                      "_chunk", "softmax")),
    ("attention", ("flash", "fmha", "cudnn", "attn", "_dq", "_dkdv", "sdpa", "_bwd_kernel", "_fwd_kernel")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk")),
    ("norm/rope/swiglu", ("rms", "rope", "swiglu", "silu", "_rotary", "rotary")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/gather", ("index", "gather", "scatter", "copy", "cat", "fill", "zero")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_times(prof) -> dict[str, float]:
    """name -> total CUDA ms of the kernels in a profile."""
    out: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            out[evt.name] = out.get(evt.name, 0.0) + evt.device_time_total / 1e3  # µs -> ms
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variants", default="dense_liger,centrifuge:0.5,centrifuge:1.0")
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    group = Group(args.preset, None, args.batch, args.seq)
    model = None
    report: dict[str, dict] = {}
    for item in args.variants.split(","):
        name, _, keep = item.partition(":")
        spec = parse_variant(name)
        if model is None:
            model = build_group_model(group, spec, omit=0.5, device=device, dtype=torch.bfloat16, seed=0)
        run = make_run(group, spec, model, keep_ratio=float(keep) if keep else None, omit=0.5, seed=0)
        variant = spec.instantiate()
        spec.enable(run, variant)
        try:
            opt, _ = make_optimizer(model, lr=1e-5)
            for _ in range(args.warmup):
                opt.zero_grad(set_to_none=True)
                variant.backward(run, variant.forward(run))
                opt.step()
            torch.cuda.synchronize()
            opt.zero_grad(set_to_none=True)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            with profile(activities=[ProfilerActivity.CUDA]) as p_fwd:
                ev[0].record()
                loss = variant.forward(run)
                ev[1].record()
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p_bwd:
                variant.backward(run, loss)
                opt.step()
                ev[2].record()
                torch.cuda.synchronize()
            del loss, opt
        finally:
            spec.disable(run, variant)
            model.zero_grad(set_to_none=True)
        entry: dict = {"wall_ms": {"fwd": ev[0].elapsed_time(ev[1]), "bwd+opt": ev[1].elapsed_time(ev[2])}}
        for phase, prof in (("fwd", p_fwd), ("bwd+opt", p_bwd)):
            kt = kernel_times(prof)
            cats: dict[str, float] = {}
            for k, v in kt.items():
                cats[category(k)] = cats.get(category(k), 0.0) + v
            entry[phase] = {"categories": cats, "kernel_ms": sum(kt.values()),
                            "top": sorted(kt.items(), key=lambda kv: -kv[1])[:12]}
        report[item] = entry
        torch.cuda.empty_cache()
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = ["GPU kernel ms per category (one step), and the phase's wall ms (CUDA events)"]
    for phase in ("fwd", "bwd+opt"):
        lines.append(f"\n-- {phase} --")
        lines.append(f"{'variant':18s}" + "".join(f"{c[:16]:>17s}" for c in cats) + f"{'kernels':>10s}{'wall':>9s}")
        for item, entry in report.items():
            e = entry[phase]
            lines.append(f"{item:18s}" + "".join(f"{e['categories'].get(c, 0.0):17.2f}" for c in cats)
                         + f"{e['kernel_ms']:10.2f}{entry['wall_ms'][phase]:9.2f}")
    for item, entry in report.items():
        for phase in ("fwd", "bwd+opt"):
            lines.append(f"\n{item} {phase} top kernels:")
            lines.extend(f"  {ms:8.2f} ms  {name[:110]}" for name, ms in entry[phase]["top"])
    text = "\n".join(lines)
    (out / "profile.txt").write_text(text + "\n")
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
