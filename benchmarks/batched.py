"""Batched versus label-by-label inversion: the same per-label results, the wall time of each.

Every label runs ``--steps`` steps of the ``fast`` budget at the pixel level (early stopping off, so both runs do
the same work), once with the labels batched and once label by label as Neural Cleanse does; prints both wall
times and the largest difference between their per-label sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import Stopwatch, add_threads, budget_config, invert, load_with_samples, new_parser, set_threads, trigger_param


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=10)
    add_threads(ap, 2)
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    lm, data = load_with_samples(args.model)
    cfg = budget_config("fast", steps=args.steps, early_stop=False)
    labels = list(range(lm.wrapper.info.num_classes))
    times, results = {}, {}
    for name, c in (("batched", cfg), ("sequential", cfg.with_(batched=False))):
        with Stopwatch() as sw:
            results[name] = invert(lm.wrapper, data, trigger_param(lm.wrapper, "pixel"), labels, c)
        times[name] = sw.seconds
    diff = max(abs((a.norm or 0) - (b.norm or 0)) for a, b in zip(results["batched"].labels, results["sequential"].labels, strict=True))
    print(f"{Path(args.model).name}: {len(labels)} labels x {args.steps} steps, {args.threads} threads: batched {times['batched']:.1f} s, "
          f"sequential {times['sequential']:.1f} s ({times['sequential'] / times['batched']:.2f}x); max |norm difference| {diff:.2e}")
