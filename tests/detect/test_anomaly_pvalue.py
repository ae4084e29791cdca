"""The calibrated p-value of the smallest trigger (bdscan.detect.anomaly.min_size_test): uniform under the null
for any class count, small for a clear outlier, and the levels' Bonferroni correction (bdscan.detect.scan.combine)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bdscan.detect.anomaly import LOG_SD_FLOOR, SpreadFloor, anomaly, min_size_test
from bdscan.detect.scan import combine, flag_levels


def _null_sizes(rng: np.random.Generator, k: int) -> dict[int, float]:
    """K clean-model trigger sizes: log-normal, with a location and spread that change from model to model."""
    mu, sigma = rng.uniform(1.0, 6.0), rng.uniform(0.15, 0.9)
    return dict(enumerate(np.exp(rng.normal(mu, sigma, k)).tolist()))


@pytest.mark.parametrize("k", [10, 43])
def test_p_value_is_calibrated_for_any_class_count(k: int) -> None:
    rng = np.random.default_rng(20241)
    p = np.array([min_size_test(_null_sizes(rng, k)).p_value for _ in range(4000)])  # type: ignore[union-attr]
    # P(p <= a) = a under the null: 4000 models give a standard error of 0.0034 at a = 0.05
    assert abs(np.mean(p < 0.05) - 0.05) < 0.012
    assert abs(np.mean(p < 0.01) - 0.01) < 0.006
    assert abs(np.mean(p < 0.2) - 0.2) < 0.025


def test_the_anomaly_index_is_not_calibrated_for_k() -> None:
    """The issue's point: with K normal sizes the smallest robust z-score passes 2 in about a third of clean models
    at K = 10 and two thirds at K = 43 (the MAD's own noise included), so a fixed threshold means a different
    false-alarm rate at every K; the p-value's is the same."""
    rng = np.random.default_rng(7)
    for k, lo, hi in ((10, 0.25, 0.42), (43, 0.55, 0.73)):
        over_two = np.mean([anomaly(dict(enumerate(rng.normal(100.0, 15.0, k).tolist()))).anomaly_index > 2 for _ in range(1000)])
        assert lo < over_two < hi


@pytest.mark.parametrize("k", [10, 43])
def test_a_clear_outlier_is_found(k: int) -> None:
    rng = np.random.default_rng(k)
    sizes = dict(enumerate(np.exp(rng.normal(4.0, 0.4, k)).tolist()))
    sizes[3] = float(np.exp(4.0 - 6 * 0.4))  # six spreads below the others' log-mean
    t = min_size_test(sizes)
    assert t is not None and t.min_label == 3 and t.p_value < (0.01 if k == 10 else 1e-4)
    assert t.classes == k and t.df == k - 2 and t.p_value == pytest.approx(min(1.0, k * t.p_class))


def test_scale_free_failed_labels_left_out_and_degenerate_spreads() -> None:
    sizes = {0: 10.0, 1: 50.0, 2: 52.0, 3: 48.0, 4: 51.0, 5: 200.0}
    a, b = min_size_test(sizes), min_size_test({k: 7.5 * v for k, v in sizes.items()})
    assert a is not None and b is not None and a.p_value == pytest.approx(b.p_value) and a.min_label == 0
    with_failed = min_size_test({**sizes, 9: None})
    assert with_failed is not None and with_failed.classes == 6 and with_failed.p_value == pytest.approx(a.p_value)
    assert min_size_test({0: 1.0, 1: None, 2: 3.0}) is None  # fewer than 3 sizes: no test
    same = min_size_test({0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0})
    assert same is not None and same.log_sd == LOG_SD_FLOOR and same.p_value == 1.0
    an = anomaly(sizes)
    assert an.p_value == pytest.approx(a.p_value) and an.test == a  # the anomaly index's result carries the test


def test_the_spread_floor_holds_the_others_spread_to_what_the_measurement_resolves() -> None:
    import math

    # a patch level: nine classes within half a token of each other (5.3-6.2 tokens), one class at 4 tokens
    counts = {0: 5.4, 1: 6.1, 2: 6.1, 3: 6.2, 4: 6.0, 5: 5.4, 6: 4.0, 7: 5.8, 8: 5.3, 9: 5.4}
    bare = min_size_test(counts, SpreadFloor(0.05))
    assert bare is not None and bare.min_label == 6 and bare.log_sd > 0.05 and bare.p_value < 0.05
    token = min_size_test(counts, SpreadFloor(0.05, unit=1.0))
    # one token at the others' geometric-mean count is the least spread granted: the class is no longer an outlier
    n = math.exp(bare.log_mean)
    assert token is not None and token.log_sd == pytest.approx(math.log1p(1.0 / n)) and token.p_value > 0.2
    assert token.log_mean == bare.log_mean and token.min_label == 6
    # a floor only ever raises the spread: a wide spread is left alone, and a log-scale floor works without a unit
    wide = {k: v * (1.5 if k % 2 else 0.7) for k, v in counts.items() if k != 6}
    assert min_size_test(wide, SpreadFloor(0.2, 1.0)) == min_size_test(wide, SpreadFloor(0.01))
    assert min_size_test(counts, SpreadFloor(0.3)).log_sd == 0.3
    assert SpreadFloor().at(0.0) == LOG_SD_FLOOR  # the default is the scan's own floor, on any level
    # a real backdoor at the patch level (1 token against 5-6) stays far below the floor's reach
    implanted = min_size_test({**counts, 6: 1.0}, SpreadFloor(0.05, unit=1.0))
    assert implanted is not None and implanted.p_value < 1e-4
    assert anomaly(counts, 2.0, 1.0, SpreadFloor(0.05, unit=1.0)).test == token


def _levels(rng: np.random.Generator, k: int) -> dict[str, SimpleNamespace]:
    return {m: SimpleNamespace(anomaly=anomaly(_null_sizes(rng, k))) for m in ("pixel", "patch")}


def test_levels_are_bonferroni_corrected() -> None:
    """Two independent null levels: flagging when either level's own p <= 0.05 would raise about 9.75 % false
    alarms; the verdict's correction keeps them at or under 5 %."""
    rng = np.random.default_rng(3)
    runs = [_levels(rng, 10) for _ in range(3000)]
    verdicts = [combine(r, 2.0, 0.05) for r in runs]
    either = np.mean([min(x.anomaly.p_value for x in r.values()) <= 0.05 for r in runs])
    flagged = np.mean([v.status == "backdoor" for v in verdicts])
    assert either > 0.08 and 0.035 < flagged <= 0.056
    v = verdicts[0]
    assert set(v.p_values) == {"pixel", "patch"} and v.p_value == pytest.approx(min(1.0, 2 * min(v.p_values.values())))


def test_the_level_with_the_smallest_p_decides_and_flags() -> None:
    rng = np.random.default_rng(11)
    pix = dict(enumerate(np.exp(rng.normal(4.0, 0.4, 20)).tolist()))
    pat = dict(enumerate(np.exp(rng.normal(1.5, 0.3, 20)).tolist()))
    pat[5] = float(np.exp(1.5 - 8 * 0.3))
    res = {"pixel": SimpleNamespace(anomaly=anomaly(pix), flagged=()), "patch": SimpleNamespace(anomaly=anomaly(pat), flagged=())}
    v = combine(res, 2.0, 0.05)
    assert v.status == "backdoor" and v.target == 5 and v.basis == "patch" and v.agree is False
    assert "p = " in v.reason and "α = 0.05" in v.reason
    flag_levels(res, v)  # type: ignore[arg-type]
    assert res["patch"].flagged == (5,) and res["pixel"].flagged == ()
    strict = combine(res, 2.0, 1e-12)
    assert strict.status == "clean" and strict.target is None and strict.basis == "patch"
    none = combine({"pixel": SimpleNamespace(anomaly=anomaly({0: 1.0, 1: None, 2: None}))}, 2.0)
    assert none.status == "inconclusive" and none.p_value is None


def test_a_level_that_would_flag_another_class_on_its_own_is_named_in_the_reason() -> None:
    rng = np.random.default_rng(5)
    pix = dict(enumerate(np.exp(rng.normal(4.0, 0.4, 43)).tolist()))
    pat = dict(enumerate(np.exp(rng.normal(1.5, 0.3, 43)).tolist()))
    pix[12], pat[1] = float(np.exp(4.0 - 9 * 0.4)), float(np.exp(1.5 - 7 * 0.3))  # both far out, two classes
    res = {"pixel": SimpleNamespace(anomaly=anomaly(pix)), "patch": SimpleNamespace(anomaly=anomaly(pat))}
    v = combine(res, 2.0, 0.05)
    assert v.status == "backdoor" and v.target == 12 and v.basis == "pixel" and v.agree is False
    assert 2 * v.p_values["patch"] <= 0.05  # the patch level would flag class 1 on its own
    assert v.reason.endswith(f"The patch level suspects class 1 instead (p = {2 * v.p_values['patch']:.2g}).")
    # a level that names another class but would not flag alone is not named
    pat[1] = float(np.exp(1.5 - 1 * 0.3))
    quiet = combine({"pixel": res["pixel"], "patch": SimpleNamespace(anomaly=anomaly(pat))}, 2.0, 0.05)
    assert quiet.status == "backdoor" and quiet.target == 12 and "instead" not in quiet.reason
