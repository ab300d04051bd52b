"""Schedule shapes on hand-checkable values."""

import pytest

from centrifuge.schedules import Ladder, average, make_schedule


def test_constant_linear_cosine_endpoints():
    assert make_schedule("constant", value=0.3)(7, 10) == 0.3
    lin = make_schedule("linear", start=1.0, end=0.5)
    assert lin(0, 11) == 1.0 and lin(10, 11) == 0.5 and lin(5, 11) == pytest.approx(0.75)
    cos = make_schedule("cosine", start=0.8, end=0.2)
    assert cos(0, 9) == pytest.approx(0.8) and cos(8, 9) == pytest.approx(0.2) and cos(4, 9) == pytest.approx(0.5)


def test_ladder_holds_then_steps_down_to_dense():
    lors = Ladder(start=0.5, hold_fraction=0.6, rungs=4)
    values = [lors(s, 20) for s in range(20)]
    assert values[:12] == [0.5] * 12  # 60% of 20 steps at the starting rate
    assert values[12:] == [0.375, 0.375, 0.25, 0.25, 0.125, 0.125, 0.0, 0.0]
    assert sorted(set(values), reverse=True) == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert average(lors, 20) == pytest.approx(sum(values) / 20)


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("exponential", start=1)
    with pytest.raises(ValueError, match="unknown: rate"):
        make_schedule("constant", rate=1)
    with pytest.raises(ValueError, match="rungs"):
        Ladder(start=0.5, hold_fraction=0.5, rungs=0)
    with pytest.raises(ValueError, match="outside"):
        make_schedule("constant", value=1.0)(10, 10)
