"""Where an inversion's time goes: torch.profiler around the real batched loop, not the model alone.

Runs ``fast``'s schedule in float32 on every label for ``--steps`` steps (early stopping off, so every label
runs every step), after a one-step warm-up, and prints the operators by their own CPU time. The sample images
are the ones the model's metadata names (``*_samples.npz`` beside it); the trigger is the first one a
default scan inverts at ``--level``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Stopwatch, add_threads, budget_config, invert, load_with_samples, new_parser, set_threads, trigger_param


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model")
    ap.add_argument("--level", choices=("pixel", "patch"), default="pixel")
    ap.add_argument("--steps", type=int, default=3)
    add_threads(ap, 1)
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    lm, data = load_with_samples(args.levell)
    w = lm.wrapper
    param = trigger_param(w, args.level)
    labels = range(w.num_classes)
    cfg = budget_config("fast", steps=args.steps, early_stop=False, precision="fp32")
    invert(w, data, param, labels, cfg.with_(steps=1))  # warm-up: first-call allocations and oneDNN primitives
    with Stopwatch() as sw, profile(activities=[ProfilerActivity.CPU]) as prof:
        res = invert(w, data, param, labels, cfg)
    images = w.num_classes * args.steps * cfg.resolved_batches_per_step(res.samples_used) * cfg.batch_size
    print(f"{Path(args.levell).name} {args.level} level, {args.threads} thread(s): {sw.seconds:.2f} s under the profiler, "
          f"{images / sw.seconds:.0f} images/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
