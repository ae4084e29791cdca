"""Forward+backward throughput of a model by images per forward: the measurement behind the label chunk.

Usage:
    python benchmarks/bench_throughput.py MODEL [MODEL ...] [--threads 2] [--sizes 16 32 64 128 256]
                                          [--bf16] [--channels-last] [--train-mode-grads]
                                          [--fp32-matmul-bf16]

Gradients flow to the input only (as in trigger inversion), weights frozen unless ``--train-mode-grads``.
Each size runs 4 times; the best of the last 3 is printed in images per second.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bdscan.io import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--train-mode-grads", action="store_true", help="leave weight gradients on")
    ap.add_argument("--fp32-matmul-bf16", action="store_true",
                    help="let float32 matrix products and convolutions use bf16 inside (torch's 'medium' "
                         "matmul precision and oneDNN's fp32_precision='bf16'); the tensors stay float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
            ts = []
            for _ in range(4):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
                t = time.perf_counter()
                with ctx:
                    out = m(x)
                out.float().sum().backward()
                ts.append(time.perf_counter() - t)
            row.append(f"{bs}: {bs / min(ts[1:]):.0f}")
        print(f"{path} ({args.threads} threads{', bf16' if args.bf16 else ''}{', channels-last' if args.channels_last else ''}"
              f"{', fp32 matmul in bf16' if args.fp32_matmul_bf16 else ''}): "
              + ", ".join(row) + " images/s", flush=True)


if __name__ == "__main__":
    main()
