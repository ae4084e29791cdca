"""The repair's intervals (computed by hand) and its two pass/fail checks, on counts made up to hit each rule."""

from __future__ import annotations

import pytest
import torch

from bdscan.repair.checks import Outcomes, accuracy_check, attack_check, judge
from bdscan.repair.stats import PairedCounts, paired_difference, wilson


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998, independent proportions) example: 81/263 -> 0.2553 to 0.3662; ends are exact at 0 and n
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0, 54)[0] == 0.0 and wilson(54, 54)[1] == 1.0
    assert wilson(0, 54)[1] == pytest.approx(0.0664, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_interval_matches_the_textbook_example() -> None:
    # Fagerland, Lydersen & Laake (2017), ch. 8: Cavo et al. 2012, table [[59, 6], [16, 80]]:
    # Newcombe's square-and-add interval, estimate -0.0621, 95 % CI -0.1186 to -0.0046
    lo, hi = paired_difference(PairedCounts(59, 6, 16, 80))
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    assert paired_difference(PairedCounts(0, 0, 0, 0)) == (-1.0, 1.0)
    lo, hi = paired_difference(PairedCounts(30, 0, 0, 30))  # nothing changed: the interval holds 0 and is narrow
    assert lo < 0 < hi and hi - lo < 0.15


def _outcomes(correct: list[bool], hits: list[bool] | None = None, floor: list[bool] | None = None) -> Outcomes:
    h = {"asr_reversed": torch.tensor(hits) if hits is not None else None, "asr_original": None}
    if floor is not None:
        h["target_without_trigger"] = torch.tensor(floor)
    return Outcomes(torch.tensor(correct), h)


def _pair(n: int, right_before: int, lost: int, gained: int) -> tuple[Outcomes, Outcomes]:
    """n images, ``right_before`` of them right before; ``lost`` of those wrong after, ``gained`` of the rest right after."""
    before = [i < right_before for i in range(n)]
    after = [(i < right_before and i >= lost) or (i >= right_before and i < right_before + gained) for i in range(n)]
    return _outcomes(before), _outcomes(after)


def test_a_drop_fails_only_when_its_whole_interval_lies_above_the_tolerance() -> None:
    # the demo's numbers: 60 held-out images, 6 went right -> wrong and none the other way: 10 points measured
    b, a = _pair(60, 31, 6, 0)
    check, (lo, hi), counts = accuracy_check(b, a, 0.03)
    assert counts == {"clean": 60, "lost": 6, "gained": 0}
    assert lo < 0.03 < 0.10 < hi  # 10 points measured, but 60 images cannot show more than 3 (lower bound ~1.8)
    assert check.passed and check.text.startswith("Passes, with a caution") and "10.0 points" in check.text
    b, a = _pair(600, 310, 60, 0)  # the same share on ten times the images: shown beyond the tolerance
    check, (lo, _), _ = accuracy_check(b, a, 0.03)
    assert lo > 0.03 and not check.passed and check.text.startswith("Fails") and "tolerance of 3.0 points" in check.text
    b, a = _pair(60, 31, 1, 2)  # accuracy rose
    check, _, _ = accuracy_check(b, a, 0.03)
    assert check.passed and "rose 1.7 points" in check.text


def test_attack_success_fails_on_the_measured_share_and_names_the_floor() -> None:
    after = _outcomes([True] * 10, hits=[True] * 3 + [False] * 51, floor=[True] + [False] * 53)
    check, counts = attack_check(after, 0.10, 3)
    assert check.passed and counts == {"attack": 54}  # 3/54 = 5.6 % <= 10 %
    assert "5.6 % of 54" in check.text and "1.9 % of them to class 3" in check.text
    after = _outcomes([True] * 10, hits=[True] * 7 + [False] * 47)  # 13.0 %: its interval reaches below 10 %, still fails
    check, _ = attack_check(after, 0.10, 3)
    assert not check.passed and "still works" in check.text
    check, _ = attack_check(_outcomes([True], hits=[]), 0.10, 3)
    assert not check.passed and "could not be measured" in check.text


def test_judge_collects_intervals_and_counts() -> None:
    b, a = _pair(20, 10, 1, 1)
    b = Outcomes(b.correct, {"asr_reversed": torch.tensor([True] * 18), "asr_original": None})
    a = Outcomes(a.correct, {"asr_reversed": torch.tensor([False] * 18), "asr_original": None})
    j = judge(b, a, 0.03, 0.10, 3)
    assert j.accuracy.passed and j.attack.passed
    assert j.counts == {"clean": 20, "lost": 1, "gained": 1, "attack": 18}
    assert j.intervals["before"]["asr_reversed"][0] > 0.8 and j.intervals["after"]["asr_reversed"] == (0.0, pytest.approx(0.176, abs=1e-3))
    assert j.intervals["before"]["asr_original"] is None
