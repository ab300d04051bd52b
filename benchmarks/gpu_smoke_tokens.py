"""GPU check of the token-sparse path: correctness of the flash backend vs the math backend and the
reference on a small model (bf16), then a quick whole-model timing at the TinyLlama shape.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_smoke_tokens.py OUT_DIR [--layers 22]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import centrifuge
from centrifuge.models.presets import build_model, preset_config
from centrifuge.ops.attention import FlashVarlenAttention, MathAttention
from centrifuge.tokens.layout import TokenLayout


def check_attention(out: dict) -> None:
    torch.manual_seed(0)
    for (B, T, H, Hkv, D) in [(2, 300, 8, 2, 64), (3, 257, 4, 4, 128), (1, 129, 8, 1, 64)]:
        N = B * T
        q = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(T, device="cuda").expand(B, T).clone()
        pos[0, T // 3:] -= T // 3  # two packed documents in row 0
        layout = TokenLayout.build(batch=B, seqlen=T, device=q.device, position_ids=pos)
        keep = torch.nonzero(torch.rand(N, device="cuda") < 0.4).flatten()
        do_k = torch.randn(keep.numel(), H, D, device="cuda", dtype=torch.bfloat16)
        scale = D ** -0.5
        fo, faux = FlashVarlenAttention().forward(q, k, v, layout, scale)
        mo, maux = MathAttention().forward(q.double(), k.double(), v.double(), layout, scale)
        fwd_err = ((fo.double() - mo).norm() / mo.norm()).item()
        fg = FlashVarlenAttention().backward_kept(do_k, q=q, k=k, v=v, o=fo, aux=faux, keep=keep,
                                                  layout=layout, scale=scale, queries_compact=False)
        mg = MathAttention().backward_kept(do_k.double(), q=q.double(), k=k.double(), v=v.double(), o=mo,
                                           aux=maux, keep=keep, layout=layout, scale=scale,
                                           queries_compact=False)
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(fg, mg, strict=True)]
        out.setdefault("attention", []).append({"shape": [B, T, H, Hkv, D], "fwd_rel": fwd_err,
                                                "dq_dk_dv_rel": errs})
        print("attention", (B, T, H, Hkv, D), "fwd", fwd_err, "bwd", errs, flush=True)


def check_model(out: dict) -> None:
    cfg = preset_config("tiny", num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, dtype=torch.bfloat16, seed=0).cuda()
    ids = torch.randint(0, cfg.vocab_size, (4, 200), device="cuda")
    keep = torch.rand(4, 200, device="cuda") < 0.5
    grads = {}
    for mode, attention in [("reference", "auto"), ("fast", "flash"), ("fast", "sdpa"), ("fast", "math")]:
        centrifuge.apply(model, mode=mode, attention=attention)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()
        grads[(mode, attention)] = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        centrifuge.revert(model)
    ref = grads[("reference", "auto")]
    for key in [("fast", "flash"), ("fast", "sdpa"), ("fast", "math")]:
        rel = max(((grads[key][n] - r).norm() / r.norm()).item() for n, r in ref.items())
        out.setdefault("model", {})["-".join(key)] = rel
        print("model grads vs reference", key, rel, flush=True)


def cuda_time(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_model(out: dict, layers: int, batch: int, seq: int, keep_ratio: float) -> None:
    cfg = preset_config("tinyllama-1.1b", num_hidden_layers=layers)
    with torch.device("cuda"):
        model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    keep = torch.rand(batch, seq, device="cuda").argsort(-1) < int(keep_ratio * seq)
    kb = int(keep_ratio * batch)

    def dense():
        model(input_ids=ids, labels=ids).loss.backward()

    def ideal():
        with torch.no_grad():
            pass
        loss = model(input_ids=ids[:kb], labels=ids[:kb]).loss
        loss.backward()

    def fwd_only():
        with torch.no_grad():
            model(input_ids=ids, labels=ids)

    def fast_before():
        model(input_ids=ids, labels=ids, keep_mask=keep).loss.backward()

    def fast_after():
        model(input_ids=ids, labels=ids, select=lambda *, scores, valid: keep & valid).loss.backward()

    results = {}
    for name, fn, patch in [("dense", dense, None), ("fwd_nograd", fwd_only, None),
                            ("ideal_kB_fwd_bwd", ideal, None), ("fast_before", fast_before, "fast"),
                            ("fast_after", fast_after, "fast"), ("loss_only", fast_before, "loss_only")]:
        if patch:
            centrifuge.apply(model, mode=patch)
        torch.cuda.reset_peak_memory_stats()
        t = cuda_time(fn, reps=6, warmup=2)
        model.zero_grad(set_to_none=True)
        if patch:
            centrifuge.revert(model)
        results[name] = {"median_ms": statistics.median(t),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(name, results[name], flush=True)
    d = results["dense"]["median_ms"]
    for r in results.values():
        r["ratio"] = r["median_ms"] / d
    out["timing"] = {"layers": layers, "batch": batch, "seq": seq, "keep": keep_ratio, "results": results}
    print(json.dumps(out["timing"], indent=1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.time()
    check_attention(out)
    check_model(out)
    if args.layers > 0:
        time_model(out, args.layers, args.batch, args.seq, 0.5)
    out["wall_s"] = time.time() - t0
    with open(f"{args.out}/gpu_smoke_tokens.json", "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
