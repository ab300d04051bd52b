"""`bash benchmarks/multi_gpu.sh OUT --smoke`: the whole multi-GPU script path on the CPU (gloo, torchrun with
1 and 2 processes, tiny preset): every throughput run finishes, the report files are written, and the FSDP2
gradient check on 2 ranks matches the one-process gradients."""

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
        assert r["strategy"] == ("none (one process)" if n == 1 else "ddp" if arm == "tokens+neurons" else "fsdp2")
        assert r["step_x_dense"] == pytest.approx(runs["dense", n]["tokens_per_s"] / r["tokens_per_s"])
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s"] / (n * runs[arm, 1]["tokens_per_s"]))
        assert r["tokens_per_step"] == 2 * n * 64  # 2 sequences of 64 tokens per rank

    grad = report["gradcheck"]
    assert grad["status"] == "ok" and grad["n"] == 2 and grad["backend"] == "gloo"
    assert grad["passed"] is True
    for case in ("dense", "tokens"):
        c = grad["cases"][case]
        assert c["passed"] and c["counted"] == c["ref_counted"]
        assert c["max_rel_err"] < 1e-4 and c["min_cos"] > 0.9999  # fp32 on the CPU: far inside the bf16 bound
    assert grad["cases"]["tokens"]["counted"] < grad["cases"]["dense"]["counted"]
    assert grad["contrast_dense_vs_tokens_rel_err"] > 0.1  # the compared gradients could have differed
    assert "verdict: PASS" in table

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if not r["arm"].startswith("gradcheck:")]) == 6
    assert {r["status"] for r in rows if r["arm"].startswith("gradcheck:")} == {"PASS"}
