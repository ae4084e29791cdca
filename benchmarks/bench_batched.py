"""Batched versus label-by-label inversion: same per-label results, wall time of each.

Usage: python benchmarks/bench_batched.py MODEL [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bdscan.data import load_clean_data
from bdscan.detect.config import budget
from bdscan.detect.inversion import invert
from bdscan.detect.params import PixelTrigger
from bdscan.io import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    info = lm.wrapper.info
    data = load_clean_data(Path(args.model).parent / info.metadata["samples"], info.input_size, info.num_classes, info.class_names)
    cfg = budget("fast").with_(steps=args.steps, early_stop=False)
    labels = list(range(info.num_classes))
    times, results = {}, {}
    for name, c in (("batched", cfg), ("sequential", cfg.with_(batched=False))):
        t = time.perf_counter()
        results[name] = invert(lm.wrapper, data, PixelTrigger(*info.input_size[1:]), labels, c)
        times[name] = time.perf_counter() - t
    diff = max(abs((a.norm or 0) - (b.norm or 0)) for a, b in zip(results["batched"].labels, results["sequential"].labels, strict=True))
    print(f"{Path(args.model).name}: {len(labels)} labels x {args.steps} steps, {args.threads} threads: batched {times['batched']:.1f} s, "
          f"sequential {times['sequential']:.1f} s ({times['sequential'] / times['batched']:.2f}x); max |norm difference| {diff:.2e}")


if __name__ == "__main__":
    main()
