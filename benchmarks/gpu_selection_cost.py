"""What Rho-1 token selection costs next to a training step (GPU, TinyLlama shape, bf16, 8 × 2048).

    PYTHONPATH=src python benchmarks/gpu_selection_cost.py OUT_DIR [--keep 0.5] [--reps 5]
    PYTHONPATH=src python benchmarks/gpu_selection_cost.py OUT_DIR --smoke     # CPU, tiny shapes: checks the script

Measures, in one process (median of ``--reps`` after 2 warm-ups; CUDA events for GPU work, wall clock with
synchronisation for host work):

- ``dense``: the plain HF step (forward + backward, no optimizer), the baseline of every ratio;
- ``sparse (keep_mask)``: ``centrifuge.apply(model)``, keep mask from offline reference scores
  (``reference_loss`` selector, known before the forward);
- ``sparse (select=excess_loss)``: exact Rho-1 timing, selection after the forward on current − reference;
- selection itself: reading [8, 2048] scores from ``ReferenceScores`` shards (page cache warm), moving
  them to the GPU, ``keep_top`` on the GPU and on the CPU;
- an online reference forward (no_grad, per-token loss through ``token_loss_no_grad``) for a reference of
  the same size and for a ~4× cheaper one (half width, same depth), and offline scoring throughput.

Writes ``OUT_DIR/selection_cost.json`` and prints a table last. About a minute of GPU time on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import centrifuge
from centrifuge.models.presets import build_model, preset_config
from centrifuge.ops.cross_entropy import _liger_available
from centrifuge.tokens import selectors as S
from centrifuge.tokens.reference import OnlineReference, ReferenceScores, write_reference_scores

B, T = 8, 2048
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Packed:
    """A minimal packed dataset ([N, T] tensors + ``batch``) for the offline scores."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: getattr(self, k).index_select(0, idx) for k in ("input_ids", "labels", "position_ids",
                                                                    "attention_mask")}


def gpu_time(fn, reps: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` measured with CUDA events."""
    if DEVICE.type != "cuda":
        return wall_time(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _stats(times)


def wall_time(fn, reps: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` by the wall clock, GPU synchronised before and after."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - tic) * 1e3)
    return _stats(times)


def _stats(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def params_and_flops(config) -> tuple[int, float]:
    """Parameters and forward GFLOP per token (matmuls only, attention scores excluded)."""
    d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f
    params = L * per_layer + 2 * V * d
    return params, 2 * (L * per_layer + V * d) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: only checks that the script runs")
    args = parser.parse_args()
    global B, T, DEVICE
    if args.smoke:
        B, T, DEVICE = 2, 64, torch.device("cpu")
    elif not torch.cuda.is_available():
        print("needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = DEVICE
    cuda = dev.type == "cuda"
    started = time.perf_counter()
    results: dict[str, dict] = {}

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    def record(name: str, stats: tuple[float, float, float], **extra) -> None:
        results[name] = {"ms": stats[0], "p20": stats[1], "p80": stats[2], **extra}
        print(f"  {name:42s} {stats[0]:9.3f} ms", flush=True)

    preset, small = ("tiny", dict(hidden_size=64, intermediate_size=176, num_attention_heads=2,
                                  num_key_value_heads=1)) if args.smoke else (
        "tinyllama-1.1b", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                               num_key_value_heads=4))
    cfg = preset_config(preset)
    small_cfg = preset_config(preset, **small)  # half width, same depth: ~3.7x fewer FLOPs per token
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(dev):
        model = build_model(cfg, dtype=dtype, seed=0)
        ref_same = build_model(cfg, dtype=dtype, seed=1).eval().requires_grad_(False)
        ref_small = build_model(small_cfg, dtype=dtype, seed=2).eval().requires_grad_(False)
    model.train()
    gen = torch.Generator().manual_seed(0)

    # ---- a dataset of 2 batches of full rows (one document each: the dense baseline keeps SDPA's causal
    # flash path, as in `centrifuge bench`) and its offline reference scores
    n_seq = 2 * B
    ids = torch.randint(0, cfg.vocab_size, (n_seq, T), generator=gen)
    pos = torch.arange(T).expand(n_seq, T).clone()
    labels = ids.clone()
    data = Packed(ids, labels, pos, torch.ones_like(ids))
    score_dir = tempfile.mkdtemp(prefix="centrifuge-scores-")
    small_ref = OnlineReference(ref_small, model_id="tinyllama-half-width")
    sync()
    tic = time.perf_counter()
    write_reference_scores(small_ref, data, score_dir, tokenizer_hash="bench", batch_size=B, shard_size=B,
                           progress=False)
    sync()
    offline_s = time.perf_counter() - tic  # includes the first-call warm-up of the small model
    scores = ReferenceScores(score_dir, dataset=data)
    indices = torch.randperm(n_seq, generator=gen)[:B].tolist()  # rows from both shards, shuffled

    batch = {k: v.to(dev) for k, v in data.batch(indices).items()}
    inputs = dict(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    ref_gpu = scores.for_batch(indices).to(dev)
    valid = S.labelled_positions(batch["labels"])
    before = S.reference_loss(args.keep)
    after = S.excess_loss(args.keep)
    keep_mask = before(valid=valid, reference=ref_gpu)
    device_name = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    print(f"device {device_name} · torch {torch.__version__} · liger {_liger_available()} · "
          f"keep {args.keep} · {B}×{T}", flush=True)

    # ---- training steps (forward + backward; no optimizer)
    def step(**kw):
        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs, **kw).loss.backward()
        return run

    def dense():
        model.zero_grad(set_to_none=True)
        model(**inputs, use_cache=False).loss.backward()

    for name, fn, patched in (("dense step", dense, False),
                              ("sparse step (keep_mask, before fwd)", step(keep_mask=keep_mask), True),
                              ("sparse step (select=excess_loss)", step(select=after.bind(reference=ref_gpu)), True)):
        if patched:
            centrifuge.apply(model)
        reset_peak()
        record(name, gpu_time(fn, args.reps))
        results[name]["peak_gib"] = peak_gib()
        centrifuge.revert(model)
    model.zero_grad(set_to_none=True)

    # ---- selection itself
    record("scores: ReferenceScores.for_batch (CPU)", wall_time(lambda: scores.for_batch(indices), args.reps * 4))
    host = scores.for_batch(indices)
    record("scores: host -> GPU copy", wall_time(lambda: host.to(dev), args.reps * 4))
    record("keep_top on GPU [8, 2048]", wall_time(lambda: before(valid=valid, reference=ref_gpu), args.reps * 4))
    valid_cpu = valid.cpu()
    record("keep_top on CPU [8, 2048]", wall_time(lambda: before(valid=valid_cpu, reference=host), args.reps * 4))
    current = torch.rand(B, T, device=dev) * 10
    record("excess_loss selection on GPU", wall_time(lambda: after(scores=current, valid=valid, reference=ref_gpu),
                                                     args.reps * 4))

    def offline_selection():
        ref = scores.for_batch(indices).to(dev, non_blocking=True)
        return before(valid=valid, reference=ref)

    record("selection total (load + copy + keep_top)", wall_time(offline_selection, args.reps * 4))

    # ---- online reference forwards
    for name, ref_model, config in (("online reference, same size", ref_same, cfg),
                                    ("online reference, ~4x smaller", ref_small, small_cfg)):
        online = OnlineReference(ref_model)
        params, gflop = params_and_flops(config)
        reset_peak()
        record(name, gpu_time(lambda online=online: online(batch), args.reps), params=params,
               gflop_per_token=gflop)
        results[name]["peak_gib"] = peak_gib()

    dense_ms = results["dense step"]["ms"]
    sparse_ms = results["sparse step (keep_mask, before fwd)"]["ms"]
    for row in results.values():
        row["x_dense"] = row["ms"] / dense_ms
        row["x_sparse_step"] = row["ms"] / sparse_ms
    out = {
        "tool": "benchmarks/gpu_selection_cost.py",
        "shape": {"preset": preset, "batch": B, "seq": T, "dtype": "bf16", "keep": args.keep},
        "environment": {"device": device_name, "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__, "python": platform.python_version(),
                        "liger": _liger_available()},
        "notes": ["step = forward + backward (no optimizer): selection fractions are upper bounds",
                  "score loads hit the page cache (a cold read adds disk latency; prefetch in the data loader)",
                  "offline scoring time includes the small reference's first-call warm-up"],
        "offline_scoring": {"sequences": n_seq, "seconds": offline_s,
                            "tokens_per_s": n_seq * T / offline_s, "model": "half-width TinyLlama"},
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    path = os.path.join(args.out_dir, "selection_cost.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)

    print(f"\nwrote {path} ({out['seconds']:.0f} s)")
    print(f"offline scoring, half-width reference: {out['offline_scoring']['tokens_per_s']:,.0f} tokens/s")
    print(f"{'':44s} {'ms':>9s} {'× dense':>8s} {'× sparse':>9s} {'peak GiB':>9s}")
    for name, row in results.items():
        peak = f"{row['peak_gib']:9.1f}" if "peak_gib" in row else ""
        print(f"{name:44s} {row['ms']:9.3f} {row['x_dense']:8.4f} {row['x_sparse_step']:9.4f} {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
