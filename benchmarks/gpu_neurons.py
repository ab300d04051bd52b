"""GPU timing of neuron omission (SAT-style) against dense training and the narrow-model ceilings.

At the TinyLlama-1.1B shape (bf16, SDPA, 8 × 2048 tokens), one process times full training steps —
forward (including ``omitter.plan``), backward, fused AdamW step (with the omission optimizer mask) — for:

* dense: the plain HF model;
* omit-mlp: omission rate ρ on MLP channels only;
* omit-mlp+heads: rate ρ on MLP channels and KV groups (whole GQA groups with their query heads);
* omit-mlp+heads/nomask: the same without the optimizer mask (its cost = the difference in "opt");
* narrow-mlp: the same preset with intermediate_size = the kept channel count (the ceiling of omit-mlp);
* narrow-mlp+heads: also with the kept query / KV head counts (head_dim kept): the ceiling of omit-mlp+heads;
* tokens: the token-sparse backward alone (``centrifuge.apply``, keep ratio κ, random mask known before the
  forward);
* tokens+omit-mlp, tokens+omit-mlp+heads: both at once (κ and ρ), the omission plan read by the token-sparse
  layers (ceilings measured before on an H100: 0.543× and 0.459× dense);
* dense again at the end, to show drift.

Each step is timed with CUDA events after warm-up; medians (p20 / p80) of ≥ 8 steps. The omission runs
use the default importance (EMA of activation RMS gathered in the training forwards, sampled selection), so
the first warm-up step is dense. A short bf16 correctness check (fast path vs the reference on a small
model) runs first. Results: OUT_DIR/gpu_neurons.json; the table is printed last.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_neurons.py OUT_DIR [--rate 0.5] [--reps 10]
Plot of several runs: python3 benchmarks/gpu_neurons.py --plot OUT.png RUN1.json RUN2.json ...
CPU smoke run:       PYTHONPATH=src python3 benchmarks/gpu_neurons.py /tmp/out --device cpu --preset tiny \
                         --batch 2 --seq 64 --reps 2 --warmup 2
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import transformers

import centrifuge
from centrifuge import neurons
from centrifuge.bench.variants import random_keep_mask
from centrifuge.models.presets import build_model, preset_config
from centrifuge.neurons import kept_count, reference_omission

TARGET_POINTS = 3.0  # each omission step within 3 points (of dense) of its narrow ceiling
MEASURED_CEILINGS = {"narrow-mlp": 0.809, "narrow-mlp+heads": 0.682}  # DESIGN.md, H100, torch 2.11
COMBINED_TARGET = 0.50  # tokens κ = 0.5 and omission ρ = 0.5 (MLP + heads) together, step × dense
COMBINED_CEILINGS = {"tokens+omit-mlp": 0.543, "tokens+omit-mlp+heads": 0.459}  # DESIGN.md


class Timer:
    """Marks inside one step: CUDA events on the GPU, perf_counter on the CPU (synchronous anyway)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def quantiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    return {"median": statistics.median(s), "p20": at(0.2), "p80": at(0.8)}


def build(config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config.use_cache = False
    with torch.device(device):
        model = build_model(config, dtype=dtype, attn_implementation="sdpa", seed=0)
    return model.to(device).train()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_correctness(device: torch.device, dtype: torch.dtype) -> dict:
    """bf16 fast path vs the reference on a small GQA model: relative errors of loss and gradients."""
    config = preset_config("tiny", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=4)
    model = build(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (2, 256), device=device)
    omitter = neurons.attach(model, rate=0.5, metric="uniform", multiple=64, seed=0)
    plan = omitter.plan(0)
    out = {}
    for name in ("fast", "reference"):
        model.zero_grad(set_to_none=True)
        if name == "fast":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            omitter.clear()
            with reference_omission(model, plan):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[name] = (loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    (lf, gf), (lr, gr) = out["fast"], out["reference"]
    grad_rel = max(((gf[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in gr.items())
    result = {"loss_fast": lf.item(), "loss_reference": lr.item(), "max_grad_rel_err": grad_rel,
              "omitted_grads_zero": bool(all(
                  torch.all(gf[f"model.layers.{i}.mlp.up_proj.weight"][lp.dropped_channels] == 0).item()
                  for i, lp in plan.layers.items()))}
    omitter.revert()
    del model, out
    free(device)
    print("correctness (bf16, fast vs reference):", result, flush=True)
    return result


def time_steps(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, *, warmup: int, reps: int,
               before_forward: Callable[[int], None] | None = None,
               setup_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
               keep_mask: torch.Tensor | None = None, profile_path: str | None = None) -> dict:
    """``warmup + reps`` training steps; returns quantiles of forward / backward / optimizer / step (ms).

    With ``profile_path``, two more steps run under ``torch.profiler`` and the kernels' table (by device time)
    is written there."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=fused)
    if setup_optimizer is not None:
        setup_optimizer(opt)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "fwd+bwd": [], "step": []}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + reps):
        timer = Timer(device)
        timer.mark()
        if before_forward is not None:
            before_forward(step)
        extra = {} if keep_mask is None else {"keep_mask": keep_mask}
        loss = model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
        timer.mark()
        loss.backward()
        timer.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark()
        fwd, bwd, opt_ms = timer.intervals_ms()
        if step >= warmup:
            for key, value in (("forward", fwd), ("backward", bwd), ("optimizer", opt_ms),
                               ("fwd+bwd", fwd + bwd), ("step", fwd + bwd + opt_ms)):
                parts[key].append(value)
    out = {key: quantiles(values) for key, values in parts.items()}
    if profile_path is not None:
        profile_steps(functools.partial(_one_step, model, ids, opt, before_forward, extra, warmup + reps), device,
                      profile_path)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["loss_last"] = float(loss.detach().float().item())
    del opt
    return out


def _one_step(model, ids, opt, before_forward, extra: dict, step: int) -> None:
    if before_forward is not None:
        before_forward(step)
    model(input_ids=ids, labels=ids, use_cache=False, **extra).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def profile_steps(step_fn: Callable[[], None], device: torch.device, path: str, *, steps: int = 2) -> None:
    """Run ``step_fn`` ``steps`` times under ``torch.profiler``; write the op / kernel table sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(f"{steps} steps\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--layers", type=int, default=None, help="truncate the preset to this many layers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--metric", default="activation")
    p.add_argument("--select", default="sample")
    p.add_argument("--multiple", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--keep", type=float, default=0.5, help="token keep ratio of the tokens+omission variants")
    p.add_argument("--eager-elementwise", action="store_true",
                   help="token-sparse variants with apply(compile=False) instead of apply's default")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--profile", default="", help="comma-separated variants to profile (OUT_DIR/profile_NAME.txt)")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    t0 = time.time()
    torch.manual_seed(0)
    result: dict = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
    }
    if not args.skip_check:
        result["correctness"] = check_correctness(device, dtype)

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = preset_config(args.preset, **overrides)
    m, heads, kv = config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kept_m = kept_count(m, args.rate, args.multiple)
    kept_kv = kept_count(kv, args.rate)
    kept_heads = kept_kv * (heads // kv)
    result["shapes"] = {"intermediate": [m, kept_m], "heads": [heads, kept_heads], "kv_heads": [kv, kept_kv],
                        "head_dim": head_dim}
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), device=device)
    timing: dict[str, dict] = {}

    profiled = set(filter(None, args.profile.split(",")))

    def run(name: str, model, **kw) -> None:
        safe = name.replace("/", "_").replace("+", "_")  # the device returns plain file names only
        path = os.path.join(args.out_dir, f"profile_{safe}.txt") if name in profiled else None
        timing[name] = time_steps(model, ids, device, warmup=args.warmup, reps=args.reps, profile_path=path, **kw)
        print(f"{name:22s} step {timing[name]['step']['median']:9.2f} ms  "
              f"fwd+bwd {timing[name]['fwd+bwd']['median']:9.2f} ms", flush=True)
        free(device)

    model = build(config, device, dtype)
    run("dense", model)
    for name, with_heads, mask in (("omit-mlp", False, True), ("omit-mlp+heads", True, True),
                                   ("omit-mlp+heads/nomask", True, False)):
        omitter = neurons.attach(model, rate=args.rate, metric=args.metric, select=args.select,
                                 multiple=args.multiple, heads=with_heads, seed=0)
        plans = []

        def before_forward(step: int, omitter=omitter, plans=plans) -> None:
            plans.append(omitter.plan(step))

        run(name, model, before_forward=before_forward, setup_optimizer=omitter.protect if mask else None)
        timing[name]["plan"] = plans[-1].summary()
        omitter.revert()

    keep = random_keep_mask(args.batch, args.seq, args.keep, seed=0, device=device)
    centrifuge.apply(model, mode="fast", compile=False if args.eager_elementwise else None)
    run("tokens", model, keep_mask=keep)
    for name, with_heads in (("tokens+omit-mlp", False), ("tokens+omit-mlp+heads", True)):
        omitter = neurons.attach(model, rate=args.rate, metric=args.metric, select=args.select,
                                 multiple=args.multiple, heads=with_heads, seed=0)
        run(name, model, keep_mask=keep, before_forward=lambda step, o=omitter: o.plan(step),
            setup_optimizer=omitter.protect)
        omitter.revert()
    centrifuge.revert(model)
    del model
    free(device)

    narrow = {"narrow-mlp": {"intermediate_size": kept_m},
              "narrow-mlp+heads": {"intermediate_size": kept_m, "num_attention_heads": kept_heads,
                                   "num_key_value_heads": kept_kv, "head_dim": head_dim}}
    for name, extra in narrow.items():
        cfg = preset_config(args.preset, **overrides, **extra)
        cfg.head_dim = head_dim
        model = build(cfg, device, dtype)
        run(name, model)
        del model
        free(device)

    model = build(config, device, dtype)
    run("dense-again", model)
    del model
    free(device)

    base = timing["dense"]
    for r in timing.values():
        r["ratio"] = {key: r[key]["median"] / base[key]["median"] for key in ("step", "fwd+bwd", "forward",
                                                                             "backward", "optimizer")}
    verdicts = {}
    for omit, ceiling in (("omit-mlp", "narrow-mlp"), ("omit-mlp+heads", "narrow-mlp+heads")):
        gaps = {key: 100 * (timing[omit]["ratio"][key] - timing[ceiling]["ratio"][key]) for key in ("step", "fwd+bwd")}
        verdicts[omit] = {"ceiling": ceiling, "gap_points": gaps, "target_points": TARGET_POINTS,
                          "meets_target_step": gaps["step"] <= TARGET_POINTS,
                          "meets_target_fwd_bwd": gaps["fwd+bwd"] <= TARGET_POINTS,
                          "ceiling_measured_before": MEASURED_CEILINGS[ceiling]}
    for name, ceiling in COMBINED_CEILINGS.items():
        verdicts[name] = {"ceiling_measured_before": ceiling, "target": COMBINED_TARGET if "heads" in name else None,
                          "meets_target_step": (timing[name]["ratio"]["step"] <= COMBINED_TARGET
                                                if "heads" in name else None)}
    result["timing"] = timing
    result["verdicts"] = verdicts
    result["wall_s"] = time.time() - t0
    path = os.path.join(args.out_dir, "gpu_neurons.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{args.preset}, {args.batch}×{args.seq} tokens, bf16, rate {args.rate} "
          f"(kept: {kept_m}/{m} channels, {kept_heads}/{heads} heads), metric={args.metric}, select={args.select}")
    print(f"{'variant':22s} {'step ms':>9s} {'×dense':>7s} {'fwd+bwd ms':>11s} {'×dense':>7s} {'fwd':>7s} "
          f"{'bwd':>7s} {'opt':>7s} {'peak GiB':>9s}")
    for name, r in timing.items():
        print(f"{name:22s} {r['step']['median']:9.2f} {r['ratio']['step']:7.3f} {r['fwd+bwd']['median']:11.2f} "
              f"{r['ratio']['fwd+bwd']:7.3f} {r['forward']['median']:7.2f} {r['backward']['median']:7.2f} "
              f"{r['optimizer']['median']:7.2f} {r.get('peak_gib', float('nan')):9.2f}")
    for omit, v in verdicts.items():
        if omit in COMBINED_CEILINGS:
            print(f"{omit} (κ={args.keep}, ρ={args.rate}): {timing[omit]['ratio']['step']:.3f}× dense step "
                  f"(ceiling measured before {v['ceiling_measured_before']}×"
                  + (f"; target ≤ {COMBINED_TARGET}×)" if v["target"] else ")"))
            continue
        print(f"{omit}: {v['gap_points']['step']:+.1f} points (step) / {v['gap_points']['fwd+bwd']:+.1f} points "
              f"(fwd+bwd) vs {v['ceiling']} (target ≤ {TARGET_POINTS:.0f}; ceiling measured before "
              f"{v['ceiling_measured_before']}× dense)")
    png = plot_runs([result], os.path.join(args.out_dir, "gpu_neurons.png"))
    print(f"results: {path}{f', {png}' if png else ''}  ({result['wall_s']:.0f} s)")
    return 0


def plot_runs(results: list[dict], path: str) -> str | None:
    """Step × dense per variant, one dot per run (process) and a bar at their median, with each omission
    variant's narrow-model ceiling from the same runs and the combined target. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in results[0]["timing"] if n not in ("dense", "dense-again") and "nomask" not in n]
    ratios = {n: [r["timing"][n]["ratio"]["step"] for r in results if n in r["timing"]] for n in names}
    fig, ax = plt.subplots(figsize=(9, 4.2))
    colors = ["tab:orange" if n.startswith("narrow") else "tab:blue" if n.startswith("omit") else "tab:green"
              for n in names]
    ax.bar(range(len(names)), [statistics.median(ratios[n]) for n in names], color=colors, alpha=0.55)
    for i, n in enumerate(names):
        ax.plot([i] * len(ratios[n]), ratios[n], "k.", ms=6)
        ax.annotate(f"{statistics.median(ratios[n]):.3f}", (i, max(ratios[n])), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    for omit, ceiling in (("omit-mlp", "narrow-mlp"), ("omit-mlp+heads", "narrow-mlp+heads")):
        if omit in names and ceiling in names:
            c = statistics.median(ratios[ceiling])
            i = names.index(omit)
            ax.plot([i - 0.4, i + 0.4], [c + TARGET_POINTS / 100] * 2, "r--", lw=1)
    if "tokens+omit-mlp+heads" in names:
        i = names.index("tokens+omit-mlp+heads")
        ax.plot([i - 0.4, i + 0.4], [COMBINED_TARGET] * 2, "r--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("training step time × dense")
    ax.set_ylim(0, 1)
    args = results[0]["args"]
    ax.set_title(f"{args['preset']}, {args['batch']}×{args['seq']}, bf16, rate {args['rate']}, κ {args['keep']} — "
                 f"{len(results)} run(s); red: targets (ceiling + 3 points, ≤ {COMBINED_TARGET})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--plot":  # re-plot committed runs: --plot OUT.png RUN.json ...
        runs = []
        for run_path in sys.argv[3:]:
            with open(run_path) as f:
                runs.append(json.load(f))
        print(plot_runs(runs, sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
