"""Confidence intervals for a repair's before/after measurements, computed by hand (no statistics package).

A repair is measured on a few dozen held-out images, so every rate it reports is uncertain by several points;
these intervals say by how much, and the repair's checks (:func:`bdscan.repair.core.judge`) are judged against
them.

* :func:`wilson`: the Wilson score interval of one proportion (Wilson 1927; recommended over the normal
  approximation by Brown, Cai & DasGupta 2001): clean accuracy before or after, attack success before or after.
* :func:`paired_difference`: Newcombe's hybrid score interval for the difference of two proportions measured on
  the **same** images (Newcombe 1998, "Improved confidence intervals for the difference between binomial
  proportions based on paired data", Statistics in Medicine 17; in the form of Altman et al., "Statistics with
  Confidence", 2000, and Fagerland, Lydersen & Laake 2017, section 8.5, with the correlation's continuity
  correction, which tests check against the latter's worked example). Accuracy before and after a repair
  are measured on the same held-out images, so their difference is judged from the images whose answer changed,
  which is far tighter than comparing two independent intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: two-sided 95 % (the standard normal's 97.5 % quantile)
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials; ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # exact at the ends: 0 successes gives a lower bound of 0, n successes an upper bound of 1
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class PairedCounts:
    """The 2×2 table of one yes/no outcome (e.g. "classified correctly") on the same images before and after.

    Attributes:
        both: yes before and after.
        lost: yes before, no after.
        gained: no before, yes after.
        neither: no before and after.
    """

    both: int
    lost: int
    gained: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.lost + self.gained + self.neither


def paired_difference(t: PairedCounts, z: float = Z95) -> tuple[float, float]:
    """Newcombe's square-and-add interval for ``p_before - p_after`` on paired outcomes.

    With ``p1 = (both + lost) / n`` before, ``p2 = (both + gained) / n`` after and their Wilson intervals
    ``(l1, u1)``, ``(l2, u2)``, the difference ``d = p1 - p2`` has the interval
    ``(d - sqrt((p1-l1)² - 2φ(p1-l1)(u2-p2) + (u2-p2)²), d + sqrt((u1-p1)² - 2φ(u1-p1)(p2-l2) + (p2-l2)²))``,
    where ``φ`` is the correlation of the 2×2 table with a continuity correction: with
    ``A = both·neither - lost·gained``, ``φ = (A - n/2)/√(margins)`` when ``A > n/2``, 0 when ``0 ≤ A ≤ n/2``,
    ``A/√(margins)`` when ``A < 0``, and 0 when a margin is empty.

    Returns:
        ``(lower, upper)`` of the drop ``p_before - p_after``, within [-1, 1]; ``(-1, 1)`` for no images.
    """
    n = t.n
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (t.both + t.lost) / n, (t.both + t.gained) / n
    l1, u1 = wilson(t.both + t.lost, n, z)
    l2, u2 = wilson(t.both + t.gained, n, z)
    margins = (t.both + t.lost) * (t.gained + t.neither) * (t.both + t.gained) * (t.lost + t.neither)
    a = t.both * t.neither - t.lost * t.gained
    phi = 0.0
    if margins > 0:
        phi = (a - n / 2) / math.sqrt(margins) if a > n / 2 else (a / math.sqrt(margins) if a < 0 else 0.0)
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)
