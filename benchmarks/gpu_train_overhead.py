"""Where does a `centrifuge train` step spend the time that the bench's bare step does not?

Builds the run exactly as `centrifuge train` does (TinyLlama shape, 8×2048, fp32 master weights, bf16
autocast, fused AdamW) and times, with CUDA events, the parts of `train_step`: fetching the batch, forward
+ loss, backward, gradient scaling + norm/clipping, optimizer step; then the same with the dense loss
computed without materialising fp32 logits. Usage: PYTHONPATH=src python3 benchmarks/gpu_train_overhead.py OUT
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile

import torch


def main() -> int:
    from centrifuge.train.config import load_config
    from centrifuge.train.loop import indexed_batch, prepare_run
    from centrifuge.train.step import dense_loss

    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp()
    config = load_config(None, ["model.preset=tinyllama-1.1b", "data.seq_len=2048", "train.batch_size=8",
                                "tokens.keep_ratio=1.0", f"train.out_dir={tmp}/run", f"data.cache_dir={tmp}/c",
                                "log.progress=false"])
    run = prepare_run(config)
    model, opt, device = run.context.model, run.context.optimizer, run.device
    results = {}
    for label, loss_fn in (("dense_loss (HF logits → fp32 CE)", dense_loss),):
        parts: dict[str, list[float]] = {k: [] for k in ("batch", "forward", "backward", "scale+clip", "optimizer",
                                                         "step")}
        for i in range(8):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
            ev[0].record()
            batch = {k: v.to(device, non_blocking=True) for k, v in indexed_batch(run.data.train,
                                                                                   run.sampler.take(8)).items()}
            ev[1].record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                micro = loss_fn(model, batch)
            ev[2].record()
            micro.loss_sum.backward()
            ev[3].record()
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_([p.grad for p in params], 1.0 / float(micro.num_counted))
            norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            ev[4].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ev[5].record()
            torch.cuda.synchronize()
            if i >= 3 and math.isfinite(norm):
                ms = [a.elapsed_time(b) for a, b in zip(ev, ev[1:], strict=False)]
                for key, value in zip(list(parts)[:5], ms, strict=True):
                    parts[key].append(value)
                parts["step"].append(sum(ms))
        results[label] = {k: statistics.median(v) for k, v in parts.items()}
        print(label, {k: round(v, 1) for k, v in results[label].items()}, flush=True)
    results["meta"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                       "params_dtype": str(next(model.parameters()).dtype), "fused_adamw": True}
    with open(os.path.join(out_dir, "train_overhead.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
