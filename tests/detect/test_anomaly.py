import math

import pytest

from bdscan.detect.anomaly import PATCH_MAD_FLOOR, anomaly, anomaly_index_from_stats


def test_published_example() -> None:
    # Neural Cleanse's paper: median 64.47, MAD 13.24, min L1 16.1 -> anomaly index 3.65
    assert anomaly_index_from_stats(64.47, 13.24, 16.1) == pytest.approx(3.65, abs=0.01)


def test_lower_side_only_and_flagging() -> None:
    norms = {0: 10.0, 1: 50.0, 2: 52.0, 3: 48.0, 4: 51.0, 5: 200.0}
    a = anomaly(norms, threshold=2.0)
    assert a.min_label == 0 and a.flagged == (0,)
    assert a.indices[5] == 0.0  # an unusually *large* norm is never anomalous
    # median of the 6 norms is 50.5; consistent MAD = 1.4826 * median(|x - 50.5|) = 1.4826 * 2.0
    assert a.median == pytest.approx(50.5)
    assert a.mad == pytest.approx(1.4826 * 2.0)
    assert a.anomaly_index == pytest.approx((50.5 - 10.0) / (1.4826 * 2.0))


def test_mad_zero_guard_and_floor() -> None:
    norms = {0: 1.0, 1: 3.0, 2: 3.0, 3: 3.0, 4: 3.0}
    a = anomaly(norms)
    assert a.raw_mad == 0.0 and math.isinf(a.anomaly_index) and a.flagged == (0,)
    b = anomaly(norms, mad_floor=PATCH_MAD_FLOOR)
    assert b.mad == PATCH_MAD_FLOOR and b.anomaly_index == pytest.approx(2.0) and b.flagged == ()
    same = anomaly({0: 3.0, 1: 3.0, 2: 3.0})
    assert same.anomaly_index == 0.0 and not same.suspected


def test_failed_labels_are_reported_not_given_a_norm() -> None:
    a = anomaly({0: None, 1: 5.0, 2: 6.0, 3: 7.0})
    assert a.failed == (0,) and 0 not in a.indices and a.conclusive
    b = anomaly({0: None, 1: None, 2: 5.0, 3: 6.0})
    assert not b.conclusive and not b.suspected
