"""The combined verdict's rule (bdscan.detect.base.combine, docs/verdict.md): the smallest calibrated p-value,
corrected by a weighted Bonferroni (times the number of detectors that gave one when their weights are equal),
against alpha; agreement, disagreement, evidence without a p-value."""

from __future__ import annotations

import pytest

from bdscan.detect import Evidence, combine


def _ev(name: str, status: str, target: int | None = None, p: float | None = None, weight: float = 1.0) -> Evidence:
    return Evidence(name, status, target, 1.0, 2.0, f"{name} says {status}", {}, p, weight)


def test_one_calibrated_detector_decides_on_its_p_value() -> None:
    v = combine([_ev("nc", "backdoor", 3, 0.01)])
    assert (v.status, v.target, v.p_value, v.tests, v.calibrated) == ("backdoor", 3, 0.01, 1, True)
    assert v.decided_by is not None and v.decided_by.detector == "nc" and v.reason == "nc says backdoor"
    assert combine([_ev("nc", "clean", None, 0.4)]).status == "clean"
    assert combine([_ev("nc", "backdoor", 3, 0.03)], alpha=0.01).status == "clean"  # alpha is a setting


def test_agreement_is_corrected_for_the_number_of_detectors() -> None:
    v = combine([_ev("nc", "backdoor", 3, 0.01), _ev("mm-bd", "backdoor", 3, 0.004)])
    assert (v.status, v.target, v.tests, v.decided_by.detector) == ("backdoor", 3, 2, "mm-bd")  # type: ignore[union-attr]
    assert v.p_value == pytest.approx(0.008) and v.disagree == () and "Corrected for 2 detectors" in v.reason
    tie = combine([_ev("nc", "backdoor", 3, 0.01), _ev("mm-bd", "backdoor", 3, 0.01)])
    assert tie.decided_by.detector == "nc"  # type: ignore[union-attr]  # equal p-values: the first that ran


def test_the_correction_can_turn_a_single_flag_into_clean() -> None:
    v = combine([_ev("nc", "backdoor", 3, 0.03), _ev("mm-bd", "clean", None, 0.6)])
    assert v.status == "clean" and v.target is None and v.p_value == pytest.approx(0.06)
    assert "0.06 > α = 0.05" in v.reason and v.decided_by.detector == "nc"  # type: ignore[union-attr]


def test_disagreement_keeps_the_deciding_class_and_names_the_other() -> None:
    v = combine([_ev("nc", "backdoor", 3, 0.001), _ev("mm-bd", "backdoor", 5, 0.01)])
    assert (v.status, v.target, v.disagree) == ("backdoor", 3, (("mm-bd", 5),)) and "mm-bd suspects class 5" in v.reason
    weak = combine([_ev("nc", "backdoor", 3, 0.001), _ev("mm-bd", "clean", 5, 0.2)])
    assert weak.target == 3 and weak.disagree == ()  # the other would not flag on its own: no disagreement


def test_evidence_without_a_p_value_is_shown_but_does_not_overrule() -> None:
    v = combine([_ev("plugin", "backdoor", 7), _ev("nc", "clean", None, 0.5)])
    assert v.status == "clean" and v.tests == 1 and v.calibrated and "plugin (uncalibrated) suspects class 7" in v.reason
    assert len(v.evidence) == 2
    v = combine([_ev("plugin", "backdoor", 7), _ev("nc", "backdoor", 2, 0.002)])
    assert (v.status, v.target, v.tests) == ("backdoor", 2, 1)
    # an inconclusive detector is not a test: it does not raise the correction
    v = combine([_ev("nc", "inconclusive"), _ev("mm-bd", "backdoor", 4, 0.04)])
    assert (v.status, v.target, v.tests, v.p_value) == ("backdoor", 4, 1, 0.04)


def test_without_any_p_value_the_detectors_statuses_decide() -> None:
    v = combine([_ev("a", "clean"), _ev("b", "backdoor", 3), _ev("c", "backdoor", 5)])
    assert (v.status, v.target, v.decided_by.detector, v.calibrated, v.p_value) == ("backdoor", 3, "b", False, None)  # type: ignore[union-attr]
    assert combine([_ev("a", "inconclusive"), _ev("b", "clean")]).status == "clean"
    assert combine([_ev("a", "inconclusive")]).status == "inconclusive"
    empty = combine([])
    assert empty.status == "inconclusive" and empty.decided_by is None and empty.reason == "No detector ran."


def test_a_p_value_must_be_a_probability() -> None:
    with pytest.raises(ValueError):
        _ev("nc", "backdoor", 3, 1.5)


def test_weights_share_alpha_between_the_detectors() -> None:
    # Neural Cleanse (weight 1) near alpha keeps its flag beside a weight-0.1 detector: tested at alpha / 1.1
    v = combine([_ev("nc", "backdoor", 3, 0.04), _ev("nn", "clean", 6, 0.5, 0.1)])
    assert (v.status, v.target) == ("backdoor", 3) and v.p_value == pytest.approx(0.044)
    assert dict(v.factors) == pytest.approx({"nc": 1.1, "nn": 11.0}) and "weights nc 1, nn 0.1" in v.reason
    # the light detector flags on its own only below alpha / 11
    v = combine([_ev("nc", "clean", 2, 0.6), _ev("nn", "backdoor", 6, 0.004, 0.1)])
    assert (v.status, v.target, v.decided_by.detector) == ("backdoor", 6, "nn")  # type: ignore[union-attr]
    assert v.p_value == pytest.approx(0.044)
    assert combine([_ev("nc", "clean", 2, 0.6), _ev("nn", "backdoor", 6, 0.005, 0.1)]).status == "clean"  # 0.055
    # the decision is on the corrected p-values: a smaller raw p-value of a light detector can lose to a heavier one
    v = combine([_ev("nc", "backdoor", 3, 0.01), _ev("nn", "backdoor", 3, 0.002, 0.1)])
    assert v.decided_by.detector == "nc" and v.p_value == pytest.approx(0.011)  # type: ignore[union-attr]
    # equal weights are the plain rule (exactly m, whatever the weight)
    eq = combine([_ev("a", "backdoor", 3, 0.01, 0.5), _ev("b", "clean", None, 0.5, 0.5)])
    assert eq.p_value == 0.02 and dict(eq.factors) == {"a": 2.0, "b": 2.0}
    # alone, a light detector has all of alpha
    assert combine([_ev("nn", "backdoor", 6, 0.04, 0.1)]).status == "backdoor"
    with pytest.raises(ValueError, match="weight"):
        _ev("x", "clean", None, 0.5, 0.0)
