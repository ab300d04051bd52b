"""The time-to-quality study end to end at toy size on the CPU: corpus -> tokenizer -> token cache ->
reference -> scores -> calibration -> every arm -> report -> packed results, then a second study that takes
the exported reference (what the next device call does).

No assertion says which arm wins: that is the study's result, not a property of the code (and a toy one)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `experiments` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from experiments.time_to_quality import run  # noqa: E402
from experiments.time_to_quality.profiles import ARMS, HEADLINE, PROFILES  # noqa: E402

TOY = PROFILES["cpu-toy"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ttq")
    out = root / "study"
    code = run.main(["--profile", "cpu-toy", "--out", str(out), "--arms", "all", "--device", "cpu",
                     "--calibrate", "centrifuge_k0.5", "--export-reference", str(root / "carry"),
                     "--pack", str(root / "results.tar.gz")])  # fmt: skip
    assert code == 0
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_arm_ran_its_calibrated_steps(study: Path):
    results = {(r["arm"], r["seed"]): r for r in map(_json, study.glob("runs/*/seed*/result.json"))}
    assert set(results) == {(arm, seed) for arm in ARMS for seed in ((0, 1) if arm in HEADLINE else (0,))}
    for (arm, _), r in results.items():
        cal = _json(study / "calibration" / f"{arm}.json")
        assert r["steps"] == cal["steps"] and TOY.min_steps <= r["steps"] <= TOY.max_steps
        assert r["budget_s"] == TOY.budget_s and r["calibrated_step_s"] == cal["step_s"] > 0
        steps = [p["step"] for p in r["curve"]]
        assert steps[0] == 0 and steps[-1] == r["steps"] and len(steps) >= 3  # eval at 0, every K, at the end
        assert all(math.isfinite(p["loss"]) for p in r["curve"]) and r["final_eval_loss"] == r["curve"][-1]["loss"]
        assert 0.0 <= r["nextline_exact_match"] <= 1.0 and r["nextline_prompts"] == TOY.corpus.nextline_prompts
        assert r["tokens_per_step"] == TOY.batch_size * TOY.seq_len
        assert any("data.token_cache=" in o for o in r["overrides"])
    assert results[("centrifuge_k0.5", 0)]["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert results[("neurons_lors", 0)]["omit_mean"] > 0
    lors = _json(study / "calibration" / "neurons_lors.json")
    assert set(lors["probes"]) == {"arm", "no_omission"} and 0 < lors["ladder_mean_rate"] < 0.5
    assert _json(study / "calibration" / "neurons_lors_eqsteps.json")["steps"] == _json(
        study / "calibration" / "dense.json")["steps"]  # fmt: skip
    assert not list(study.glob("runs/*/seed*/checkpoints")), "checkpoints are removed after each run"


def test_prepared_reference_scores_and_cache(study: Path):
    info = _json(study / "prepared" / "prepared.json")
    assert info["profile"] == "cpu-toy" and info["train_rows"] > 0 and info["scores_fingerprint"]
    assert info["corpus_fingerprint"] == _json(study / "prepared" / "corpus" / "manifest.json")["fingerprint"]
    assert (study / "prepared" / "reference" / "model" / "config.json").is_file()
    assert list((study / "prepared" / "token_cache").glob("*/meta.json"))  # the mixture, tokenized once


def test_report_files_and_verdicts(study: Path):
    report = study / "report"
    for name in ("results.csv", "results.json", "summary.md", "curves.png"):
        assert (report / name).is_file(), name
    with open(report / "results.csv", newline="") as f:
        rows = {row["arm"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(ARMS) and float(rows["dense"]["vs_dense_pct"]) == 0.0
    payload = _json(report / "results.json")
    assert len(payload["verdicts"]) == 9 and payload["failures"] == []
    assert all(c["verdict"] in ("yes", "no", "inconclusive") for c in payload["verdicts"])
    assert all(p["tokens"] == p["step"] * TOY.batch_size * TOY.seq_len for p in payload["curves"]["dense"])
    summary = (report / "summary.md").read_text()
    assert "0.75x dense's wall-clock" in summary and "below 0.7x dense's" in summary
    assert "LORS within 1% of dense at equal steps" in summary


def test_packed_results_hold_numbers_not_weights(study: Path):
    with tarfile.open(study.parent / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/dense/seed0/result.json" in names and "report/summary.md" in names
    assert "prepared/corpus/manifest.json" in names and "calibration/dense.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))]  # no weights, no token cache
    assert not [n for n in names if n.startswith("prepared/corpus/") and n.endswith(".jsonl")]  # no text


def test_next_call_takes_the_exported_reference(study: Path, tmp_path: Path):
    parts = sorted((study.parent / "carry").glob("reference.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    carry = tmp_path / "carry"
    shutil.copytree(study.parent / "carry", carry)
    (carry / "calibration").mkdir()
    calibration = {**_json(study / "calibration" / "dense.json"), "steps": 7}  # an earlier call's step count
    (carry / "calibration" / "dense.json").write_text(json.dumps(calibration))
    again = tmp_path / "again"
    code = run.main(["--profile", "cpu-toy", "--out", str(again), "--device", "cpu", "--runs", "dense:3",
                     "--reference-from", str(carry)])  # fmt: skip
    assert code == 0
    results = list(again.glob("runs/*/seed*/result.json"))
    assert [p.parent.name for p in results] == ["seed3"] and _json(results[0])["steps"] == 7
    first, second = _json(study / "prepared" / "prepared.json"), _json(again / "prepared" / "prepared.json")
    assert second["reference_carried_from"] == str(carry)
    assert second["corpus_fingerprint"] == first["corpus_fingerprint"]
    assert second["scores_fingerprint"] == first["scores_fingerprint"]  # the same reference scores


def test_a_recipe_arm_with_a_keep_ratio_ladder_to_dense(study: Path):
    """The recipes (issue 21, point 4) run by name only; a κ ladder that ends dense is calibrated at its start
    κ and at κ = 1 and interpolated at its mean κ, and the run's keep ratio follows the ladder."""
    from experiments.time_to_quality.profiles import RECIPES

    assert not set(RECIPES) & set(run.parse_args(["--out", "x", "--arms", "all"]).arms)
    assert run.parse_args(["--out", "x", "--arms", "centrifuge_k0.7"]).arms == ["centrifuge_k0.7"]
    code = run.main(["--profile", "cpu-toy", "--out", str(study), "--device", "cpu",
                     "--runs", "centrifuge_k0.5_to_dense:0"])  # fmt: skip
    assert code == 0
    cal = _json(study / "calibration" / "centrifuge_k0.5_to_dense.json")
    assert set(cal["probes"]) == {"arm", "dense_tokens"} and cal["mean_keep_ratio"] == pytest.approx(0.65625, abs=1e-3)
    t_start, t_dense = cal["probes"]["arm"]["median_s"], cal["probes"]["dense_tokens"]["median_s"]
    assert min(t_start, t_dense) <= cal["step_s"] <= max(t_start, t_dense)
    r = _json(study / "runs" / "centrifuge_k0.5_to_dense" / "seed0" / "result.json")
    assert r["steps"] == cal["steps"] and "tokens.schedule=ladder" in r["overrides"]
    config = (study / "runs" / "centrifuge_k0.5_to_dense" / "seed0" / "config.yaml").read_text()
    assert "schedule: ladder" in config and "end: 1.0" in config
