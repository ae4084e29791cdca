"""Neural Cleanse's outlier tests over the per-label trigger sizes of one level.

Two statistics are computed; the verdict rests on the second:

* **Anomaly index** (Wang et al., section IV-C): (median - norm) / (1.4826 · MAD), lower side only (a backdoor
  makes a target *easier* to reach, never harder). Kept for continuity and shown in the reports, but it is not a
  z-score of anything calibrated: the *smallest* of K robust z-scores exceeds 2 far more often than 5 % of the
  time (in about a third of clean models at K = 10 and two thirds at K = 43 when sizes are normal, with the
  MAD's own noise), so a fixed threshold means a different false-alarm rate for every class count.
* **p-value of the smallest trigger** (:func:`min_size_test`): the log sizes of the other K - 1 classes fit a
  normal null; the smallest class's log size is compared with its predictive distribution (Student's t with
  K - 2 degrees of freedom, the noise of the fitted mean and spread included), and the class-level tail
  probability is multiplied by K, because the class tested was chosen as the smallest of K (Bonferroni over
  the classes, which is exact in the tail: two classes cannot both lie that far below the rest). Under the null
  (log sizes i.i.d. normal, any mean and spread) ``P(p <= a) = a`` for every K (tested by simulation), and less
  where the spread is below its floor (:class:`SpreadFloor`: what one class's measurement resolves); how it was
  chosen over MAD- and raw-size variants, measured on the lab zoo, and the floor on the calibration half:
  docs/verdict.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import fmean, median, stdev

from scipy import stats

#: consistency constant that turns a MAD into a standard-deviation estimate for normal data
MAD_CONSISTENCY = 1.4826
#: the MAD floor used for patch-level token counts: counts move in whole tokens, and a spread of
#: less than one token between labels is not evidence of anything (it would make MAD = 0 and every
#: index infinite). One token is the smallest difference a patch trigger can make.
PATCH_MAD_FLOOR = 1.0
#: the floor of the fitted spread of log sizes: the seed noise of one class's log size at the first look (30 steps),
#: measured on the evaluation zoo's calibration half (docs/verdict.md, "The spread's floor"): nine classes that agree
#: more closely than one class's own measurement do not show how far one more class may lie
LOG_SD_FLOOR = 0.15


@dataclass(frozen=True)
class SpreadFloor:
    """The least spread the size test grants the other classes' log sizes (docs/verdict.md, "The spread's floor").

    The fitted standard deviation of K - 1 log sizes can come out smaller than anything the measurement resolves
    (nine classes that happen to agree closely); a class a little below them then looks like an outlier.

    Attributes:
        log_sd: the floor on the log scale (:data:`LOG_SD_FLOOR` by default).
        unit: the smallest difference the size itself can show, in its own units (one token at the patch level,
            :data:`PATCH_MAD_FLOOR`); the floor is then at least ``log(1 + unit / n)``, one unit at the other
            classes' typical size ``n`` (their geometric mean). 0: no such floor.
    """

    log_sd: float = LOG_SD_FLOOR
    unit: float = 0.0

    def at(self, log_mean: float) -> float:
        """The floor for other classes whose mean log size is ``log_mean``."""
        step = math.log1p(self.unit / math.exp(log_mean)) if self.unit > 0 else 0.0
        return max(self.log_sd, step)


def level_floor(mode: str) -> SpreadFloor:
    """A level's spread floor as a scan applies it: :data:`LOG_SD_FLOOR`, and at the patch level one token too
    (token counts move in whole tokens, :data:`PATCH_MAD_FLOOR`)."""
    return SpreadFloor(LOG_SD_FLOOR, PATCH_MAD_FLOOR if mode == "patch" else 0.0)


#: fewest classes with a size for either statistic (a spread needs two others besides the smallest)
MIN_CLASSES = 3
#: sizes are clamped to this before the log (a mask is a sum of sigmoids, never exactly 0)
TINY_SIZE = 1e-6


@dataclass(frozen=True)
class SizeTest:
    """The calibrated test of one level: is the smallest trigger smaller than the other classes' allow?

    Attributes:
        classes: K, the classes with a size (the smallest included).
        min_label: the class with the smallest trigger.
        log_min: the natural log of its size.
        log_mean: mean log size of the other K - 1 classes.
        log_sd: their standard deviation (ddof 1), raised to the test's :class:`SpreadFloor` when below it.
        t: (log_mean - log_min) / (log_sd · sqrt(1 + 1 / (K - 1))): how many predictive standard deviations the
            smallest class lies below the others.
        df: degrees of freedom of its null distribution (K - 2).
        p_class: P(T_df >= t): the tail probability of one class chosen in advance.
        p_value: min(1, K · p_class): the probability that a clean model of K classes shows a smallest trigger
            at least this far below the rest.
    """

    classes: int
    min_label: int
    log_min: float
    log_mean: float
    log_sd: float
    t: float
    df: int
    p_class: float
    p_value: float


@dataclass(frozen=True)
class AnomalyResult:
    """The outlier tests over one set of per-label sizes.

    Attributes:
        median: median size over labels whose inversion succeeded.
        mad: consistent MAD (×1.4826), after the floor.
        raw_mad: consistent MAD before the floor.
        min_label: label with the smallest size, None if no label succeeded.
        min_norm: its size.
        anomaly_index: (median - min_norm) / mad; 0 when no label is below the median.
        threshold: the anomaly-index threshold of Neural Cleanse's own rule.
        flagged: labels below the median whose index exceeds the threshold, most anomalous first (Neural Cleanse's
            own rule; a scan's verdict uses :attr:`test` instead, see :mod:`bdscan.detect.scan`).
        indices: per-label index (0 for labels at or above the median).
        failed: labels whose inversion never reached the success threshold (left out of both statistics).
        conclusive: False when fewer than :data:`MIN_CLASSES` labels succeeded, so no statistic can be formed.
        test: the calibrated test of the smallest size (None when not conclusive).
    """

    median: float
    mad: float
    raw_mad: float
    min_label: int | None
    min_norm: float | None
    anomaly_index: float
    threshold: float
    flagged: tuple[int, ...]
    indices: dict[int, float] = field(default_factory=dict)
    failed: tuple[int, ...] = ()
    conclusive: bool = True
    test: SizeTest | None = None

    @property
    def suspected(self) -> bool:
        """Neural Cleanse's own rule: a conclusive level with a label over the index threshold."""
        return self.conclusive and bool(self.flagged)

    @property
    def p_value(self) -> float | None:
        return self.test.p_value if self.test is not None else None


def anomaly_index_from_stats(median_: float, mad: float, norm: float) -> float:
    """(median - norm) / mad, with ``mad`` already consistent (×1.4826); lower side only."""
    if norm >= median_:
        return 0.0
    if mad <= 0:
        return float("inf")
    return (median_ - norm) / mad


def min_size_test(norms: Mapping[int, float | None], floor: SpreadFloor = SpreadFloor()) -> SizeTest | None:
    """The calibrated p-value of the smallest trigger among ``norms`` (see the module docstring).

    Args:
        norms: label -> trigger size, or None when the label's inversion never succeeded (left out: such a class
            is not small, and leaving it out only makes the test more cautious).
        floor: the least spread granted to the other classes' log sizes.

    Returns:
        :class:`SizeTest`, or None when fewer than :data:`MIN_CLASSES` labels have a size.
    """
    ok = {k: max(float(v), TINY_SIZE) for k, v in norms.items() if v is not None}
    k = len(ok)
    if k < MIN_CLASSES:
        return None
    min_label = min(ok, key=lambda lab: (ok[lab], lab))
    log_min = math.log(ok[min_label])
    others = [math.log(v) for lab, v in ok.items() if lab != min_label]
    mean_o = fmean(others)
    sd_o = max(stdev(others), floor.at(mean_o))
    # the predictive distribution of one more draw from the others' normal: its variance is σ²(1 + 1/(K-1))
    t = (mean_o - log_min) / (sd_o * math.sqrt(1.0 + 1.0 / (k - 1)))
    p_class = float(stats.t.sf(t, k - 2))
    return SizeTest(k, min_label, log_min, mean_o, sd_o, t, k - 2, p_class, min(1.0, k * p_class))


def anomaly(norms: Mapping[int, float | None], threshold: float = 2.0, mad_floor: float = 0.0,
            floor: SpreadFloor = SpreadFloor()) -> AnomalyResult:
    """Runs both outlier tests.

    Args:
        norms: label -> trigger size, or None when the label's inversion never succeeded.
        threshold: anomaly index above which Neural Cleanse's own rule flags a label.
        mad_floor: lower bound on the consistent MAD (see :data:`PATCH_MAD_FLOOR`).
        floor: the size test's least spread of the other classes' log sizes.

    Returns:
        :class:`AnomalyResult`.
    """
    ok = {k: v for k, v in norms.items() if v is not None}
    failed = tuple(sorted(k for k, v in norms.items() if v is None))
    if len(ok) < MIN_CLASSES:
        return AnomalyResult(0.0, 0.0, 0.0, None, None, 0.0, threshold, (), {}, failed, conclusive=False)
    med = float(median(ok.values()))
    raw_mad = MAD_CONSISTENCY * float(median(abs(v - med) for v in ok.values()))
    mad = max(raw_mad, mad_floor)
    indices = {k: anomaly_index_from_stats(med, mad, v) for k, v in ok.items()}
    min_label = min(ok, key=lambda k: (ok[k], k))
    flagged = tuple(sorted((k for k, a in indices.items() if a > threshold), key=lambda k: (-indices[k], k)))
    return AnomalyResult(med, mad, raw_mad, min_label, ok[min_label], indices[min_label], threshold, flagged, indices, failed,
                         test=min_size_test(ok, floor))


def level_anomaly(norms: Mapping[int, float | None], mode: str, threshold: float = 2.0,
                  floor: SpreadFloor | None = None) -> AnomalyResult:
    """:func:`anomaly` with a level's own floors, as a scan applies them: at the patch level the MAD floor of one
    token (:data:`PATCH_MAD_FLOOR`), and :func:`level_floor`'s spread floor unless ``floor`` replaces it."""
    mad_floor = PATCH_MAD_FLOOR if mode == "patch" else 0.0
    return anomaly(norms, threshold, mad_floor, level_floor(mode) if floor is None else floor)
