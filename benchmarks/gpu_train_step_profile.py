"""Where `centrifuge train`'s step spends time beyond `centrifuge bench`'s forward + backward + optimizer.

    PYTHONPATH=src python benchmarks/gpu_train_step_profile.py OUT [KEY=VALUE ...]   # config overrides
    python benchmarks/gpu_train_step_profile.py --plot PNG LABEL=OUT/train_step_profile.json [...]

ARMS=a,b (environment) picks arms, STEPS the timed steps, SYNC_DEBUG=1 also lists where one step synchronises.
For each arm (dense with Liger, token-sparse random κ = 0.5, the same with tokens.compile=false) it builds the
run as `centrifuge train` does (``prepare_run``), times STEPS loop steps split into the batch build (host) and
``train_step`` (forward, backward, clipping, optimizer, loss read back), then records a torch.profiler table of
a few steps. Writes OUT/train_step_profile.json and OUT/<arm>.txt (profiler tables)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from centrifuge.train.config import load_config
from centrifuge.train.loop import indexed_batch, prepare_run
from centrifuge.train.step import train_step

SHAPE = ('model.overrides={"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, '
         '"num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 16384, "max_position_embeddings": 1024}')
ARMS = {
    "dense_liger": ["tokens.keep_ratio=1.0", "model.liger=true"],
    "random_k0.5": ["tokens.keep_ratio=0.5", "tokens.scope=batch", "tokens.selector=random"],
    "random_k0.5_nocompile": ["tokens.keep_ratio=0.5", "tokens.scope=batch", "tokens.selector=random",
                              "tokens.compile=false"],
    "random_k0.5_sequence": ["tokens.keep_ratio=0.5", "tokens.scope=sequence", "tokens.selector=random"],
}
STEPS = int(os.environ.get("STEPS", "25"))


def main(out: str, extra: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    results = {}
    chosen = os.environ.get("ARMS", ",".join(ARMS)).split(",")
    for arm, overrides in [(a, ARMS[a]) for a in chosen]:
        config = load_config(None, [SHAPE, "data.seq_len=1024", "train.batch_size=16", "train.steps=100",
                                    "train.lr=6e-4", "log.progress=false", "log.tensorboard=false",
                                    f"train.out_dir={out}/runs/{arm}", *extra, *overrides])
        from centrifuge.models.liger import modeling_names_restored

        with modeling_names_restored():
            run = prepare_run(config)
            t = config.train
            build, step_s = [], []
            for step in range(1, STEPS + 1):
                torch.cuda.synchronize()
                tic = time.perf_counter()
                batch = indexed_batch(run.data.train, run.sampler.take(t.batch_size))
                mid = time.perf_counter()
                _step(run, batch, step)
                torch.cuda.synchronize()
                build.append(mid - tic)
                step_s.append(time.perf_counter() - mid)
            if os.environ.get("SYNC_DEBUG"):  # where the step makes the host wait for the GPU, one step
                _record_syncs(run, STEPS + 4, os.path.join(out, f"{arm}_syncs.txt"))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for step in range(STEPS + 1, STEPS + 4):
                    batch = indexed_batch(run.data.train, run.sampler.take(t.batch_size))
                    _step(run, batch, step)
                torch.cuda.synchronize()
            with open(os.path.join(out, f"{arm}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            results[arm] = {"batch_build_ms": 1000 * statistics.median(build[3:]),
                            "train_step_ms": 1000 * statistics.median(step_s[3:]),
                            "train_step_ms_all": [round(1000 * s, 2) for s in step_s]}
            print(arm, json.dumps({k: v for k, v in results[arm].items() if k != "train_step_ms_all"}), flush=True)
            del run
            torch.cuda.empty_cache()
    with open(os.path.join(out, "train_step_profile.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "arms": results}, f, indent=1)


def _step(run, batch: dict[str, torch.Tensor], step: int) -> None:
    """One optimizer step of ``run`` (``prepare_run``'s) on ``batch``, as the training loop takes it."""
    ctx, t = run.context, run.config.train
    train_step(ctx.train_model or ctx.model, [batch], ctx.optimizer, ctx.scheduler, step=step, loss_fn=ctx.loss_fn,
               max_grad_norm=t.max_grad_norm, autocast_dtype=run.autocast_dtype, hooks=ctx.hooks)


def _record_syncs(run, step: int, path: str) -> None:
    """One step under ``torch.cuda.set_sync_debug_mode("warn")``: every host-device synchronisation becomes a
    warning; their call sites (innermost frame in centrifuge, else the innermost) are counted into ``path``."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if "centrifuge" in f.filename and "gpu_train_step_profile" not in f.filename]
        frame = (ours or frames)[-1]
        sites[f"{frame.filename.split('src/')[-1]}:{frame.lineno} {frame.name}"] += 1

    batch = indexed_batch(run.data.train, run.sampler.take(run.config.train.batch_size))
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(run, batch, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with open(path, "w") as f:
        f.write(f"{sum(sites.values())} synchronisations in one step\n")
        for site, count in sites.most_common():
            f.write(f"{count:4d}  {site}\n")


def plot(png: str, runs: list[str]) -> None:
    """Bars of each arm's median train_step time, one group per LABEL=train_step_profile.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = []
    for label, path in (r.split("=", 1) for r in runs):
        with open(path) as f:
            loaded.append((label, json.load(f)["arms"]))
    arms = list(dict.fromkeys(arm for _, data in loaded for arm in data))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(loaded)
    for i, (label, data) in enumerate(loaded):
        xs = [j + i * width for j, arm in enumerate(arms) if arm in data]
        ys = [data[arm]["train_step_ms"] for arm in arms if arm in data]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(loaded) - 1) / 2 for j in range(len(arms))], arms, fontsize=8)
    ax.set_ylabel("centrifuge train step (ms, median)")
    ax.set_title("One training step as `centrifuge train` runs it (fp32 weights, bf16 autocast), H200", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "--plot":  # --plot PNG LABEL=JSON [LABEL=JSON ...]
        plot(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], [a.split("=", 1)[1] if a.startswith("--data-set=") else a for a in sys.argv[2:]])
