"""The utility study's ``cpu-smoke`` profile end to end: corpus, reference, scores, arms, report.

No assertion here says which arm wins: that is the study's result, not a property of the code."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `experiments` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from experiments.utility import report, run  # noqa: E402
from experiments.utility.corpus import CorpusSettings, build_corpus  # noqa: E402
from experiments.utility.curves import run_numbers  # noqa: E402

ARMS = ("dense", "centrifuge_k0.5", "random_k0.5")


def _study(out: Path, arms: str, seeds: str, *extra: str) -> int:
    return run.main(["--profile", "cpu-smoke", "--out", str(out), "--arms", arms, "--seeds", seeds,
                     "--device", "cpu", *extra])  # fmt: skip


def _results(out: Path) -> dict[tuple[str, int], dict]:
    found = {}
    for path in sorted(out.glob("runs/*/seed*/result.json")):
        result = json.loads(path.read_text())
        found[(result["arm"], result["seed"])] = result
    return found


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("utility") / "study"
    assert _study(out, ",".join(ARMS), "0,1") == 0
    return out


def test_files_and_table(study: Path):
    prepared = study / "prepared"
    for name in ("corpus/train.jsonl", "corpus/reference.jsonl", "corpus/eval.jsonl", "corpus/manifest.json",
                 "scores/manifest.json", "reference/metrics.jsonl", "prepared.json"):
        assert (prepared / name).is_file(), name
    assert not list(study.glob("runs/*/seed*/checkpoints")), "checkpoints are removed after each run"
    for name in ("results.csv", "results.json", "summary.md", "curves.png"):
        assert (study / "report" / name).is_file(), name

    with open(study / "report" / "results.csv", newline="") as f:
        rows = {row["arm"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(ARMS)
    for row in rows.values():
        assert row["seeds"] == "0 1"
        assert math.isfinite(float(row["final_loss_mean"])) and float(row["tokens_per_s"]) > 0
        assert float(row["final_loss_min"]) <= float(row["final_loss_mean"]) <= float(row["final_loss_max"])
    assert float(rows["dense"]["vs_dense_pct"]) == 0.0
    assert float(rows["centrifuge_k0.5"]["kept_fraction"]) == pytest.approx(0.5, abs=0.02)

    payload = json.loads((study / "report" / "results.json").read_text())
    assert payload["meta"]["torch"] and payload["meta"]["devices"] and payload["meta"]["commands"]
    assert payload["failures"] == []
    summary = (study / "report" / "summary.md").read_text()
    assert "Expectation 1" in summary and "Expectation 2" in summary and "`centrifuge_k0.5`" in summary


def test_curves_clean_eval_and_same_start(study: Path):
    results = _results(study)
    assert set(results) == {(arm, seed) for arm in ARMS for seed in (0, 1)}
    for r in results.values():
        steps = [p["step"] for p in r["curve"]]
        seconds = [p["seconds"] for p in r["curve"]]
        assert steps == [0, 4, 8] and seconds[0] == 0.0 and seconds == sorted(seconds)
        assert all(math.isfinite(p["loss"]) for p in r["curve"])
        assert r["final_eval_loss"] == r["curve"][-1]["loss"]
    # same seed -> same initial model and held-out split: identical step-0 loss in every arm
    for seed in (0, 1):
        assert len({results[(arm, seed)]["curve"][0]["loss"] for arm in ARMS}) == 1
    assert results[("dense", 0)]["curve"][0]["loss"] != results[("dense", 1)]["curve"][0]["loss"]
    # the held-out split is clean; about half the training documents are corrupted
    evals = [json.loads(line) for line in (study / "prepared/corpus/eval.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (study / "prepared/corpus/train.jsonl").read_text().splitlines()]
    assert evals and not any(d["corrupted"] for d in evals)
    assert abs(sum(d["corrupted"] for d in train) - len(train) / 2) <= 1


def test_reproducible_and_report_merges(study: Path, tmp_path: Path):
    again = tmp_path / "again"  # built from scratch: corpus, reference and scores again
    assert _study(again, "dense,centrifuge_k0.5", "0", "--no-report") == 0
    first, second = _results(study), _results(again)
    assert second[("dense", 0)]["corpus_fingerprint"] == first[("dense", 0)]["corpus_fingerprint"]
    assert second[("dense", 0)]["scores_fingerprint"] == first[("dense", 0)]["scores_fingerprint"]
    for arm in ("dense", "centrifuge_k0.5"):
        assert [p["loss"] for p in second[(arm, 0)]["curve"]] == [p["loss"] for p in first[(arm, 0)]["curve"]]

    split = tmp_path / "split"  # another invocation reusing a finished prepared/ directory
    assert _study(split, "random_k0.5", "1", "--no-report", "--prepared", str(study / "prepared")) == 0
    assert _results(split)[("random_k0.5", 1)]["final_eval_loss"] == first[("random_k0.5", 1)]["final_eval_loss"]
    late = tmp_path / "late"  # budget already spent (1 ns; reusing prepared/ can take < 1 ms): exit 1, prepared/ kept
    assert _study(late, "dense", "0", "--no-report", "--budget-s", "1e-9", "--prepared", str(study / "prepared")) == 1
    assert not _results(late) and (late / "prepared" / "prepared.json").is_file()
    merged = report.write_report([str(again), str(split)], str(tmp_path / "merged"))
    assert {row["arm"] for row in merged["table"]} == {"dense", "centrifuge_k0.5", "random_k0.5"}


def test_corpus_is_deterministic():
    settings = CorpusSettings(sources=("pydoc",), max_docs=30, doc_chars=1000, seed=3)
    a, b = build_corpus(settings), build_corpus(settings)
    assert [d.text for d in a.train] == [d.text for d in b.train]
    assert {d.text for d in a.eval}.isdisjoint(d.text for d in a.train)
    noisy = [d for d in a.train if d.corrupted]
    assert noisy and all(d.noise_chars > 0 for d in noisy)


def test_clock_excludes_evaluation():
    records = [{"kind": "eval", "step": 0, "time": 10.0, "loss": 5.0}]
    for step, t in ((1, 13.0), (2, 14.0), (3, 15.0)):  # step 1 includes 2 s of compilation
        records.append({"kind": "train", "step": step, "time": t, "loss": 4.0, "tokens_per_s": 100.0})
    records.insert(3, {"kind": "eval", "step": 2, "time": 14.5, "loss": 4.5})  # 0.5 s of evaluation
    records.append({"kind": "eval", "step": 3, "time": 15.2, "loss": 4.4})
    numbers = run_numbers(records)
    assert numbers["first_step_s"] == 3.0 and numbers["median_step_s"] == pytest.approx(0.75)
    assert [p["seconds"] for p in numbers["curve"]] == pytest.approx([0.0, 1.75, 2.25])
    assert numbers["final_eval_loss"] == 4.4
