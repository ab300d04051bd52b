"""Ratio table, baselines, CSV/JSON and the plot, from hand-made result rows (no model runs)."""

from __future__ import annotations

import pytest

from centrifuge.bench import report
from centrifuge.bench.harness import quantile


def _row(variant: str, keep: float | None, step: float, *, seq: int = 2048, peak: float | None = 30.0,
         status: str = "ok") -> dict:
    base, *mods = variant.split("+")
    row = {"preset": "tinyllama-1.1b", "layers": None, "batch": 8, "seq": seq, "tokens": 8 * seq,
           "variant": variant, "base": base, "modifiers": "+".join(mods), "keep": keep, "status": status,
           "note": "", "shape": "h2048 i5632 L22 heads32/4"}
    if status == "ok":
        row.update(fwd_ms=step / 3, bwd_ms=2 * step / 3 - 10, opt_ms=10.0, step_ms=step,
                   mem_before_gib=8.0 if peak else None, peak_mem_gib=peak,
                   act_mem_gib=None if peak is None else peak - 8.0, tokens_per_s=8 * seq / (step / 1e3),
                   mfu=0.4 * 300 / step)
    return row


@pytest.fixture
def rows():
    return [
        _row("dense", None, 300.0, peak=37.5),
        _row("loss_only", 0.5, 297.0, peak=37.4),
        _row("ideal", 0.2, 150.0, peak=15.0),
        _row("ideal", 0.5, 200.0, peak=24.0),
        _row("narrow", None, 243.0, peak=33.0),
        _row("dense+ckpt", None, 378.0, peak=9.6),
        _row("ideal+ckpt", 0.5, 240.0, peak=7.0),
        _row("centrifuge", 0.5, 0.0, status="oom"),
        _row("dense", None, 500.0, seq=4096, peak=40.0),
        _row("ideal", 0.5, 330.0, seq=4096, peak=26.0),
    ]


def test_ratios_and_baselines(rows):
    report.add_ratios(rows)
    by = {(r["variant"], r["keep"], r["seq"]): r for r in rows}
    assert by[("dense", None, 2048)]["ratio_step_ms"] == 1.0
    assert by[("ideal", 0.5, 2048)]["ratio_step_ms"] == pytest.approx(200 / 300)
    assert by[("ideal", 0.5, 2048)]["ratio_peak_mem_gib"] == pytest.approx(24 / 37.5)
    assert by[("ideal", 0.5, 4096)]["ratio_step_ms"] == pytest.approx(330 / 500)  # its own group's dense
    assert by[("dense+ckpt", None, 2048)]["baseline"] == "dense"
    assert by[("dense+ckpt", None, 2048)]["ratio_step_ms"] == pytest.approx(1.26)
    assert by[("ideal+ckpt", 0.5, 2048)]["baseline"] == "dense+ckpt"
    assert by[("ideal+ckpt", 0.5, 2048)]["ratio_step_ms"] == pytest.approx(240 / 378)
    assert by[("centrifuge", 0.5, 2048)]["baseline"] is None
    assert by[("ideal", 0.5, 2048)]["ratio_tokens_per_s"] == pytest.approx(300 / 200)


def test_table_contents(rows):
    report.add_ratios(rows)
    text = report.format_table(rows, {"compositions": {"ideal": "fwd(B) + bwd(κB)"}})
    lines = text.splitlines()
    assert "  ideal: fwd(B) + bwd(κB)" in lines
    assert lines.count("== tinyllama-1.1b, 8×2048 tokens [h2048 i5632 L22 heads32/4] ==") == 1
    assert any(line.startswith("== tinyllama-1.1b, 8×4096 tokens") for line in lines)
    ideal = next(line for line in lines if line.startswith("ideal ") and " 0.5 " in line)
    assert "200.0" in ideal and "0.667" in ideal and "24.00" in ideal and "0.640" in ideal
    oom = next(line for line in lines if line.startswith("centrifuge"))
    assert oom.rstrip().endswith("oom")
    ckpt = next(line for line in lines if line.startswith("ideal+ckpt"))
    assert "dense+ckpt" in ckpt and "0.635" in ckpt
    header = next(line for line in lines if line.startswith("variant"))
    assert header.split()[:3] == ["variant", "κ", "vs"]


def test_files_roundtrip_and_plot(rows, tmp_path):
    meta = {"command": "centrifuge bench", "environment": {"device_name": "NVIDIA H100 80GB HBM3"},
            "config": {"dtype": "bf16", "reps": 10, "warmup": 3}}
    paths = report.write_results(tmp_path, meta, rows)
    assert set(paths) == {"json", "csv", "table", "png"}
    meta2, rows2 = report.load_json(tmp_path)
    assert meta2["command"] == "centrifuge bench" and len(rows2) == len(rows)
    assert rows2[2]["ratio_step_ms"] == pytest.approx(0.5)
    assert "NVIDIA H100" in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["preset", "layers", "batch", "seq", "tokens", "variant"]


def test_quantile_matches_numpy_default():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert quantile(xs, 0.5) == 3.0
    assert quantile(xs, 0.2) == pytest.approx(1.8)
    assert quantile(xs, 0.8) == pytest.approx(4.2)
    assert quantile([7.0], 0.2) == 7.0


def test_environment_has_versions():
    env = report.environment("cpu")
    assert env["torch"] and env["transformers"] and len(env["source_sha256"]) == 16


def test_baseline_is_the_strongest_dense(tmp_path):
    """Ratios go to the fastest dense variant of the group (here dense_liger); × eager stays against dense."""
    rows = [_row("dense", None, 300.0, peak=40.0), _row("dense_compiled", None, 270.0, peak=32.0),
            _row("dense_liger", None, 220.0, peak=26.0), _row("centrifuge", 0.5, 165.0, peak=14.0),
            _row("centrifuge", 1.0, 230.0, peak=21.0)]
    report.add_ratios(rows)
    by = {(r["variant"], r["keep"]): r for r in rows}
    assert {r["baseline"] for r in rows} == {"dense_liger"}
    assert by[("centrifuge", 0.5)]["ratio_step_ms"] == pytest.approx(165 / 220)
    assert by[("centrifuge", 0.5)]["eager_ratio_step_ms"] == pytest.approx(165 / 300)
    assert by[("centrifuge", 0.5)]["liger_ratio_peak_mem_gib"] == pytest.approx(14 / 26)
    assert by[("dense", None)]["ratio_step_ms"] == pytest.approx(300 / 220)
    text = report.format_table(rows)
    assert "× eager" in text.splitlines()[-6]
    paths = report.write_results(tmp_path, {}, rows)
    assert paths["png"] == tmp_path / "bench.png" and (tmp_path / "bench_secondary.png").stat().st_size > 5_000
