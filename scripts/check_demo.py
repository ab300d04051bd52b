"""Check the run `make demo` just wrote against what the README says of it (run by .ci/run after `make demo`).

    python scripts/check_demo.py RUNS_DIR STARTED

RUNS_DIR: where the demo writes its runs (runs/); STARTED: the Unix time before `make demo` started. The
newest run directory created since then must hold the whole run (every step, the last checkpoint, the
picture, TensorBoard events) and its held-out loss must go from and to the numbers the README's Training
section states ("brings the eval loss from A to about B").
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_claim() -> tuple[float, float]:
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    found = re.search(r"brings the eval loss from (\d+\.\d+) to about (\d+\.\d+)", text)
    if not found:
        raise SystemExit("check_demo: the README no longer states the demo's eval loss ('brings the eval loss ...')")
    return float(found.group(1)), float(found.group(2))


def main(runs_dir: str, started: float) -> int:
    runs = [p for p in Path(runs_dir).iterdir() if p.is_dir() and p.stat().st_mtime >= started - 1]
    runs = [p for p in runs if (p / "metrics.jsonl").is_file()]
    if not runs:
        raise SystemExit(f"check_demo: no run under {runs_dir} since `make demo` started")
    run = max(runs, key=lambda p: p.stat().st_mtime)
    steps = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]["steps"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    first, last = readme_claim()
    problems = []
    if not train_steps or train_steps[-1] != steps:
        problems.append(f"training records end at step {train_steps[-1:]} of {steps}")
    if not (run / "checkpoints" / f"step-{steps:07d}" / "model.safetensors").is_file():
        problems.append(f"no checkpoint of step {steps}")
    if (run / "metrics.png").read_bytes()[:4] != b"\x89PNG":
        problems.append("no metrics.png")
    if not list((run / "tb").glob("events.out.tfevents.*")):
        problems.append("no TensorBoard events")
    if len(evals) < 2 or evals[0]["step"] != 0 or evals[-1]["step"] != steps:
        problems.append(f"evaluations at steps {[r['step'] for r in evals]}: want 0 first and {steps} last")
    elif abs(evals[0]["loss"] - first) > 0.01 or abs(evals[-1]["loss"] - last) > 0.05:
        problems.append(f"eval loss {evals[0]['loss']:.3f} -> {evals[-1]['loss']:.3f}; the README says "
                        f"{first} -> about {last}")
    if problems:
        print(f"check_demo: {run}: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"check_demo: {run}: {steps} steps, eval loss {evals[0]['loss']:.3f} -> {evals[-1]['loss']:.3f} "
          f"(README: {first} -> about {last}), checkpoint, metrics.png and TensorBoard events written")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
