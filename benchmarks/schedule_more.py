"""More replays of recorded scans (see ``schedule``): per-level step budgets, a plateau early stop, and a
two-stage schedule whose stopped labels are extrapolated instead of kept as they were.

Every replay is exact for what it replays (a label's best size after step ``s`` is what an ``s``-step run
reports, and each rule below only looks at a label's own history), except that the two-stage rule's
extrapolated sizes are estimates by construction. Prints one line per schedule: right verdicts of the
recorded models and the work relative to the recording.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from benchmarks.common import at, is_right, judge, load_rows, new_parser


def plateau_stop(h: list[float | None], steps: int, patience: int | None, factor: float) -> int:
    """Steps a label runs when it stops after ``patience`` steps without its best size falling below
    ``factor`` × the best so far (None: no plateau stop), at most ``steps``."""
    n = min(steps, len(h))
    if patience is None:
        return n
    ref, since = None, 0
    for s in range(1, n + 1):
        v = h[s - 1]
        if v is None:
            continue
        if ref is None or v < factor * ref:
            ref, since = v, 0
        else:
            since += 1
            if since >= patience:
                return s
    return n


def two_stage(hs: dict[str, list], s1: int, frac: float, every: int, full: int = 30) -> tuple[dict[int, float | None], int]:
    """Every label runs ``s1`` steps; the lowest ``frac`` and every ``every``-th of the rest (by size after ``s1``)
    run to ``full``; a stopped label's size is its size after ``s1`` times the median shrink (full / s1) of the
    every-``every``-th labels that ran on. Returns sizes and work in label-steps."""
    labs = sorted(hs, key=int)
    size1 = {k: at(hs[k], s1) for k in labs}
    order = sorted(labs, key=lambda k: (size1[k] is None, size1[k] or 0.0))
    ncand = max(3, math.ceil(frac * len(labs)))
    sample = set(order[ncand::every])
    cont = set(order[:ncand]) | sample
    ratios = [at(hs[k], full) / size1[k] for k in sample if size1[k] and at(hs[k], full)]
    shrink = statistics.median(ratios) if ratios else 1.0
    sizes: dict[int, float | None] = {}
    work = 0
    for k in labs:
        if k in cont:
            sizes[int(k)] = at(hs[k], full)
            work += min(full, len(hs[k]))
        else:
            sizes[int(k)] = size1[k] * shrink if size1[k] is not None else None
            work += min(s1, len(hs[k]))
    return sizes, work


def evaluate(rows: list[dict], sizes_of) -> tuple[int, float]:
    """Right verdicts and relative work when ``sizes_of(mode, histories) -> (sizes, work)``."""
    right, work, full = 0, 0, 0
    for r in rows:
        sizes = {}
        for mode, per_param in r["histories"].items():
            hs = next(iter(per_param.values()))
            sizes[mode], w = sizes_of(mode, hs)
            work += w
            full += sum(len(h) for h in hs.values())
        right += is_right(judge(sizes)[1], r)
    return right, work / full


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("results", type=Path, nargs="+", help="`detect --histories` outputs (rows are merged)")
    ap.add_argument("--sweep", default="1", help="CNN patch grids to keep (as `schedule --sweep`)")
    return ap


def run(args: argparse.Namespace) -> None:
    rows = load_rows(args.results, args.sweep)
    n = len(rows)

    def stepped(rules: dict[str, tuple[int, int | None, float]]):
        def f(mode: str, hs: dict[str, list]) -> tuple[dict[int, float | None], int]:
            steps = {k: plateau_stop(h, *rules[mode]) for k, h in hs.items()}
            return {int(k): (h[steps[k] - 1] if h else None) for k, h in hs.items()}, sum(steps.values())
        return f

    print(f"{n} recorded models\n\nper-level steps (pixel, patch): right verdicts, work")
    for sp in (30, 25, 20):
        for sq in (30, 25, 20, 15, 10):
            r, w = evaluate(rows, stepped({"pixel": (sp, None, 1.0), "patch": (sq, None, 1.0)}))
            print(f"  pixel {sp:2d}, patch {sq:2d}: {r}/{n}, {w:.2f}")
    print("\nplateau stop (patience, factor), both levels, at most 30 steps")
    for pat in (3, 4, 5, 6, 8, 10):
        for fac in (0.99, 0.97, 0.95):
            r, w = evaluate(rows, stepped({"pixel": (30, pat, fac), "patch": (30, pat, fac)}))
            print(f"  {pat:2d}, {fac}: {r}/{n}, {w:.2f}")
    print("\ntwo stages with extrapolated sizes (s1, lowest share, every k-th of the rest)")
    for s1 in (5, 8, 10, 12, 15):
        for frac in (0.1, 0.15, 0.25):
            for every in (2, 3, 4, 6):
                r, w = evaluate(rows, lambda mode, hs, a=(s1, frac, every): two_stage(hs, *a))
                print(f"  {s1:2d}, {frac}, {every}: {r}/{n}, {w:.2f}")

