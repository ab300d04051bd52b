"""`centrifuge bench` through the real CLI entry on the CPU (tiny presets, 1-2 repetitions, no timing asserts)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from centrifuge.cli.main import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["bench", *argv])
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU smoke run shared by the tests below: returns (rc, stdout, out_dir)."""
    out = tmp_path_factory.mktemp("smoke")
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--batch", "2", "--seq", "64", "--reps", "2",
            "--warmup", "1", "--keep", "0.25", "0.5", "--count-flops", "--out", str(out), "--variants",
            "dense,loss_only,ideal,narrow,narrow_heads,dense+ckpt,ideal+ckpt"]
    buf = io.StringIO()  # capsys is function scoped: capture by hand
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue(), out


def test_smoke_writes_all_files(smoke):
    rc, _, out = smoke
    assert rc == 0
    for name in ("results.json", "results.csv", "table.txt", "bench.png", "bench_secondary.png"):
        assert (out / name).is_file(), name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out.iterdir())) == 5  # the GPU machine returns at most 8 files per command


def test_smoke_json_records_environment_and_config(smoke):
    _, _, out = smoke
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    for key in ("device_name", "torch", "transformers", "triton", "git_commit", "source_sha256", "python"):
        assert key in env
    assert data["command"].startswith("centrifuge bench --preset tiny --batch 2 --seq 64")
    assert "--variants dense,loss_only,ideal,narrow,narrow_heads,dense+ckpt,ideal+ckpt" in data["command"]
    assert data["config"]["reps"] == 2 and data["config"]["keeps"] == [0.25, 0.5]
    assert data["config"]["groups"] == [{"preset": "tiny", "layers": None, "batch": 2, "seq": 64}]
    assert "ideal" in data["compositions"] and "+ckpt" in data["compositions"]
    rows = data["results"]
    # dense, narrow, narrow_heads, dense+ckpt once; loss_only, ideal, ideal+ckpt per keep ratio
    assert [(r["variant"], r["keep"]) for r in rows] == [
        ("dense", None), ("loss_only", 0.25), ("loss_only", 0.5), ("ideal", 0.25), ("ideal", 0.5),
        ("narrow", None), ("narrow_heads", None), ("dense+ckpt", None), ("ideal+ckpt", 0.25),
        ("ideal+ckpt", 0.5)]
    assert all(r["status"] == "ok" for r in rows)
    by = {(r["variant"], r["keep"]): r for r in rows}
    assert by[("dense", None)]["ratio_step_ms"] == pytest.approx(1.0)
    assert by[("ideal+ckpt", 0.5)]["baseline"] == "dense+ckpt"
    assert by[("dense+ckpt", None)]["baseline"] == "dense"
    for r in rows:
        assert r["step_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"] + r["opt_ms"], rel=0.2)
        assert r["fwd_ms_p20"] <= r["fwd_ms"] <= r["fwd_ms_p80"]
        assert r["tokens_per_s"] > 0 and r["model_tflop"] > 0
        assert r["mfu"] is None  # no peak known for a CPU
        assert r["flops_fwd"] > 0 and r["flops_bwd"] > 0
    # the ideal's backward runs on κ·B sequences (κ = 0.5) or B sequences of κ·T tokens (κ·B = 0.5)
    assert "backward on 1×64" in by[("ideal", 0.5)]["note"]
    assert "B sequences of κ·T = 16 tokens" in by[("ideal", 0.25)]["note"]
    assert by[("ideal", 0.5)]["flops_bwd"] == by[("dense", None)]["flops_bwd"] // 2
    assert by[("narrow", None)]["flops_fwd_mlp"] == by[("dense", None)]["flops_fwd_mlp"] // 2


def test_smoke_csv_matches_json(smoke):
    _, _, out = smoke
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    assert {"variant", "keep", "step_ms", "step_ms_p20", "ratio_step_ms", "peak_mem_gib", "mfu",
            "flops_bwd"} <= set(rows[0])
    assert rows[0]["variant"] == "dense" and float(rows[0]["ratio_bwd_ms"]) == pytest.approx(1.0)


def test_smoke_prints_the_ratio_table_last(smoke):
    _, stdout, out = smoke
    table = (out / "table.txt").read_text().strip()
    assert stdout.rstrip().endswith(table)
    last = stdout.rstrip().splitlines()
    header = next(i for i, line in enumerate(last) if line.startswith("variant "))
    assert last[header - 1].startswith("== tiny, 2×64 tokens")
    for name in ("fwd ms", "bwd ms", "step ms", "opt ms", "peak GiB", "act GiB", "tokens/s", "MFU"):
        assert name in last[header]
    body = last[header + 1:]
    assert [line.split()[0] for line in body] == ["dense", "loss_only", "loss_only", "ideal", "ideal", "narrow",
                                                  "narrow_heads", "dense+ckpt", "ideal+ckpt", "ideal+ckpt"]
    assert body[0].split()[3:5][1] == "1.000"  # dense: variant, κ, vs, fwd ms, fwd ratio
    assert "How each variant is measured" in stdout and "κ·B" in stdout


def test_sweep_presets_and_sequences_with_constant_tokens(tmp_path, capsys):
    rc, stdout = _run(capsys, "--preset", "tiny", "qwen2-tiny", "--device", "cpu", "--seq", "32", "64",
                      "--tokens", "128", "--keep", "0.5", "--variants", "dense,ideal", "--reps", "1",
                      "--warmup", "0", "--out", str(tmp_path), "--no-plot")
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    groups = [(r["preset"], r["batch"], r["seq"]) for r in rows if r["variant"] == "dense"]
    assert groups == [("tiny", 4, 32), ("tiny", 2, 64), ("qwen2-tiny", 4, 32), ("qwen2-tiny", 2, 64)]
    assert all(r["tokens"] == 128 and r["status"] == "ok" for r in rows)
    assert not (tmp_path / "bench.png").exists()
    assert stdout.count("== tiny, 4×32 tokens") == 2  # progress header and table header
    assert "== qwen2-tiny, 2×64 tokens" in stdout


def test_several_seqs_without_tokens_keep_tokens_constant(tmp_path, capsys):
    rc, stdout = _run(capsys, "--device", "cpu", "--batch", "2", "--seq", "32", "64", "--variants", "dense",
                      "--reps", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plot")
    assert rc == 0 and "64 tokens per step" in stdout
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["batch"], r["seq"]) for r in rows] == [(2, 32), (1, 64)]


def test_list_replot_and_bad_arguments(smoke, tmp_path, capsys):
    rc, stdout = _run(capsys, "--list")
    assert rc == 0 and "ideal" in stdout and "+ckpt" in stdout and "tinyllama-1.1b" in stdout
    _, _, out = smoke
    rc, stdout = _run(capsys, "--replot", str(out), "--out", str(tmp_path))
    assert rc == 0
    assert (tmp_path / "bench.png").is_file() and (tmp_path / "table.txt").is_file()
    assert stdout.rstrip().endswith((tmp_path / "table.txt").read_text().strip())
    assert _run(capsys, "--device", "cpu", "--variants", "dense,nope")[0] == 2
    assert _run(capsys, "--device", "cpu", "--keep", "0")[0] == 2
    assert _run(capsys, "--device", "cpu", "--preset", "gpt5")[0] == 2
    assert _run(capsys, "--device", "cpu", "--seq", "64", "--tokens", "32")[0] == 2
    assert _run(capsys, "--device", "cpu", "--layers", "many")[0] == 2
