"""Profile one token-sparse step at the TinyLlama shape (forward and backward timed separately)."""

from __future__ import annotations

import statistics
import sys

import torch
from gpu_smoke_tokens import cuda_time  # run as a script from benchmarks/: same CUDA-event timer
from torch.profiler import ProfilerActivity, profile

import centrifuge
from centrifuge.models.presets import build_model, preset_config


def timed(fn, reps=5, warmup=2):
    return statistics.median(cuda_time(fn, reps=reps, warmup=warmup))


def main(out_dir: str, layers: int = 22) -> None:
    cfg = preset_config("tinyllama-1.1b", num_hidden_layers=layers)
    with torch.device("cuda"):
        model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    B, T = 8, 2048
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    keep = torch.rand(B, T, device="cuda").argsort(-1) < T // 2
    holder = {}

    def fwd(kind):
        def f():
            model.zero_grad(set_to_none=True)
            if kind == "dense":
                holder["loss"] = model(input_ids=ids, labels=ids).loss
            else:
                holder["loss"] = model(input_ids=ids, labels=ids, keep_mask=keep).loss
        return f

    def bwd():
        holder["loss"].backward()

    def both(kind):
        f = fwd(kind)
        def g():
            f()
            bwd()
        return g

    for kind in ["dense", "fast"]:
        if kind == "fast":
            centrifuge.apply(model)
        t_step = timed(both(kind))
        t_fwd = timed(fwd(kind))
        # backward alone: forward outside the timed region
        ts = []
        for _ in range(5):
            fwd(kind)()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            bwd()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        print(f"{kind}: step {t_step:.1f} ms  fwd {t_fwd:.1f}  bwd {statistics.median(ts):.1f}", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        both("fast")()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    print(table)
    with open(f"{out_dir}/profile_fast.txt", "w") as f:
        f.write(table)
    prof.export_chrome_trace(f"{out_dir}/trace_fast.json")


if __name__ == "__main__":
    main(sys.argv[1])
