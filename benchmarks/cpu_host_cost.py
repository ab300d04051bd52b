"""Host cost of `centrifuge train`'s step, measured on the CPU: device→host reads per step, and host time.

    PYTHONPATH=src python benchmarks/cpu_host_cost.py OUT [KEY=VALUE ...]      # config overrides

On a GPU the token-sparse step is host-bound (an H200 profile: 15 synchronisations a step, ~3 ms of Python a
layer, `benchmarks/results/2026-12-04-h200-train-step/`), and neither needs a GPU to be counted:

* **syncs**: every op that reads a value back or sizes its output by the data, per step, by call site
  (``centrifuge.bench.syncs``) — on a GPU each is a ``cudaStreamSynchronize`` that drains the launch queue;
* **host time**: at a tiny shape on the CPU the kernels take microseconds, so a step's wall time is almost all
  dispatch and Python — the host time a GPU step must hide behind its kernels. Median of STEPS steps after
  warm-up, per arm, with the dense step of the same run as the yardstick.

Arms (ARMS=a,b picks): dense; token-sparse random κ = 0.5 with the keep set known before the forward (batch and
sequence scope); ``self_loss`` selection (keep set chosen after the forward, exact Rho-1 path).
Writes OUT/host_cost.json and OUT/<arm>_syncs.txt."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers

from centrifuge.bench.syncs import HostSyncs
from centrifuge.train.config import load_config
from centrifuge.train.loop import indexed_batch, prepare_run
from centrifuge.train.step import train_step

SHAPE = ('model.overrides={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, '
         '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}')
ARMS = {
    "dense": ["tokens.keep_ratio=1.0"],
    "random_k0.5": ["tokens.keep_ratio=0.5", "tokens.scope=batch", "tokens.selector=random"],
    "random_k0.5_sequence": ["tokens.keep_ratio=0.5", "tokens.scope=sequence", "tokens.selector=random"],
    "self_loss_k0.5": ["tokens.keep_ratio=0.5", "tokens.scope=batch", "tokens.selector=self_loss"],
}
STEPS = int(os.environ.get("STEPS", "30"))


def _step(run, batch: dict[str, torch.Tensor], step: int) -> None:
    ctx, t = run.context, run.config.train
    train_step(ctx.train_model or ctx.model, [batch], ctx.optimizer, ctx.scheduler, step=step, loss_fn=ctx.loss_fn,
               max_grad_norm=t.max_grad_norm, autocast_dtype=run.autocast_dtype, hooks=ctx.hooks)


def measure(arm: str, overrides: list[str], out: str, extra: list[str]) -> dict:
    config = load_config(None, [SHAPE, "data.seq_len=128", "train.batch_size=4", "train.steps=1000",
                                "log.progress=false", "log.tensorboard=false", "train.device=cpu",
                                f"train.out_dir={out}/runs/{arm}", *extra, *overrides])
    run = prepare_run(config)
    size = config.train.batch_size
    batches = [indexed_batch(run.data.train, run.sampler.take(size)) for _ in range(STEPS + 6)]
    for step in range(1, 6):  # warm-up (first calls build caches)
        _step(run, batches[step - 1], step)
    with HostSyncs() as syncs:
        _step(run, batches[5], 6)
    times = []
    for step in range(7, STEPS + 7):
        tic = time.perf_counter()
        _step(run, batches[step - 1], step)
        times.append(time.perf_counter() - tic)
    with open(os.path.join(out, f"{arm}_syncs.txt"), "w") as f:
        f.write(syncs.table() + "\n")
    return {"syncs_per_step": syncs.count, "step_ms": 1000 * statistics.median(times),
            "layers": run.context.model.config.num_hidden_layers,
            "sites": {f"{k} @ {s}": n for (k, s), n in syncs.by_site().items()}}


def main(out: str, extra: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)  # host cost, not kernel parallelism
    chosen = os.environ.get("ARMS", ",".join(ARMS)).split(",")
    results = {arm: measure(arm, ARMS[arm], out, extra) for arm in chosen}
    dense = results.get("dense", {}).get("step_ms")
    for arm, r in results.items():
        ratio = f"  {r['step_ms'] / dense:.2f}x dense" if dense else ""
        print(f"{arm:<22} {r['syncs_per_step']:3d} syncs/step  {r['step_ms']:7.2f} ms/step{ratio}")
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}), 1 thread", "torch": torch.__version__,
            "transformers": transformers.__version__, "command": " ".join(sys.argv), "steps": STEPS}
    with open(os.path.join(out, "host_cost.json"), "w") as f:
        json.dump({**meta, "arms": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
