"""One model, one scan, one line: a quick look at one model with some fields of the budget changed.

The second argument overrides fields of the ``fast`` budget (``"dict(steps=30)"`` or ``"steps=30"``; ``"dict()"``
or ``""`` is the default scan). Runs on 1 torch thread; prints the verdict, per-mode anomaly index, smallest
class, the five smallest sizes, the median and the wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import (
    Stopwatch,
    budget_config,
    load_with_samples,
    new_parser,
    parse_overrides,
    scan,
    scan_config,
    set_threads,
    true_target,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("overrides", nargs="?", default="dict()", help="fields of the fast budget, e.g. 'dict(steps=30, batch_size=16)'")
    ap.add_argument("modes", nargs="?", default="pixel,patch", help="levels to scan (default: %(default)s)")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(1)
    over = parse_overrides(args.overrides)
    lm, data = load_with_samples(args.model)
    cfg = scan_config("fast", budget_config("fast", over), modes=tuple(args.modes.split(",")))
    with Stopwatch() as sw:
        f = scan(lm.wrapper, data, cfg)
    per_mode = {}
    for m, r in f.modes.items():
        sizes = sorted(((round(x.norm, 1) if x.norm is not None else None, x.label) for x in r.labels),
                       key=lambda z: (z[0] is None, z[0] or 0))[:5]
        per_mode[m] = (round(r.anomaly.anomaly_index, 2), r.anomaly.min_label, sizes, round(r.anomaly.median, 1))
    print(args.model.name, over, "true", true_target(lm), f.verdict.status, f.verdict.target, per_mode, f"{sw.seconds:.0f}s")
