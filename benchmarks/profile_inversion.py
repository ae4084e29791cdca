"""Where an inversion's time goes: torch.profiler around the real batched loop, not the model alone.

Usage:
    python benchmarks/profile_inversion.py MODEL [--mode pixel|patch] [--steps 3] [--threads 1] [--rows 25]

Runs ``fast``'s schedule in float32 on every label for ``--steps`` steps (early stopping off, so every label
runs every step), after a one-step warm-up, and prints the operators by their own CPU time. The sample images
are the ones the model's metadata names (``sample_models/*_samples.npz``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bdscan.data import load_clean_data
from bdscan.detect.config import BUDGETS
from bdscan.detect.inversion import invert
from bdscan.detect.scan import ScanConfig, params_for
from bdscan.io import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mode", choices=("pixel", "patch"), default="pixel")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    w, info = lm.wrapper, lm.wrapper.info
    data = load_clean_data(Path(args.model).parent / info.metadata["samples"], info.input_size, info.num_classes,
                           info.class_names)
    scan_defaults = ScanConfig()  # the CNN patch grid the default scan uses, not a copy of it
    param = params_for(w, args.mode, scan_defaults.cnn_patch_sizes, scan_defaults.cnn_patch_offsets)[0]
    labels = range(w.num_classes)
    cfg = BUDGETS["fast"].with_(steps=args.steps, early_stop=False, precision="fp32")
    invert(w, data, param, labels, cfg.with_(steps=1))  # warm-up: first-call allocations and oneDNN primitives
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = invert(w, data, param, labels, cfg)
    wall = time.perf_counter() - t
    images = w.num_classes * args.steps * cfg.resolved_batches_per_step(res.samples_used) * cfg.batch_size
    print(f"{Path(args.model).name} {args.mode} level, {args.threads} thread(s): {wall:.2f} s under the profiler, "
          f"{images / wall:.0f} images/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
