"""Python side of ``benchmarks/multi_gpu.sh``: one ``centrifuge train`` run under torchrun, the N-GPU gradient
check, and the report. The shell script runs every part in its own ``torchrun`` (with a timeout) and calls
``report`` last; see ``multi_gpu.sh`` for the whole procedure.

Sub-commands (each rank of a torchrun job runs the same command; rank 0 alone writes the result file):

* ``train``: ``prepare_run`` + ``execute_run`` of ``centrifuge train`` for one shape / arm / N, the very code
  path of the CLI. Two things are added around it, none inside the loop: the peak CUDA memory of every rank
  (``torch.cuda.max_memory_allocated`` from after set-up to the end, gathered to rank 0), and the final
  checkpoint is not written (``checkpoint.save_checkpoint`` replaced for this process: the loop always saves
  at the last step, 13-20 GB of weights + AdamW state per run that the benchmark does not need; the step
  loop, its timing and its metrics are untouched). Tokens/s is read from rank 0's ``metrics.jsonl``.
* ``gradcheck``: gradients of one ``train_step`` under FSDP2 on N ranks (full tensors gathered) against the
  same step on one device over the same global micro-batches, computed by rank 0 before it joins the
  process group. Cases: dense, token filtering with a random mask known before the forward (the training
  runs' selector) and, for information only, ``self_loss`` batch-scope selection after the forward (under
  bf16 a near-tie in the top-k may pick other tokens on N ranks; it does not count in the verdict).
* ``report``: results.json, results.csv, table.txt (printed) and multi_gpu.png where matplotlib imports.

Usage: see ``bash benchmarks/multi_gpu.sh --help``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import subprocess
import sys
import time

from centrifuge._io import write_json_atomic

# ------------------------------------------------------------------------------------------- definitions

SHAPE_PRESETS = {"tinyllama": "tinyllama-1.1b"}  # short names; any preset name works too


def shape_model(shape: str) -> tuple[str, int | None]:
    """``tinyllama`` -> (tinyllama-1.1b, None); ``llama2-7b-8l`` -> (llama2-7b, 8); any preset[-Kl]."""
    layers = None
    base = shape
    if shape.endswith("l") and "-" in shape:
        head, _, tail = shape.rpartition("-")
        if tail[:-1].isdigit():
            base, layers = head, int(tail[:-1])
    return SHAPE_PRESETS.get(base, base), layers


# FSDP2 knobs for a short backward (train.fsdp_reshard_after_forward / fsdp_prefetch): the "_tuned" arms
TUNED = ["train.fsdp_reshard_after_forward=false", "train.fsdp_prefetch=1"]


def arm_sets(arm: str, *, keep: float, rate: float) -> list[str]:
    """``--set`` items of an arm; all under FSDP2 but the ``_ddp`` ones."""
    tokens = [f"tokens.keep_ratio={keep}", "tokens.mode=fast"]
    neurons = [f"neurons.rate={rate}", "neurons.schedule=constant"]
    arms = {
        "dense": ["tokens.keep_ratio=1.0", "train.distributed=fsdp2"],
        "tokens": [*tokens, "train.distributed=fsdp2"],
        "tokens_after": [*tokens, "tokens.selector=self_loss", "train.distributed=fsdp2"],  # mask after forward
        "tokens+neurons": [*tokens, *neurons, "train.distributed=fsdp2"],
        "dense_tuned": ["tokens.keep_ratio=1.0", "train.distributed=fsdp2", *TUNED],
        "tokens_tuned": [*tokens, "train.distributed=fsdp2", *TUNED],
        "tokens+neurons_tuned": [*tokens, *neurons, "train.distributed=fsdp2", *TUNED],
        "dense_ddp": ["tokens.keep_ratio=1.0", "train.distributed=ddp"],
        "tokens_ddp": [*tokens, "train.distributed=ddp"],
        "tokens+neurons_ddp": [*tokens, *neurons, "train.distributed=ddp"],
    }
    if arm not in arms:
        raise SystemExit(f"multi_gpu.py: unknown arm {arm!r} (choose from {', '.join(arms)})")
    return arms[arm]


def strategy_of(arm: str) -> str:
    return "ddp" if arm.endswith("_ddp") else "fsdp2"


def baseline_of(arm: str) -> str:
    """The dense arm an arm's step time is compared with (same wrapper and knobs)."""
    if arm.endswith("_ddp"):
        return "dense_ddp"
    return "dense_tuned" if arm.endswith("_tuned") else "dense"


def env_rank() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(
        os.environ.get("LOCAL_RANK", "0"))


def write_json(path: str, data: dict) -> None:
    write_json_atomic(path, data)


def window_throughput(records: list[dict]) -> tuple[float | None, list[float]]:
    """Harmonic mean of the window rates after the first window (equal steps per window and equal tokens per
    step: total tokens over total time). One window only: its own rate."""
    rates = [float(r["tokens_per_s"]) for r in records if r.get("kind") == "train"]
    use = rates[1:] or rates
    if not use:
        return None, rates
    return len(use) / sum(1.0 / r for r in use), rates


# ------------------------------------------------------------------------------------------ trace summary

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")


def collective_kind(name: str) -> str | None:
    """Which collective an event is (NCCL kernel ``ncclDevKernel_AllGather_RING_LL``, c10d / gloo op
    ``c10d::_reduce_scatter_base_``, ``gloo:all_reduce``, ...), or None."""
    flat = name.lower().replace("_", "")
    for kind in COLLECTIVES:
        if kind.replace("_", "") in flat:
            return kind
    return None


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged intervals."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def trace_summary(events: list[dict], steps: int) -> dict:
    """One rank's profiler trace (chrome-trace ``traceEvents``) over ``steps`` training steps, per step (ms).

    On CUDA (kernel events present): the window from the first to the last kernel; ``busy`` = union of all
    kernels, ``compute`` = union of the non-collective kernels; per collective kind (all-gather,
    reduce-scatter, all-reduce, broadcast) its kernel time, its **exposed** time (not overlapped by any
    compute kernel: what the step waits for) and its count; ``idle`` = window - busy; ``host_sync`` = time
    in blocking CUDA runtime calls (stream / device / event synchronize, synchronous memcpy). On the CPU
    (gloo: no kernels), per kind the count and host time of the c10d / gloo ops, nothing exposed."""
    xs = [e for e in events if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float))]
    kernels = [e for e in xs if e.get("cat") == "kernel"]
    per = max(steps, 1)
    out: dict = {"steps": steps, "device": "cuda" if kernels else "cpu", "collectives": {}}
    if kernels:
        spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
        window = max(b for _, b in spans) - min(a for a, _ in spans)
        busy = union(spans)
        compute = union([sp for sp, e in zip(spans, kernels, strict=True) if collective_kind(e["name"]) is None])
        out.update(window_ms=window / 1e3 / per, busy_ms=length(busy) / 1e3 / per,
                   compute_ms=length(compute) / 1e3 / per, idle_ms=(window - length(busy)) / 1e3 / per)
        for kind in COLLECTIVES:
            mine = [sp for sp, e in zip(spans, kernels, strict=True) if collective_kind(e["name"]) == kind]
            if not mine:
                continue
            merged = union(mine)
            out["collectives"][kind] = {"count": len(mine) / per, "ms": length(merged) / 1e3 / per,
                                        "exposed_ms": (length(merged) - overlap(merged, compute)) / 1e3 / per}
        runtime = [e for e in xs if e.get("cat") == "cuda_runtime" and e["name"].startswith(BLOCKING)]
        out["host_sync_ms"] = sum(float(e["dur"]) for e in runtime) / 1e3 / per
        out["host_syncs"] = len(runtime) / per
    else:
        ops = [e for e in xs if e.get("cat") == "cpu_op" and collective_kind(e["name"])
               and e["name"].startswith(("c10d::", "gloo:"))]
        for kind in COLLECTIVES:
            mine = [e for e in ops if collective_kind(e["name"]) == kind]
            if mine:
                out["collectives"][kind] = {"count": len(mine) / per,
                                            "ms": sum(float(e["dur"]) for e in mine) / 1e3 / per,
                                            "exposed_ms": None}
    marks = sorted((e for e in xs if str(e.get("name", "")).startswith("ProfilerStep#")), key=lambda e: e["ts"])
    out["step_ms"] = [float(e["dur"]) / 1e3 for e in marks]
    return out


# ----------------------------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from centrifuge.train import checkpoint as ckpt
    from centrifuge.train.config import load_config
    from centrifuge.train.errors import TrainError
    from centrifuge.train.loop import execute_run, prepare_run

    rank, world, _ = env_rank()
    preset, layers = shape_model(args.shape)
    sets = [
        f"model.preset={preset}", f"data.seq_len={args.seq}", f"train.batch_size={args.per_gpu_batch * world}",
        f"train.steps={args.steps}", f"train.device={args.device}", "train.warmup_steps=5", "train.lr=6e-4",
        "data.eval_fraction=0", "eval.every=0", "checkpoint.every=0", "checkpoint.keep=1",
        f"log.every={args.log_every}", "log.progress=false", "log.tensorboard=false",
        f"train.out_dir={args.run_dir}", f"data.cache_dir={args.cache_dir}",
        *arm_sets(args.arm, keep=args.keep, rate=args.rate),
    ]
    if layers is not None:
        sets.append(f"model.overrides={{num_hidden_layers: {layers}}}")
    if args.device == "cpu":
        sets.append("train.precision=fp32")

    if not args.write_checkpoint:
        def no_checkpoint(run_dir, *, step, **_):
            return os.path.join(run_dir, "checkpoints", f"step-{step:07d} (not written by the benchmark)")

        ckpt.save_checkpoint = no_checkpoint  # the loop calls ckpt.save_checkpoint(...) at the last step

    tic = time.perf_counter()
    try:
        config = load_config(None, sets)
        run = prepare_run(config)
        setup_s = time.perf_counter() - tic
        cuda = run.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        profiler = start_profiler(run, args) if args.profile_steps else None
        result = execute_run(run, started=tic)
        profile = finish_profiler(profiler, args, rank, world) if profiler is not None else None
        peak = [torch.cuda.max_memory_allocated(run.device) / 2**30] if cuda else [None]
        reserved = [torch.cuda.max_memory_reserved(run.device) / 2**30] if cuda else [None]
        if run.dist.enabled:  # every rank's peak to rank 0
            peaks: list = [None] * world
            dist.all_gather_object(peaks, (peak[0], reserved[0]))
            peak, reserved = [p for p, _ in peaks], [r for _, r in peaks]
        if rank == 0:
            with open(os.path.join(result.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                records = [json.loads(line) for line in f]
            tps, rates = window_throughput(records)
            tokens_per_step = args.per_gpu_batch * world * args.seq
            write_json(args.result, {
                "shape": args.shape, "preset": preset, "layers": layers, "arm": args.arm, "n": world,
                "strategy": strategy_of(args.arm) if world > 1 else "none (one process)",
                "sets": sets, "steps": result.step, "stopped_by_signal": result.stop_signal,
                "tokens_per_s": tps, "window_tokens_per_s": rates, "tokens_per_step": tokens_per_step,
                "step_ms": 1000.0 * tokens_per_step / tps if tps else None,
                "peak_mem_gib": peak, "peak_reserved_gib": reserved,
                "peak_mem_max_gib": max(peak) if peak and peak[0] is not None else None,
                "params": sum(p.numel() for p in run.context.model.parameters()),  # DTensor: global size
                "setup_s": setup_s, "wall_s": time.perf_counter() - tic,
                "device": torch.cuda.get_device_name(run.device) if cuda else "cpu",
                "final_loss": next((r["loss"] for r in reversed(records) if r.get("kind") == "train"), None),
                "profile": profile,
            })
            memory = f"peak {max(peak):.1f} GiB/GPU" if cuda else "no CUDA memory on the CPU"
            print(f"[multi_gpu] {args.shape} {args.arm} N={world}: {tps or float('nan'):,.0f} tokens/s, {memory}, "
                  f"{time.perf_counter() - tic:.0f} s", flush=True)
    except TrainError as err:
        if rank == 0:
            print(f"[multi_gpu] centrifuge train: error: {err}", file=sys.stderr)
        return err.exit_code
    # No barrier and no destroy_process_group: the last collective (the memory gather) is done, and tearing a
    # gloo group down hung now and then on a loaded CPU after the run had finished; the caller os._exit()s.
    return result.exit_code


def start_profiler(run, args):
    """torch.profiler over ``--profile-steps`` steps after ``--profile-wait`` (warm-up) steps of the run:
    stepped by an ``after_optimizer_step`` hook, so the loop itself is untouched."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if run.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=args.profile_wait, warmup=1, active=args.profile_steps, repeat=1)
    prof = torch.profiler.profile(activities=activities, schedule=schedule)
    prof.__enter__()
    run.context.hooks.after_optimizer_step.append(lambda step: prof.step())
    return prof


def finish_profiler(prof, args, rank: int, world: int) -> list | None:
    """Every rank's ``trace_summary`` (gathered on rank 0; None elsewhere); with ``--trace-dir`` the chrome
    traces of rank 0 and of the last rank as ``trace_rank<r>.json.gz`` (the rest would only fill the disk)."""
    import gzip
    import shutil
    import tempfile

    import torch.distributed as dist

    prof.__exit__(None, None, None)
    summary: dict = {"rank": rank, "error": None}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, encoding="utf-8") as f:
                trace = json.load(f)
            summary.update(trace_summary(trace.get("traceEvents", []), args.profile_steps))
            if args.trace_dir and rank in (0, world - 1):
                os.makedirs(args.trace_dir, exist_ok=True)
                with open(path, "rb") as src, gzip.open(os.path.join(args.trace_dir, f"trace_rank{rank}.json.gz"),
                                                         "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except Exception as err:  # a summary that fails must not lose the run's numbers
        summary["error"] = f"{type(err).__name__}: {err}"
    if world > 1 and dist.is_initialized():
        every: list = [None] * world
        dist.all_gather_object(every, summary)
        return every if rank == 0 else None
    return [summary]


# ------------------------------------------------------------------------------------------- gradcheck

# dense; tokens: random kappa mask known before the forward (bf16 autocast, as training runs); tokens_after:
# self_loss batch-scope top-k chosen after the forward, in fp32 (under bf16 a near-tie in the top-k may keep
# other tokens on N ranks than on one, which is not a gradient error); tokens+neurons: tokens + neuron
# omission (uniform plan, rate --rate, MLP and heads; FSDP2 since issue 23), bf16.
GRAD_CASES = ("dense", "tokens", "tokens_after", "tokens+neurons")
VERDICT_CASES = GRAD_CASES
FP32_CASES = ("tokens_after",)


def grad_model(args):
    from centrifuge.models.presets import build_model, preset_config

    preset, _ = shape_model(args.shape)
    config = preset_config(preset, num_hidden_layers=args.layers)
    return build_model(config, seed=3)


def grad_batches(args, world: int, vocab: int) -> list:
    """ACCUM global micro-batches [rows_per_rank * world, seq]: random ids, two packed documents per row
    (restarting positions), ~15 % unlabelled positions. The same on every rank (CPU generator)."""
    import torch

    gen = torch.Generator().manual_seed(11)
    rows, seq = args.rows_per_rank * world, args.seq
    out = []
    for _ in range(args.accum):
        ids = torch.randint(0, vocab, (rows, seq), generator=gen)
        labels = ids.masked_fill(torch.rand(rows, seq, generator=gen) < 0.15, -100)
        cut = seq // 3
        pos = torch.cat([torch.arange(cut), torch.arange(seq - cut)]).expand(rows, seq).contiguous()
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos,
                    "attention_mask": torch.ones(rows, seq, dtype=torch.long)})
    return out


def grad_loss(case: str, across_ranks: bool, keep: float):
    from centrifuge.tokens import selectors
    from centrifuge.tokens.training import TokenFilterLoss
    from centrifuge.train.step import dense_loss

    if case == "dense":
        return dense_loss
    selector = (selectors.self_loss(keep, scope="batch") if case == "tokens_after"
                else selectors.random(keep, seed=5))
    loss = TokenFilterLoss(selector=selector, dense_loss=dense_loss, total_steps=1, across_ranks=across_ranks)
    loss.set_step(0)
    return loss


def grad_step(args, case: str, device, batches, *, train_model=None, model=None, keep_on_rank0: bool = True):
    """One ``train_step``; returns ({name: fp32 CPU gradient}, stats). Gradients are read after the division
    by the global count (``after_backward``), gathered from FSDP2 shards on every rank, kept on rank 0."""
    import torch

    import centrifuge
    from centrifuge.train.step import StepHooks, train_step

    if case != "dense":
        centrifuge.apply(model)  # after FSDP2 wrapping, as the training loop's plug-in does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    grads: dict = {}
    before = []
    if case == "tokens+neurons":  # the neuron plug-in's order: after wrapping and centrifuge.apply
        from centrifuge import neurons

        omitter = neurons.attach(model, rate=args.rate, metric="uniform", total_steps=1,
                                 multiple=16 if model.config.intermediate_size < 1024 else 64)
        omitter.protect(optimizer)
        before.append(lambda step: omitter.plan(step - 1))

    def record(step):
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if keep_on_rank0:
                grads[name] = g.detach().float().cpu().clone()  # (clipping scales p.grad in place later)

    autocast = torch.bfloat16 if device.type == "cuda" and case not in FP32_CASES else None
    stats = train_step(train_model if train_model is not None else model, batches, optimizer, None, step=1,
                       loss_fn=grad_loss(case, train_model is not None, args.keep), max_grad_norm=1.0,
                       autocast_dtype=autocast, hooks=StepHooks(before_forward=before, after_backward=[record]))
    return grads, {"loss": stats.loss, "counted": stats.num_counted, "grad_norm": stats.grad_norm}


def compare(got: dict, ref: dict) -> dict:
    """Per parameter: relative error ||g - r|| / ||r|| and cosine; the worst of each."""
    import torch

    worst_rel, worst_rel_name, worst_cos, worst_cos_name = 0.0, None, 1.0, None
    for name, r in ref.items():
        g = got[name].double()
        r = r.double()
        rn = r.norm().item()
        rel = (g - r).norm().item() / rn if rn > 0 else (g.norm().item() and math.inf)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item() if rn > 0 else 1.0
        if rel > worst_rel:
            worst_rel, worst_rel_name = rel, name
        if cos < worst_cos:
            worst_cos, worst_cos_name = cos, name
    return {"max_rel_err": worst_rel, "max_rel_err_param": worst_rel_name, "min_cos": worst_cos,
            "min_cos_param": worst_cos_name, "params": len(ref)}


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from centrifuge.train import distributed

    rank, world, local = env_rank()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("multi_gpu.py gradcheck: --device cuda but CUDA is not available")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    tic = time.perf_counter()

    # The one-device reference, on rank 0, before the process group exists (train_step all-reduces its
    # counts whenever a group is initialized).
    reference: dict = {}
    if rank == 0:
        for case in GRAD_CASES:
            model = grad_model(args).to(device)
            batches = grad_batches(args, world, model.config.vocab_size)
            grads, stats = grad_step(args, case, device, batches, model=model)
            reference[case] = (grads, stats)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref_s = time.perf_counter() - tic

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        info = distributed.Distributed(rank, world, local, "fsdp2")  # FSDP2 even on one rank: the same path
        results = {}
        for case in GRAD_CASES:
            model = grad_model(args).to(device)
            batches = grad_batches(args, world, model.config.vocab_size)
            train_model = distributed.wrap_model(model, info, reshard_after_forward=not args.keep_gathered,
                                                 prefetch=args.prefetch)
            share = [distributed.local_share(b, info) for b in batches]
            grads, stats = grad_step(args, case, device, share, train_model=train_model, model=model,
                                     keep_on_rank0=rank == 0)
            if rank == 0:
                ref_grads, ref_stats = reference[case]
                found = compare(grads, ref_grads)
                found.update(loss=stats["loss"], ref_loss=ref_stats["loss"], counted=stats["counted"],
                             ref_counted=ref_stats["counted"], grad_norm=stats["grad_norm"],
                             ref_grad_norm=ref_stats["grad_norm"])
                found["loss_rel_err"] = abs(stats["loss"] - ref_stats["loss"]) / abs(ref_stats["loss"])
                found["passed"] = bool(found["max_rel_err"] < args.rel_tol and found["min_cos"] > args.cos_min
                                       and stats["counted"] == ref_stats["counted"])
                found["in_verdict"] = case in VERDICT_CASES
                results[case] = found
            del model, train_model, grads
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            # The check can fail: the dense and token-filtered reference gradients differ by far more than the
            # tolerance (a comparison of two equal things would pass whatever the code did).
            contrast = compare(reference["tokens"][0], reference["dense"][0])["max_rel_err"]
            verdict = all(results[c]["passed"] for c in VERDICT_CASES)
            write_json(args.result, {
                "n": world, "backend": dist.get_backend(), "strategy": "fsdp2", "shape": args.shape,
                "layers": args.layers, "seq": args.seq, "rows_per_rank": args.rows_per_rank, "accum": args.accum,
                "keep": args.keep, "rate": args.rate,
                "autocast": "bf16 (tokens_after: fp32)" if device.type == "cuda" else "none (fp32)",
                "fsdp": {"reshard_after_forward": not args.keep_gathered, "prefetch": args.prefetch},
                "rel_tol": args.rel_tol, "cos_min": args.cos_min, "cases": results,
                "contrast_dense_vs_tokens_rel_err": contrast, "passed": verdict,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "reference_s": ref_s, "wall_s": time.perf_counter() - tic,
            })
            for case, r in results.items():
                print(f"[multi_gpu] gradcheck N={world} {case}: max rel err {r['max_rel_err']:.2e} "
                      f"({r['max_rel_err_param']}), min cos {r['min_cos']:.6f}, counted {r['counted']} / ref "
                      f"{r['ref_counted']}: {'PASS' if r['passed'] else 'FAIL'}"
                      + ("" if r["in_verdict"] else " (information only)"), flush=True)
            print(f"[multi_gpu] gradcheck verdict: {'PASS' if verdict else 'FAIL'} (dense vs tokens reference "
                  f"differ by {contrast:.2e})", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------- report


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def build_report(parts: str, meta: dict) -> dict:
    """Runs (including failed / skipped ones from status.tsv), ratios to dense, scaling efficiency."""
    status = []
    path = os.path.join(parts, "status.tsv")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 5:
                    status.append({"kind": fields[0], "shape": fields[1], "arm": fields[2], "n": int(fields[3]),
                                   "status": fields[4], "seconds": float(fields[5]) if len(fields) > 5 else None})
    runs = []
    grads, profiles = [], []
    for s in status:
        name = f"{s['kind']}-{s['shape']}-{s['arm']}-{s['n']}.json"
        result_path = os.path.join(parts, name)
        data = None
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                data = json.load(f)
        if s["kind"] == "grad":
            grads.append({"status": s["status"], "seconds": s["seconds"], **(data or {}), "n": s["n"]})
            continue
        if s["kind"] == "profile":
            profiles.append({"shape": s["shape"], "arm": s["arm"], "n": s["n"], "status": s["status"],
                             "ranks": (data or {}).get("profile"), "step_ms": (data or {}).get("step_ms")})
            continue
        run = {"shape": s["shape"], "arm": s["arm"], "n": s["n"], "status": s["status"], "seconds": s["seconds"]}
        if data:
            run.update({k: data[k] for k in ("tokens_per_s", "step_ms", "peak_mem_gib", "peak_mem_max_gib",
                                              "strategy", "window_tokens_per_s", "setup_s", "steps", "device",
                                              "params", "final_loss", "stopped_by_signal", "tokens_per_step")})
        runs.append(run)

    def tps(shape, arm, n):
        return next((r.get("tokens_per_s") for r in runs if (r["shape"], r["arm"], r["n"]) == (shape, arm, n)),
                    None)

    for r in runs:
        base_arm = baseline_of(r["arm"])
        dense, mine = tps(r["shape"], base_arm, r["n"]), r.get("tokens_per_s")
        r["baseline"] = base_arm
        r["step_x_dense"] = dense / mine if dense and mine else None  # step time relative to dense
        one = tps(r["shape"], r["arm"], 1)
        r["scaling_efficiency"] = mine / (r["n"] * one) if mine and one else None
    grad = None
    if grads:  # one verdict over every N checked
        grad = {"checks": grads, "passed": all(g.get("passed") is True for g in grads)}
    return {"meta": meta, "runs": runs, "gradcheck": grad, "profiles": profiles}


def table_text(report: dict) -> str:
    meta, lines = report["meta"], []
    lines.append(f"Centrifuge multi-GPU run ({meta.get('device', '?')}, torch {meta.get('torch')}, "
                 f"transformers {meta.get('transformers')}, commit {meta.get('commit')})")
    lines.append(f"{meta.get('per_gpu_batch')}x{meta.get('seq')} tokens per GPU per step, {meta.get('steps')} steps, "
                 f"tokens kappa={meta.get('keep')}, neurons rate={meta.get('rate')} (constant); fsdp2 unless the "
                 "arm ends in _ddp; _tuned: reshard_after_forward=false, prefetch 1; N=1 is one process (no wrapper)")
    lines.append("")
    head = (f"{'shape':16s} {'arm':15s} {'N':>2s} {'tokens/s':>11s} {'step ms':>8s} {'x dense':>8s} "
            f"{'scaling eff':>11s} {'peak GiB/GPU':>12s}  status")
    lines.append(head)
    lines.append("-" * len(head))
    for r in report["runs"]:
        base = r.get("baseline")
        note = r["status"] + (f" (vs {base})" if base not in (None, "dense") and r["arm"] != base else "")
        lines.append(f"{r['shape']:16s} {r['arm']:15s} {r['n']:2d} {fmt(r.get('tokens_per_s'), '11,.0f'):>11s} "
                     f"{fmt(r.get('step_ms'), '8.1f'):>8s} {fmt(r.get('step_x_dense'), '8.3f'):>8s} "
                     f"{fmt(r.get('scaling_efficiency'), '11.3f'):>11s} "
                     f"{fmt(r.get('peak_mem_max_gib'), '12.1f'):>12s}  {note}")
    lines.append("")
    lines.append("x dense = step time / dense step time at the same N (tokens/s of dense / tokens/s of the arm); "
                 "scaling eff = tokens/s(N) / (N * tokens/s(1)).")
    g = report.get("gradcheck")
    if not g:
        lines.append("gradient check: not run")
    for c in (g or {}).get("checks", []):
        if "cases" not in c:
            lines.append(f"gradient check N={c['n']}: no result ({c['status']})")
            continue
        lines.append(f"gradient check, FSDP2 on N={c['n']} ({c['backend']}, {c['autocast']}) vs one device, "
                     f"{c['shape']} {c['layers']} layers, {c['rows_per_rank']}x{c['seq']} per rank x {c['accum']} "
                     f"micro-batches (rel err < {c['rel_tol']:g}, cos > {c['cos_min']:g}):")
        for case, r in c["cases"].items():
            lines.append(f"  {case:14s} max rel err {r['max_rel_err']:.2e}  min cos {r['min_cos']:.6f}  "
                         f"counted {r['counted']}/{r['ref_counted']}  loss {r['loss']:.5f}/{r['ref_loss']:.5f}  "
                         f"{'PASS' if r['passed'] else 'FAIL'}" + ("" if r["in_verdict"] else "  (information)"))
        lines.append(f"  N={c['n']}: {'PASS' if c['passed'] else 'FAIL'} (dense vs tokens reference gradients "
                     f"differ by {c['contrast_dense_vs_tokens_rel_err']:.2e}: the check can fail)"
                     + ("; N=1: FSDP2 on one rank, not a multi-GPU check" if c["n"] == 1 else ""))
    if g:
        lines.append(f"gradient check verdict: {'PASS' if g['passed'] else 'FAIL'}")
    lines.extend(profile_lines(report.get("profiles") or []))
    return "\n".join(lines) + "\n"


def profile_lines(profiles: list[dict]) -> list[str]:
    """Per profiled run and rank: ms per step of the window, busy, idle, and each collective's time, exposed
    time (not hidden behind compute) and count per step; the straggler spread of busy time over ranks."""
    if not profiles:
        return []
    lines = ["", "profiler (per step; exposed = collective time not overlapped by compute kernels):"]
    for p in profiles:
        ranks = p.get("ranks") or []
        if not ranks:
            lines.append(f"  {p['shape']} {p['arm']} N={p['n']}: no trace ({p['status']})")
            continue
        busy = [r.get("busy_ms") for r in ranks if r.get("busy_ms")]
        spread = f", busy max/min over ranks {max(busy) / min(busy):.3f}" if busy else ""
        lines.append(f"  {p['shape']} {p['arm']} N={p['n']} ({p['status']}{spread}):")
        for r in ranks:
            if r.get("error"):
                lines.append(f"    rank {r['rank']}: {r['error']}")
                continue
            parts = [f"{kind} {c['ms']:.2f} ms" + (f" ({c['exposed_ms']:.2f} exposed)" if c["exposed_ms"] is not None
                                                     else "") + f" x{c['count']:g}"
                     for kind, c in r.get("collectives", {}).items()]
            head = (f"window {fmt(r.get('window_ms'), '.1f')} busy {fmt(r.get('busy_ms'), '.1f')} "
                    f"idle {fmt(r.get('idle_ms'), '.1f')} host sync {fmt(r.get('host_sync_ms'), '.2f')} ms; "
                    if r.get("device") == "cuda" else "")
            lines.append(f"    rank {r['rank']}: {head}{'; '.join(parts) or 'no collective seen'}")
    return lines


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = [r for r in report["runs"] if r.get("tokens_per_s")]
    shapes = sorted({r["shape"] for r in runs})
    if not shapes:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for arm in sorted({r["arm"] for r in runs if r["shape"] == shape}):
            points = sorted((r["n"], r["tokens_per_s"]) for r in runs if (r["shape"], r["arm"]) == (shape, arm))
            ax.plot([n for n, _ in points], [t / 1e3 for _, t in points], marker="o", label=arm)
        ax.set(xlabel="GPUs (N)", ylabel="k tokens / s (global)", title=shape)
        ax.legend(fontsize=8)
    fig.suptitle(f"centrifuge train under torchrun, {report['meta'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def cmd_report(args: argparse.Namespace) -> int:
    meta = {k: getattr(args, k) for k in ("steps", "seq", "per_gpu_batch", "keep", "rate", "ngpus", "shapes",
                                          "arms", "device_kind", "command")}
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__)
        meta["device"] = torch.cuda.get_device_name(0) if args.device_kind == "cuda" else "cpu"
    except Exception as err:  # the report must be written whatever happened
        meta["device"] = f"unknown ({err})"
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except Exception:
        meta["commit"] = None
    report = build_report(args.parts, meta)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "results.json"), report)
    columns = ["shape", "arm", "n", "status", "strategy", "tokens_per_s", "step_ms", "step_x_dense", "baseline",
               "scaling_efficiency", "peak_mem_max_gib", "setup_s", "seconds"]
    with open(os.path.join(args.out_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in report["runs"]:
            writer.writerow({k: r.get(k) for k in columns})
        for g in (report.get("gradcheck") or {}).get("checks", []):
            for case, c in (g.get("cases") or {}).items():  # the gradient checks as rows of their own
                writer.writerow({"shape": g.get("shape"), "arm": f"gradcheck:{case}", "n": g.get("n"),
                                 "status": "PASS" if c["passed"] else "FAIL", "strategy": "fsdp2"})
    text = table_text(report)
    with open(os.path.join(args.out_dir, "table.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    drawn = plot(report, os.path.join(args.out_dir, "multi_gpu.png"))
    print(f"files: {args.out_dir}/results.json, results.csv, table.txt, log.txt"
          + (", multi_gpu.png" if drawn else " (no matplotlib: no plot)") + "\n")
    print(text, end="", flush=True)  # the table last
    g = report.get("gradcheck")
    return 0 if g is None or g.get("passed") else 3


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="one centrifuge train run (every rank of a torchrun job)")
    t.add_argument("--shape", required=True)
    t.add_argument("--arm", required=True)
    t.add_argument("--result", required=True, help="JSON written by rank 0")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--cache-dir", required=True)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--log-every", type=int, default=5)
    t.add_argument("--seq", type=int, default=2048)
    t.add_argument("--per-gpu-batch", type=int, default=8)
    t.add_argument("--keep", type=float, default=0.5)
    t.add_argument("--rate", type=float, default=0.5)
    t.add_argument("--device", default="auto")
    t.add_argument("--write-checkpoint", action="store_true", help="let the loop write its final checkpoint")
    t.add_argument("--profile-steps", type=int, default=0, help="profile this many steps (0 = no profiler)")
    t.add_argument("--profile-wait", type=int, default=3, help="steps before the profiled ones (warm-up)")
    t.add_argument("--trace-dir", default=None, help="keep every rank's chrome trace here (gzip)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("gradcheck", help="FSDP2 gradients on N ranks vs one device (every rank)")
    g.add_argument("--result", required=True)
    g.add_argument("--shape", default="tinyllama")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--rows-per-rank", type=int, default=2)
    g.add_argument("--accum", type=int, default=2)
    g.add_argument("--keep", type=float, default=0.5)
    g.add_argument("--rate", type=float, default=0.5, help="neuron omission rate of the tokens+neurons case")
    g.add_argument("--keep-gathered", action="store_true", help="FSDP2 reshard_after_forward=False")
    g.add_argument("--prefetch", type=int, default=0, help="FSDP2 explicit prefetch (layers ahead)")
    g.add_argument("--rel-tol", type=float, default=2e-2)
    g.add_argument("--cos-min", type=float, default=0.999)
    g.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    g.add_argument("--timeout-s", type=int, default=600, help="process-group timeout")
    g.set_defaults(func=cmd_gradcheck)

    r = sub.add_parser("report", help="results.json / .csv / table.txt (/ multi_gpu.png) from the parts")
    r.add_argument("--parts", required=True)
    r.add_argument("--out-dir", required=True)
    for name, kind in (("steps", int), ("seq", int), ("per-gpu-batch", int), ("keep", float), ("rate", float)):
        r.add_argument(f"--{name}", type=kind)
    for name in ("ngpus", "shapes", "arms", "command"):
        r.add_argument(f"--{name}", default="")
    r.add_argument("--device-kind", default="cuda")
    r.set_defaults(func=cmd_report)

    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: worker threads of a finished process group cannot hang the exit
