"""Neural Cleanse's outlier test: median absolute deviation over the per-label trigger sizes.

Anomaly index of a label = (median - norm) / (1.4826 · MAD), computed on the lower side only (a
backdoor makes a target *easier* to reach, never harder); a label whose index exceeds the threshold
(default 2, i.e. > 95 % confidence under a normal assumption) is flagged (Wang et al., section IV-C).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

#: consistency constant that turns a MAD into a standard-deviation estimate for normal data
MAD_CONSISTENCY = 1.4826
#: the MAD floor used for patch-level token counts: counts move in whole tokens, and a spread of
#: less than one token between labels is not evidence of anything (it would make MAD = 0 and every
#: index infinite). One token is the smallest difference a patch trigger can make.
PATCH_MAD_FLOOR = 1.0


@dataclass(frozen=True)
class AnomalyResult:
    """The outlier test over one set of per-label sizes.

    Attributes:
        median: median size over labels whose inversion succeeded.
        mad: consistent MAD (×1.4826), after the floor.
        raw_mad: consistent MAD before the floor.
        min_label: label with the smallest size, None if no label succeeded.
        min_norm: its size.
        anomaly_index: (median - min_norm) / mad; 0 when no label is below the median.
        threshold: flagging threshold.
        flagged: labels below the median whose index exceeds the threshold, most anomalous first.
        indices: per-label index (0 for labels at or above the median).
        failed: labels whose inversion never reached the success threshold (left out of the statistic).
        conclusive: False when fewer than 3 labels succeeded, so no statistic can be formed.
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

    @property
    def suspected(self) -> bool:
        return self.conclusive and bool(self.flagged)


def anomaly_index_from_stats(median_: float, mad: float, norm: float) -> float:
    """(median - norm) / mad, with ``mad`` already consistent (×1.4826); lower side only."""
    if norm >= median_:
        return 0.0
    if mad <= 0:
        return float("inf")
    return (median_ - norm) / mad


def anomaly(norms: dict[int, float | None], threshold: float = 2.0, mad_floor: float = 0.0) -> AnomalyResult:
    """Runs the outlier test.

    Args:
        norms: label -> trigger size, or None when the label's inversion never succeeded.
        threshold: anomaly index above which a label is flagged.
        mad_floor: lower bound on the consistent MAD (see :data:`PATCH_MAD_FLOOR`).

    Returns:
        :class:`AnomalyResult`.
    """
    ok = {k: v for k, v in norms.items() if v is not None}
    failed = tuple(sorted(k for k, v in norms.items() if v is None))
    if len(ok) < 3:
        return AnomalyResult(0.0, 0.0, 0.0, None, None, 0.0, threshold, (), {}, failed, conclusive=False)
    med = float(median(ok.values()))
    raw_mad = MAD_CONSISTENCY * float(median(abs(v - med) for v in ok.values()))
    mad = max(raw_mad, mad_floor)
    indices = {k: anomaly_index_from_stats(med, mad, v) for k, v in ok.items()}
    min_label = min(ok, key=lambda k: (ok[k], k))
    flagged = tuple(sorted((k for k, a in indices.items() if a > threshold), key=lambda k: (-indices[k], k)))
    return AnomalyResult(med, mad, raw_mad, min_label, ok[min_label], indices[min_label], threshold, flagged, indices, failed)
