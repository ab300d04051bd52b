"""`bash benchmarks/multi_gpu.sh OUT --smoke`: the whole multi-GPU script path on the CPU (gloo, torchrun with
1 and 2 processes, tiny preset): every throughput run finishes, the report files are written, the FSDP2
gradient check on 2 ranks matches the one-process gradients for dense, tokens (mask before and after the
forward) and tokens + neurons, and the profiled runs give a per-rank summary of their collectives. The
summary's interval arithmetic (exposed = collective time not overlapped by compute) is checked on a
synthetic CUDA trace."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_multi_gpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "multi_gpu.sh"), str(out), "--smoke"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    files = set(os.listdir(out))
    assert {"results.json", "results.csv", "table.txt", "log.txt"} <= files and len(files) <= 8, files
    table = (out / "table.txt").read_text()
    assert done.stdout.endswith(table)  # the table is printed last

    report = json.loads((out / "results.json").read_text())
    runs = {(r["arm"], r["n"]): r for r in report["runs"]}
    assert set(runs) == {(arm, n) for arm in ("dense", "tokens", "tokens+neurons") for n in (1, 2)}
    for (arm, n), r in runs.items():
        assert r["status"] == "ok", (arm, n, r["status"])
        assert r["tokens_per_s"] > 0 and r["steps"] == 4
        assert r["strategy"] == ("none (one process)" if n == 1 else "fsdp2")
        assert r["step_x_dense"] == pytest.approx(runs["dense", n]["tokens_per_s"] / r["tokens_per_s"])
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s"] / (n * runs[arm, 1]["tokens_per_s"]))
        assert r["tokens_per_step"] == 2 * n * 64  # 2 sequences of 64 tokens per rank

    assert report["gradcheck"]["passed"] is True
    (grad,) = report["gradcheck"]["checks"]  # N = 2 is also the largest N here
    assert grad["status"] == "ok" and grad["n"] == 2 and grad["backend"] == "gloo"
    assert grad["passed"] is True
    for case in ("dense", "tokens", "tokens_after", "tokens+neurons"):
        c = grad["cases"][case]
        assert c["passed"] and c["in_verdict"] and c["counted"] == c["ref_counted"]
        assert c["max_rel_err"] < 1e-4 and c["min_cos"] > 0.9999  # fp32 on the CPU: far inside the bf16 bound
    assert grad["cases"]["tokens"]["counted"] < grad["cases"]["dense"]["counted"]
    assert grad["contrast_dense_vs_tokens_rel_err"] > 0.1  # the compared gradients could have differed
    assert "gradient check verdict: PASS" in table

    profiles = {(p["arm"], p["n"]): p for p in report["profiles"]}
    assert set(profiles) == {("tokens", 2)}  # --smoke profiles the tokens arm only
    for p in profiles.values():
        assert p["status"] == "ok" and [r["rank"] for r in p["ranks"]] == [0, 1]
        for r in p["ranks"]:
            assert r["error"] is None and r["device"] == "cpu" and r["steps"] == 3
            # FSDP2 all-gathers weights and reduce-scatters gradients; the step all-reduces its sums
            assert {"all_gather", "reduce_scatter", "all_reduce"} <= set(r["collectives"]), r["collectives"]
    assert "profiler (per step" in table

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if not r["arm"].startswith("gradcheck:")]) == 6
    assert {r["status"] for r in rows if r["arm"].startswith("gradcheck:")} == {"PASS"}


def test_trace_summary_exposed_collectives():
    """Kernels on a synthetic CUDA trace (µs): compute 0-100 and 150-200; an all-gather 90-130 (10 hidden,
    30 exposed); a reduce-scatter 160-190 (hidden); an all-reduce 210-220 (exposed); one blocking sync."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from multi_gpu import collective_kind, trace_summary
    finally:
        sys.path.pop(0)

    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [kernel("ampere_bf16_gemm", 0, 100), kernel("flash_bwd", 150, 50),
              kernel("ncclDevKernel_AllGather_RING_LL", 90, 40), kernel("ncclDevKernel_ReduceScatter_Sum_f32", 160, 30),
              kernel("ncclDevKernel_AllReduce_Sum_f64_RING_LL", 210, 10),
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 200, "dur": 20},
              {"ph": "X", "cat": "cpu_op", "name": "c10d::allreduce_", "ts": 205, "dur": 1}]
    s = trace_summary(events, steps=2)  # per step: every time halved
    assert s["device"] == "cuda"
    assert s["window_ms"] == pytest.approx(0.110) and s["busy_ms"] == pytest.approx(0.095)
    assert s["idle_ms"] == pytest.approx(0.015) and s["compute_ms"] == pytest.approx(0.075)
    c = s["collectives"]
    assert c["all_gather"] == {"count": 0.5, "ms": pytest.approx(0.020), "exposed_ms": pytest.approx(0.015)}
    assert c["reduce_scatter"]["exposed_ms"] == pytest.approx(0.0)
    assert c["all_reduce"]["exposed_ms"] == pytest.approx(0.005)
    assert s["host_sync_ms"] == pytest.approx(0.010) and "broadcast" not in c
    assert [collective_kind(n) for n in ("c10d::_allgather_base_", "gloo:all_reduce", "c10d::_reduce_scatter_base_",
                                         "aten::mm")] == ["all_gather", "all_reduce", "reduce_scatter", None]
