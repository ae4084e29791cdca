"""The two-look schedule (ScanConfig.second_look): a look after the first steps, and on only when in doubt."""

from __future__ import annotations

import pytest

from bdscan.detect import ScanSettings, get_detector
from bdscan.detect.config import BUDGET_SECOND_LOOK, BUDGETS, DEFAULT_BUDGET, parse_second_look
from bdscan.detect.scan import ScanConfig, SecondLook, resolve_second_look, scan
from bdscan.errors import UsageError
from tests.conftest import TARGET

CFG = BUDGETS["smoke"].with_(steps=10, samples=48, precision="fp32")


def _sizes(f) -> dict:  # type: ignore[no-untyped-def]
    return {m: [(r.label, r.norm, r.steps) for r in res.labels] for m, res in f.modes.items()}


def _scan(t, steps: int = 10, look: SecondLook | None = None):  # type: ignore[no-untyped-def]
    return scan(t.wrapper, t.data, ScanConfig(modes=("pixel",), inversion=CFG.with_(steps=steps), second_look=look))


def test_in_doubt_every_class_runs_on_and_the_second_look_spends_the_rest_of_alpha(tiny_bd) -> None:
    t = tiny_bd.tiny
    # 20 steps: the planted class's mask has shrunk well below the others' by then (after 10 it is still on its way)
    one = _scan(t, steps=20)
    # alpha_first so small and clean_above 1: the first look can neither flag nor stop, so the second always runs
    two = _scan(t, steps=20, look=SecondLook(first_steps=4, alpha_first=1e-300, clean_above=1.0))
    assert _sizes(two) == _sizes(one)  # the runs were continued, not restarted: exactly the 10-step scan
    assert two.verdict.p_value == pytest.approx(min(1.0, one.verdict.p_value * 0.05 / (0.05 - 1e-300)))
    assert two.verdict.status == one.verdict.status == "backdoor" and two.verdict.target == TARGET
    assert "second look after 20 steps (the first, after 4," in two.verdict.reason
    assert two.modes["pixel"].flagged == (TARGET,)
    assert two.verdict.looks == 2 and one.verdict.looks == 1
    assert two.config.to_dict()["second_look"] == {"first_steps": 4, "alpha_first": 1e-300, "clean_above": 1.0}


def test_a_clear_first_look_stops_the_scan_with_its_own_correction(tiny_bd) -> None:
    t = tiny_bd.tiny
    short = _scan(t, steps=12)
    assert short.verdict.p_value is not None  # conclusive after 12 steps
    look = SecondLook(first_steps=12, alpha_first=0.01, clean_above=1e-300)  # any p above 1e-300: stop after 12
    f = _scan(t, steps=20, look=look)
    assert _sizes(f) == _sizes(short)  # stopped at the first look: exactly the 12-step scan
    assert f.verdict.p_value == pytest.approx(min(1.0, short.verdict.p_value * 0.05 / 0.01))
    assert "first look after 12 of 20 steps" in f.verdict.reason and f.verdict.looks == 1
    assert f.verdict.status == ("backdoor" if f.verdict.p_value <= 0.05 else "clean")


@pytest.mark.parametrize("look", [SecondLook(first_steps=10), SecondLook(alpha_first=0.05), SecondLook(clean_above=0.0)])
def test_a_second_look_that_does_not_fit_is_a_usage_error(tiny_bd, look: SecondLook) -> None:
    with pytest.raises(UsageError, match="second look"):
        _scan(tiny_bd.tiny, look=look)


def test_second_look_values_parse_from_text_or_a_sequence() -> None:
    assert parse_second_look("30:0.005:0.5") == parse_second_look([30, 0.005, 0.5]) == (30, 0.005, 0.5)
    assert parse_second_look(" Auto ") == "auto" and parse_second_look("off") == "off"
    for bad in ("30:0.005", "x:0.005:0.5", "", [1, 2], "twice"):
        with pytest.raises(UsageError, match="second look"):
            parse_second_look(bad)


def test_auto_is_the_budgets_own_schedule_with_its_share_of_alpha_and_off_is_one_look() -> None:
    first, share, clean = BUDGET_SECOND_LOOK["fast"]
    steps = BUDGETS["fast"].steps
    assert first < steps  # the default budget looks twice
    assert resolve_second_look("auto", "fast", steps, 0.05) == SecondLook(first, share * 0.05, clean)
    assert resolve_second_look("auto", "fast", steps, 0.001) == SecondLook(first, share * 0.001, clean)  # any alpha fits
    # --steps at or under the first look: one look at those steps (e.g. the former 30-step default)
    assert resolve_second_look("auto", "fast", first, 0.05) is None
    assert resolve_second_look("auto", "smoke", BUDGETS["smoke"].steps, 0.05) is None  # a budget without a schedule
    assert resolve_second_look("off", "fast", steps, 0.05) is None and resolve_second_look(None, "fast", steps, 0.05) is None
    assert resolve_second_look((10, 0.01, 0.5), "smoke", 20, 0.05) == SecondLook(10, 0.01, 0.5)
    with pytest.raises(UsageError, match="does not fit"):
        resolve_second_look((30, 0.01, 0.5), "smoke", 20, 0.05)
    with pytest.raises(UsageError, match="unknown second look"):
        resolve_second_look("twice", "fast", steps, 0.05)


def test_a_default_scan_looks_twice() -> None:
    cfg = get_detector("neural-cleanse").configure(ScanSettings())
    first, share, clean = BUDGET_SECOND_LOOK[DEFAULT_BUDGET]
    assert cfg.second_look == SecondLook(first, share * cfg.alpha, clean)
    assert cfg.inversion.steps == BUDGETS[DEFAULT_BUDGET].steps > first
    assert get_detector("neural-cleanse").configure(ScanSettings(second_look="off")).second_look is None
