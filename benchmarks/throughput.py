"""Forward+backward throughput of a model by images per forward: the measurement behind the label chunk.

Gradients flow to the input only (as in trigger inversion), weights frozen unless ``--train-mode-grads``.
Each size runs 4 times; the best of the last 3 is printed in images per second.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import add_threads, best_seconds, load_model, new_parser, set_threads


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("models", nargs="+")
    add_threads(ap, 2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="images per forward")
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--train-mode-grads", action="store_true", help="leave weight gradients on")
    ap.add_argument("--fp32-matmul-bf16", action="store_true",
                    help="let float32 matrix products and convolutions use bf16 inside (torch's 'medium' "
                         "matmul precision and oneDNN's fp32_precision='bf16'); the tensors stay float32")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.fp32_matmul_bf16:
        torch.set_float32_matmul_precision("medium")
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    for path in args.models:
        m = load_model(path).wrapper.eval()
        m.requires_grad_(args.train_mode_grads)
        if args.channels_last:
            m = m.to(memory_format=torch.channels_last)
        row = []
        for bs in args.sizes:
            x = torch.rand(bs, 3, 32, 32)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)

            def step(x: torch.Tensor = x, m: torch.nn.Module = m) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext():
                    out = m(x)
                out.float().sum().backward()

            row.append(f"{bs}: {bs / best_seconds(step, rounds=3):.0f}")
        print(f"{path} ({args.threads} threads{', bf16' if args.bf16 else ''}{', channels-last' if args.channels_last else ''}"
              f"{', fp32 matmul in bf16' if args.fp32_matmul_bf16 else ''}): "
              + ", ".join(row) + " images/s", flush=True)
