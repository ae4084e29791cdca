"""One model, one scan, one line: the script behind the single-model rows of benchmarks/README.md.

Usage: python benchmarks/scan_one.py MODEL "dict(steps=30)" pixel,patch
(the second argument overrides fields of the ``fast`` budget; ``"dict()"`` = the default scan).
Runs on 1 torch thread; prints the verdict, per-mode anomaly index, smallest class, the five smallest sizes,
the median and the wall time.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import torch

from bdscan.data import load_clean_data
from bdscan.detect.config import BUDGETS
from bdscan.detect.scan import ScanConfig, scan
from bdscan.io import load_model


def main() -> None:
    torch.set_num_threads(1)
    model, over_src, modes_src = sys.argv[1], sys.argv[2], sys.argv[3]
    # "dict(steps=30, batch_size=16)" -> {"steps": 30, "batch_size": 16}
    inner = over_src.strip()[len("dict("):-1]
    over = {k.strip(): ast.literal_eval(v.strip()) for k, v in (kv.split("=") for kv in inner.split(",") if kv.strip())}
    modes = tuple(modes_src.split(","))
    lm = load_model(model)
    info = lm.wrapper.info
    data = load_clean_data(Path(model).parent / info.metadata["samples"], info.input_size, info.num_classes, info.class_names)
    cfg = ScanConfig(modes=modes, inversion=BUDGETS["fast"].with_(**over))
    t = time.time()
    f = scan(lm.wrapper, data, cfg)
    per_mode = {}
    for m, r in f.modes.items():
        sizes = sorted(((round(x.norm, 1) if x.norm is not None else None, x.label) for x in r.labels),
                       key=lambda z: (z[0] is None, z[0] or 0))[:5]
        per_mode[m] = (round(r.anomaly.anomaly_index, 2), r.anomaly.min_label, sizes, round(r.anomaly.median, 1))
    true = lm.original_trigger.target if lm.original_trigger else None
    print(Path(model).name, over, "true", true, f.verdict.status, f.verdict.target, per_mode, f"{time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
