"""The start-up banner's set-up and speed lines: what runs where, and whether the sparse paths pay off here.

Token filtering and neuron omission save work in large GEMMs and attention; on a CPU, or with a model small
enough that a GPU step is bound by kernel launches, their extra bookkeeping costs more than it saves, so every
sparse setting is *slower* per step than dense there. The banner says so, with a number measured on the spot
where that is cheap: on the CPU, token-sparse and dense forwards + backwards of the run's first batch
on a copy of the model (``probe_token_sparse``; a fraction of a second to a few seconds, nothing of the run
is touched: own model copy, forked RNG). On a GPU it cites the committed measurement of a small model
instead of probing (``experiments/utility/results/2026-11-24-h100``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Below this many parameters a GPU step is launch-bound: the 26M-parameter model of the utility study was slower
# per step with every sparse setting on an H100 (dense 25 ms; token filtering 52-59 ms; LORS 43.5 ms).
SMALL_MODEL_PARAMS = 100_000_000
UTILITY_RESULTS = "experiments/utility/results/2026-11-24-h100"


@dataclass
class ProbeResult:
    """Seconds of one forward + backward, dense and token-sparse, on the same batch (the fastest of the repeats)."""

    dense_s: float
    sparse_s: float
    keep_ratio: float

    @property
    def ratio(self) -> float:
        return self.sparse_s / self.dense_s


def token_filtering_on(config) -> bool:
    """Whether the ``tokens`` section turns token filtering on (as ``token_filter_plugin`` decides)."""
    t = config.tokens
    return not (t.keep_ratio >= 1.0 and t.selector != "label_mask" and t.schedule == "constant")


def probe_token_sparse(model: nn.Module, batch: dict[str, torch.Tensor], *, keep_ratio: float, mode: str = "fast",
                       attention: str = "auto", repeats: int = 3) -> ProbeResult:
    """Time forward + backward of a copy of ``model`` dense and with a random keep mask of ``keep_ratio``
    (known before the forward), alternating, ``repeats`` times after one warm-up each; the fastest of each
    (the least disturbed by other processes).

    The copy is patched (``centrifuge.apply``) and dropped; the global RNG is forked, so the run is unchanged."""
    import centrifuge

    probe = copy.deepcopy(model)
    probe.train()
    centrifuge.apply(probe, mode=mode, attention=attention, compile=False)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids") if k in batch}
    gen = torch.Generator().manual_seed(0)
    keep = (torch.rand(inputs["input_ids"].shape, generator=gen) < keep_ratio).to(inputs["input_ids"].device)

    def step(sparse: bool) -> float:
        tic = time.perf_counter()
        out = probe(**inputs, keep_mask=keep) if sparse else probe(**inputs)
        out.loss.backward()
        probe.zero_grad(set_to_none=True)
        return time.perf_counter() - tic

    with torch.random.fork_rng(devices=[]):
        step(False), step(True)  # warm-up
        dense, sparse = [], []
        for _ in range(repeats):
            dense.append(step(False))
            sparse.append(step(True))
    return ProbeResult(min(dense), min(sparse), keep_ratio)


def setup_line(config, device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    """``device cpu (2 threads), fp32 | attention backend ... | reference scores ...``."""
    where = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    precision = "bf16 autocast" if autocast_dtype is not None else "fp32"
    parts = [f"device: {where}, {precision}" + (", Liger-Kernel (model.liger)" if config.model.liger else "")]
    t = config.tokens
    if token_filtering_on(config):
        if t.attention != "auto":
            backend = t.attention
        elif device.type == "cpu":
            backend = "auto = math on the CPU"
        else:
            backend = "auto = fused Triton kernels where they apply, else SDPA / flash"
        parts.append(f"attention backward: {backend}")
        # The config has checked that reference losses are given exactly when the selector uses them.
        reference = t.reference_scores or (f"online model {t.reference_model}" if t.reference_model else None)
        parts.append(f"reference scores: {reference or 'none'}")
    return " | ".join(parts)


def speed_lines(config, device: torch.device, params: int, probe: ProbeResult | None) -> list[str]:
    """Where the sparse paths are slower per step than dense, say so (measured, or the committed result)."""
    tokens_on, neurons_on = token_filtering_on(config), config.neurons.enabled
    if not (tokens_on or neurons_on):
        return []
    if device.type == "cpu":
        lines = []
        if probe is not None:
            measured = (f"(measured just now on one batch at keep ratio {probe.keep_ratio:g}: "
                        f"{1000 * probe.sparse_s:.0f} vs {1000 * probe.dense_s:.0f} ms; one measurement, a busy CPU "
                        "makes it vary)")
            lines.append(f"speed: on this CPU a token-sparse forward + backward is slower than dense: "
                         f"{probe.ratio:.2f}x the dense time {measured}" if probe.ratio > 1.0 else
                         f"speed: a token-sparse forward + backward took {probe.ratio:.2f}x the dense time {measured}")
        if neurons_on:
            lines.append("speed: neuron omission is slower per step than dense for small models (a 26M-parameter "
                         f"model on an H100: 1.74x the dense step time; {UTILITY_RESULTS})")
        lines.append("speed: the README's speed-ups are measured on GPUs with ~1B-parameter models; on a CPU and at "
                     "this size the sparse settings are about as fast as dense or slower: compare runs by loss per "
                     "step or per token (centrifuge plot), not by time")
        return lines
    if params < SMALL_MODEL_PARAMS:
        return [f"speed: a {params / 1e6:.0f}M-parameter model is too small to profit on a GPU (launch-bound): a "
                f"26M model on an H100 was slower per step with every sparse setting (dense 25 ms, token filtering "
                f"52-59 ms, LORS 43.5 ms; {UTILITY_RESULTS})"]
    return []


def maybe_probe(config, model: nn.Module, batch_fn: Callable[[], dict[str, torch.Tensor]], device: torch.device,
                *, distributed: bool) -> ProbeResult | None:
    """The CPU probe when token filtering is on in a one-process CPU run (else None; never fails the run)."""
    t = config.tokens
    if device.type != "cpu" or distributed or not token_filtering_on(config) or t.selector in ("label_mask",
                                                                                               "threshold"):
        return None
    try:
        return probe_token_sparse(model, batch_fn(), keep_ratio=t.keep_ratio, mode=t.mode, attention=t.attention)
    except Exception:  # a probe that cannot run (e.g. a model family the fast path lacks) is left out
        return None
