"""Host time of one call: torch.compile-d element-wise functions vs a Triton launch vs plain torch ops.

Why: the token-sparse step with omission waits on the host, and the element-wise pieces of a layer are called
11 times per layer and step. Tiny CUDA tensors (GPU time negligible); the host loop is timed (median-free:
mean over ``n`` calls after warm-up; the GPU is synchronised only around the loop).

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/gpu_call_overhead.py
"""

from __future__ import annotations

import time

import torch

from centrifuge.ops import elementwise_triton
from centrifuge.ops.elementwise import _compiled, rms_norm, swiglu


def bench(name, fn, n=3000) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"{name:40s} {(t1 - t) / n * 1e6:7.1f} us/call host", flush=True)


def main() -> None:
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__)
    x = torch.randn(512, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(256, device=dev, dtype=torch.bfloat16)
    g = torch.randn(512, 704, device=dev, dtype=torch.bfloat16)
    xs = [torch.randn(r, 256, device=dev, dtype=torch.bfloat16) for r in (512, 300, 260)]
    with torch.no_grad():
        f, s = _compiled(rms_norm), _compiled(swiglu)  # dynamic=True, as the layer used them
        bench("compiled (dynamic) rms_norm", lambda: f(x, w, 1e-5))
        bench("compiled (dynamic) swiglu", lambda: s(g, g))
        fa = torch.compile(rms_norm, dynamic=None, fullgraph=True)  # automatic dynamic after 3 row counts
        for t in xs:
            fa(t, w, 1e-5)
        bench("compiled (automatic dynamic) rms_norm", lambda: fa(xs[1], w, 1e-5))
        fs = torch.compile(rms_norm, dynamic=False, fullgraph=True)
        bench("compiled (static) rms_norm", lambda: fs(x, w, 1e-5))
        bench("eager rms_norm (8 ops)", lambda: rms_norm(x, w, 1e-5))
        bench("one torch add", lambda: torch.add(x, x))
        bench("Triton rms_norm (ops.elementwise_triton)", lambda: elementwise_triton.rms_norm(x, w, 1e-5))
        bench("Triton swiglu (ops.elementwise_triton)", lambda: elementwise_triton.swiglu(g, g))


if __name__ == "__main__":
    main()
