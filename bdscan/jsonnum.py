"""One rule for numbers in bdscan's JSON documents (scan, study, repair): rounded, never NaN or infinity.

JSON has neither, and ``json.dumps`` would write them as invalid tokens. ``None`` stands for "no value" (NaN
included); an infinity becomes ±1e9, a value no statistic bdscan reports reaches (an anomaly index is infinite
when the MAD is 0 and the class lies below the median, and renderers show 1e9 as "∞").
"""

from __future__ import annotations

import math

#: what an infinity is written as
JSON_INFINITY = 1e9


def json_number(x: float | None, nd: int = 6) -> float | None:
    """``x`` rounded to ``nd`` decimals; None for None and NaN; ±:data:`JSON_INFINITY` for infinities."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return JSON_INFINITY if x > 0 else -JSON_INFINITY
    return round(x, nd)
