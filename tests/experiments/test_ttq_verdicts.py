"""The time-to-quality verdicts on fixed curves: each goal true, false and undecidable."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `experiments` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from experiments.time_to_quality import verdicts as v  # noqa: E402


def run(points: list[tuple[float, float]], *, step_every: int = 10) -> dict:
    """A run whose held-out loss is ``loss`` at ``seconds`` for each (seconds, loss), one eval per 10 steps."""
    return {"curve": [{"step": i * step_every, "seconds": s, "loss": loss} for i, (s, loss) in enumerate(points)]}


# dense: 100 s of training, final loss 3.0 (seeds 2.98 / 3.02)
DENSE = [run([(0, 8.0), (50, 4.0), (100, 2.98)]), run([(0, 8.0), (50, 4.0), (100, 3.02)])]


def test_time_to_loss_interpolates_between_evaluations():
    curve = run([(0, 8.0), (10, 4.0), (20, 2.0)])["curve"]
    assert v.time_to_loss(curve, 3.0) == pytest.approx(15.0)
    assert v.time_to_loss(curve, 8.0) == 0.0
    assert v.time_to_loss(curve, 2.0) == pytest.approx(20.0)
    assert v.time_to_loss(curve, 1.9) is None
    assert v.value_at(curve, 15.0) == pytest.approx(3.0)
    assert v.value_at(curve, 5, key="step") == pytest.approx(6.0)  # steps 0, 10, 20 at 0, 10, 20 s
    assert math.isnan(v.value_at(curve, 21.0))


def test_reach_yes_no_and_seeds_disagreeing():
    fast = [run([(0, 8.0), (60, 3.0), (100, 2.8)]), run([(0, 8.0), (70, 3.0), (100, 2.85)])]
    slow = [run([(0, 8.0), (80, 3.0), (100, 2.9)]), run([(0, 8.0), (100, 3.1)])]
    mixed = [fast[0], slow[0]]
    yes, no, split = v.reach(fast, DENSE), v.reach(slow, DENSE), v.reach(mixed, DENSE)
    assert yes["verdict"] == "yes" and yes["fractions"] == pytest.approx([0.6, 0.7])
    assert no["verdict"] == "no" and no["fractions"][0] == pytest.approx(0.8) and no["fractions"][1] is None
    assert "never" in no["text"]
    assert split["verdict"] == "inconclusive"
    assert v.reach(fast, DENSE, ratio=0.65)["verdict"] == "inconclusive"  # 0.7 > 0.65 for the second seed


def test_lower_at_equal_wall_clock():
    # the arms ran 80 s of training, dense 100 s: they are compared at 80 s (dense interpolated there)
    better = [run([(0, 8.0), (40, 3.5), (80, 2.9)]), run([(0, 8.0), (40, 3.5), (80, 2.92)])]
    worse = [run([(0, 8.0), (40, 5.0), (80, 3.6)]), run([(0, 8.0), (40, 5.0), (80, 3.7)])]
    overlap = [run([(0, 8.0), (80, 3.1)]), run([(0, 8.0), (80, 3.5)])]
    yes = v.lower_at_time(better, DENSE)
    assert yes["verdict"] == "yes" and yes["seconds"] == 80
    assert yes["loss_b"] == pytest.approx([4.0 + 0.6 * (2.98 - 4.0), 4.0 + 0.6 * (3.02 - 4.0)])  # dense at 80 s
    assert v.lower_at_time(worse, DENSE)["verdict"] == "no"
    assert v.lower_at_time(overlap, DENSE)["verdict"] == "inconclusive"
    one_each = v.lower_at_time(better[:1], DENSE[:1])
    assert one_each["verdict"] == "inconclusive" and "one seed each" in one_each["text"]


def test_within_one_percent_at_equal_steps():
    close = [run([(0, 8.0), (50, 4.0), (90, 3.0 * 1.005)])]
    far = [run([(0, 8.0), (50, 4.0), (90, 3.0 * 1.02)])]
    other_steps = [run([(0, 8.0), (45, 4.0), (90, 3.0)], step_every=12)]
    assert v.within_at_steps(close, DENSE)["verdict"] == "yes"
    assert v.within_at_steps(far, DENSE)["verdict"] == "no"
    assert v.within_at_steps(far, DENSE)["relative"] == pytest.approx(0.02)
    assert v.within_at_steps(other_steps, DENSE)["verdict"] == "inconclusive"


def test_step_ratio_condition():
    dense = [{"median_step_s": 0.100}, {"median_step_s": 0.102}]
    assert v.step_ratio([{"median_step_s": 0.065}], dense)["verdict"] == "yes"
    no = v.step_ratio([{"median_step_s": 0.075}], dense)
    assert no["verdict"] == "no" and no["ratio"] == pytest.approx(0.075 / 0.101)


def test_goals_follow_the_arms_present():
    arm = [run([(0, 8.0), (60, 3.0), (100, 2.8)])]
    assert v.goals({"dense": DENSE}) == []
    titles = [g["goal"] for g in v.goals({"dense": DENSE, "centrifuge_k0.5": arm})]
    assert len(titles) == 2 and "0.75x" in titles[0]
    every = {"dense": DENSE, "centrifuge_k0.5": arm, "random_k0.5": arm, "rho1_loss_only_k0.5": arm,
             "neurons_lors": arm, "neurons_lors_eqsteps": arm, "tokens_neurons": arm}  # fmt: skip
    checks = v.goals(every)
    assert len(checks) == 8 and all(c["verdict"] in ("yes", "no", "inconclusive") for c in checks)
    assert all(c["text"].endswith(c["verdict"]) for c in checks)


def test_dense_hook_reaches_only_the_dense_arm():
    import dataclasses

    from experiments.time_to_quality.profiles import PROFILES, ttq_arm_overrides

    profile = dataclasses.replace(PROFILES["cpu-toy"], dense_extra=("train.activation_checkpointing=true",))
    assert "train.activation_checkpointing=true" in ttq_arm_overrides("dense", profile)
    assert "train.activation_checkpointing=true" not in ttq_arm_overrides("centrifuge_k0.5", profile)
    assert ttq_arm_overrides("neurons_lors_eqsteps", profile) == ttq_arm_overrides("neurons_lors", profile)
