"""Timing harness of ``centrifuge bench``: one process, every variant on the same data, ratios to dense.

Per variant (and keep ratio): the variant is prepared on the (shared) model, a fresh AdamW is made, then
``warmup + reps`` training steps run; each step is timed in three back-to-back pieces — forward, backward,
optimizer step — with CUDA events (``time.perf_counter`` on the CPU, where everything is synchronous).
The step time is their sum. Memory: ``reset_peak_memory_stats`` and ``memory_allocated`` just before the
forward, ``max_memory_allocated`` after the optimizer step; activation memory = peak − before. Between
variants the optimizer, gradients and patches are dropped and the CUDA cache emptied; one model is built
per shape and reused by every variant of that shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from centrifuge.bench.flops import count_flops, linear_params, peak_tflops
from centrifuge.bench.variants import MODIFIERS, Run, Variant, VariantSpec, random_keep_mask
from centrifuge.models.presets import build_model, preset_config

GIB = float(1 << 30)

# Layer truncation per preset when --layers is not given (Llama-2-7B width: 8 layers fit one 80 GB GPU with
# 8×2048 tokens, AdamW states included).
BENCH_LAYERS: dict[str, int] = {"llama2-7b": 8, "gemma3-4b": 8, "qwen3-moe-30b-a3b": 2}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
# Mixed precision: fp32 weights (and optimizer), forwards under bf16 autocast — what `centrifuge train` and
# Trainer(bf16=True) run. The pure-bf16 bench could not see a path that is slow only under autocast.
AUTOCAST = {"amp-bf16": torch.bfloat16}


def precision(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype or None) of a ``--dtype`` name."""
    if name in AUTOCAST:
        return torch.float32, AUTOCAST[name]
    return DTYPES[name], None


@dataclasses.dataclass(frozen=True)
class Group:
    """One model shape and batch geometry; ratios are taken within a group."""

    preset: str
    layers: int | None
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def title(self) -> str:
        layers = f", {self.layers} layers" if self.layers else ""
        return f"{self.preset}{layers}, {self.batch}×{self.seq} tokens"


@dataclasses.dataclass
class BenchOptions:
    """Everything a bench run needs (the CLI fills it; tests may build it directly)."""

    presets: list[str]
    variants: list[VariantSpec]
    seqs: list[int]
    batch: int
    tokens: int | None = None
    keeps: list[float] = dataclasses.field(default_factory=lambda: [0.5])
    omit: float = 0.5
    layers: dict[str, int] = dataclasses.field(default_factory=dict)  # preset (or "*") -> layers
    reps: int = 10
    warmup: int = 3
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    lr: float = 1e-5
    peak_tflops: float | None = None
    count_flops: bool = False
    time_limit: float | None = None

    def groups(self) -> list[Group]:
        """Preset × seq sweep; with ``tokens`` the batch is tokens // seq (constant tokens per step)."""
        out = []
        for preset in self.presets:
            layers = self.layers.get(preset, self.layers.get("*", BENCH_LAYERS.get(preset)))
            for seq in self.seqs:
                batch = self.batch if self.tokens is None else self.tokens // seq
                if batch < 1:
                    raise ValueError(f"--tokens {self.tokens} is less than one sequence of {seq}")
                out.append(Group(preset, layers, batch, seq))
        return out


# --------------------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------------------


def group_config(group: Group, overrides: dict[str, Any] | None = None) -> Any:
    """HF config of the group's preset (layers truncated) with ``overrides``; ``use_cache`` off."""
    overrides = dict(overrides or {})
    if group.layers:
        overrides["num_hidden_layers"] = group.layers
    config = preset_config(group.preset, **overrides)
    if "head_dim" in overrides:  # presets may set head_dim after construction; the override wins
        config.head_dim = overrides["head_dim"]
    config.use_cache = False
    return config


def model_overrides(group: Group, spec: VariantSpec, omit: float) -> dict[str, Any]:
    return spec.config_overrides(group_config(group), omit=omit)


def build_group_model(group: Group, spec: VariantSpec, *, omit: float, device: torch.device,
                      dtype: torch.dtype, seed: int) -> nn.Module:
    """Random-init model of the group's shape changed by the spec; built directly on ``device``."""
    config = group_config(group, model_overrides(group, spec, omit))
    with torch.device(device):
        model = build_model(config, dtype=dtype, attn_implementation="sdpa", seed=seed)
    model.config.use_cache = False
    return model.train()


def make_batch(vocab: int, batch: int, seq: int, *, seed: int, device: torch.device | str) -> torch.Tensor:
    """[batch, seq] int64 token ids uniform in [1, vocab) (never 0), seeded and device independent."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=gen).to(device)


def make_run(group: Group, spec: VariantSpec, model: nn.Module, *, keep_ratio: float | None, omit: float,
             seed: int) -> Run:
    device = next(model.parameters()).device
    ids = make_batch(model.config.vocab_size, group.batch, group.seq, seed=seed, device=device)
    keep = None if keep_ratio is None else random_keep_mask(group.batch, group.seq, keep_ratio, seed=seed,
                                                            device=device)
    return Run(model=model, input_ids=ids, labels=ids, keep=keep, keep_ratio=keep_ratio, omit=omit, seed=seed)


def make_optimizer(model: nn.Module, *, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused on CUDA (foreach elsewhere), falling back to the default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = params[0].is_cuda
    attempts = [("fused", {"fused": True})] if on_cuda else []
    attempts += [("foreach", {"foreach": True}), ("default", {})]
    for kind, kwargs in attempts:
        try:
            return torch.optim.AdamW(params, lr=lr, **kwargs), f"AdamW({kind})"
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("could not build AdamW")


# --------------------------------------------------------------------------------------------------------
# Clocks, memory, statistics
# --------------------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a CUDA device, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (call after ``sync``)."""
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1e3


class Memory:
    """CUDA allocator statistics (all None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device)) if self.cuda else None

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


def free_memory(device: torch.device) -> None:
    """Collect garbage and empty the CUDA cache (on the CPU nothing: a full gc pass costs ~0.2-2 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _gib(x: int | None) -> float | None:
    return None if x is None else x / GIB


# --------------------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------------------


def time_steps(variant: Variant, run: Run, optimizer: torch.optim.Optimizer, *, reps: int, warmup: int,
               clock: Clock, memory: Memory, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Run ``warmup + reps`` steps; per-piece times (ms) and memory of the measured ones. ``autocast``: the
    forwards run under ``torch.autocast`` of that dtype (the backward outside it, as in training)."""
    pieces: dict[str, list[float]] = {"fwd": [], "bwd": [], "opt": [], "step": []}
    before_b, peak_b, peak_full_b = [], [], []
    loss_value = float("nan")
    device_type = clock.device.type

    def autocasting() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext()

    for i in range(warmup + reps):
        optimizer.zero_grad(set_to_none=True)
        memory.reset_peak()
        before = memory.allocated()
        t0 = clock.mark()
        with autocasting():
            loss = variant.forward(run)
        t_fwd = t_bwd = clock.mark()
        peak_fwd = None
        if variant.separate_backward_graph:  # untimed: drop the forward's graph, build the backward's
            del loss
            peak_fwd = memory.peak()
            memory.reset_peak()
            before = memory.allocated()
            with autocasting():
                loss = variant.backward_graph(run)
            t_bwd = clock.mark()
        variant.backward(run, loss)
        t2 = clock.mark()
        last_loss = loss.detach()
        del loss
        optimizer.step()
        t3 = clock.mark()
        clock.sync()
        if i < warmup:
            continue
        fwd, bwd, opt = clock.ms(t0, t_fwd), clock.ms(t_bwd, t2), clock.ms(t2, t3)
        for key, value in (("fwd", fwd), ("bwd", bwd), ("opt", opt), ("step", fwd + bwd + opt)):
            pieces[key].append(value)
        peak = memory.peak()
        if peak is not None:
            before_b.append(before)
            peak_b.append(peak)
            peak_full_b.append(max(peak, peak_fwd or 0))
        loss_value = float(last_loss)
    out: dict[str, Any] = {}
    for key, values in pieces.items():
        out[f"{key}_ms"] = quantile(values, 0.5)
        out[f"{key}_ms_p20"] = quantile(values, 0.2)
        out[f"{key}_ms_p80"] = quantile(values, 0.8)
    if peak_b:
        out["mem_before_gib"] = _gib(max(before_b))
        out["peak_mem_gib"] = _gib(max(peak_b))
        out["act_mem_gib"] = _gib(max(p - b for p, b in zip(peak_b, before_b, strict=True)))
        out["peak_full_gib"] = _gib(max(peak_full_b))
    out["loss"] = loss_value
    return out


def measure(spec: VariantSpec, run: Run, *, opts: BenchOptions, device: torch.device,
            device_name: str) -> dict[str, Any]:
    """Prepare the variant, time it, count FLOPs if asked, clean up. Returns the result fields."""
    variant = spec.instantiate()
    clock, memory = Clock(device), Memory(device)
    spec.enable(run, variant)
    try:
        optimizer, opt_kind = make_optimizer(run.model, lr=opts.lr)
        variant.setup_optimizer(run, optimizer)
        out = time_steps(variant, run, optimizer, reps=opts.reps, warmup=opts.warmup, clock=clock,
                         memory=memory, autocast=precision(opts.dtype)[1])
        out["optimizer"] = opt_kind
        del optimizer
        work = variant.work(run)
        out["model_tflop"] = work.total / 1e12
        step_s = out["step_ms"] / 1e3
        out["tokens_per_s"] = run.batch * run.seq / step_s
        peak = peak_tflops(device_name, opts.peak_tflops)
        out["mfu"] = work.total / step_s / (peak * 1e12) if peak else None
        if opts.count_flops:
            run.model.zero_grad(set_to_none=True)
            graph = (lambda: variant.backward_graph(run)) if variant.separate_backward_graph else None
            counted = count_flops(lambda: variant.forward(run), lambda loss: variant.backward(run, loss),
                                  graph)
            out.update(counted.as_dict())
        return out
    finally:
        try:
            spec.disable(run, variant)
        finally:
            run.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


def compositions(specs: list[VariantSpec]) -> dict[str, str]:
    """What each variant and modifier in ``specs`` measures and how (printed before the table, saved in
    the JSON): one entry per base variant, then one per modifier ("+ckpt")."""
    out: dict[str, str] = {}
    for spec in specs:
        cls = spec.cls
        if cls.name not in out:
            extra = "" if cls.composition == Variant.composition else f" — {cls.composition}"
            out[cls.name] = f"{cls.help}{extra}"
    for spec in specs:
        for mod in spec.modifiers:
            out.setdefault(f"+{mod}", MODIFIERS[mod].help)
    return out


def run_bench(opts: BenchOptions, *, on_row: Callable[[list[dict[str, Any]]], None] | None = None,
              say: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    """Run every group × variant × keep; returns result rows (report order). ``on_row(rows)`` is called
    after each measurement (to save partial results)."""
    device = torch.device(opts.device)
    dtype = precision(opts.dtype)[0]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    entries: list[tuple[tuple[int, int, float], dict[str, Any]]] = []  # (report order, row)

    def ordered() -> list[dict[str, Any]]:
        return [row for _, row in sorted(entries, key=lambda e: e[0])]

    cached_key, model = None, None
    for g_index, group in enumerate(opts.groups()):
        say(f"== {group.title} ==")
        cases: list[tuple[tuple, int, VariantSpec, float | None]] = []
        for v_index, spec in enumerate(opts.variants):
            key = (group.preset, group.layers, tuple(sorted(model_overrides(group, spec, opts.omit).items())))
            keeps = sorted(opts.keeps) if spec.cls.uses_keep else [None]
            cases.extend((key, v_index, spec, k) for k in keeps)
        key_order = list(dict.fromkeys(c[0] for c in cases))
        cases.sort(key=lambda c: key_order.index(c[0]))  # stable: variants of one shape run together
        for key, v_index, spec, keep in cases:
            row: dict[str, Any] = {
                "preset": group.preset, "layers": group.layers, "batch": group.batch, "seq": group.seq,
                "tokens": group.tokens, "variant": spec.label, "base": spec.base,
                "modifiers": "+".join(spec.modifiers), "keep": keep, "omit": opts.omit, "dtype": opts.dtype,
                "reps": opts.reps, "warmup": opts.warmup, "status": "ok", "note": "",
            }
            entries.append(((g_index, v_index, -1.0 if keep is None else keep), row))
            why = spec.cls.unavailable() or (
                "needs CUDA (Triton kernels)" if spec.cls.needs_cuda and device.type != "cuda" else None)
            if why:
                row["status"] = f"unavailable: {why}"
                say(f"  {spec.label}: skipped ({why})")
                continue
            if opts.time_limit is not None and time.perf_counter() - started > opts.time_limit:
                row["status"] = "skipped: time limit"
                say(f"  {spec.label}: skipped (time limit {opts.time_limit:g} s reached)")
                continue
            try:
                if key != cached_key:
                    model, cached_key = None, None
                    free_memory(device)
                    t = time.perf_counter()
                    model = build_group_model(group, spec, omit=opts.omit, device=device, dtype=dtype,
                                              seed=opts.seed)
                    cached_key = key
                    say(f"  built {spec.label} model: {linear_params(model) / 1e6:.1f}M linear weights "
                        f"in {time.perf_counter() - t:.1f} s")
                row["n_params"] = sum(p.numel() for p in model.parameters())
                row["n_linear_params"] = linear_params(model)
                cfg = model.config
                row["shape"] = (f"h{cfg.hidden_size} i{cfg.intermediate_size} L{cfg.num_hidden_layers} "
                                f"heads{cfg.num_attention_heads}/{cfg.num_key_value_heads}")
                run = make_run(group, spec, model, keep_ratio=keep, omit=opts.omit, seed=opts.seed)
                if key[2]:  # a model of its own shape
                    run.notes.append(f"{spec.label}: {row['shape']}")
                row.update(measure(spec, run, opts=opts, device=device, device_name=device_name))
                row["note"] = "; ".join(run.notes)
                del run
                say(_progress(row))
            except Exception as err:  # keep going: one OOM or broken variant must not lose the others
                oom = isinstance(err, torch.cuda.OutOfMemoryError | MemoryError)
                row["status"] = "oom" if oom else f"error: {type(err).__name__}: {err}"[:300]
                say(f"  {spec.label}{_keep_txt(keep)}: {row['status']}")
                if not oom:
                    traceback.print_exc(file=sys.stderr)
            finally:
                free_memory(device)
                if on_row is not None:
                    on_row(ordered())
    model = None
    free_memory(device)
    return ordered()


def _keep_txt(keep: float | None) -> str:
    return "" if keep is None else f" κ={keep:g}"


def _progress(row: dict[str, Any]) -> str:
    mem = f", peak {row['peak_mem_gib']:.2f} GiB" if row.get("peak_mem_gib") is not None else ""
    return (f"  {row['variant']}{_keep_txt(row['keep'])}: fwd {row['fwd_ms']:.2f} ms, "
            f"bwd {row['bwd_ms']:.2f} ms, opt {row['opt_ms']:.2f} ms, step {row['step_ms']:.2f} ms{mem}")
