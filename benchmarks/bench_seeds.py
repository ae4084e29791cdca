"""Seed robustness: one model, one level, several seeds and budget variants; how stable is the anomaly index?

Usage:
    python benchmarks/bench_seeds.py MODEL [--level pixel|patch] [--seeds 0 1 2] [--budget fast]
                                     [--set "batch_size=4,batches_per_step=4" ...] [--threads 1]
                                     [--out benchmarks/results/seeds.json]

A scan's seed sets the mask and pattern initialisation and the mini-batch order. A verdict that changes with
the seed was luck, so a budget is judged here by the spread of its anomaly index over seeds, and by how far
its trigger sizes are from converged (the median size of the non-target classes: smaller is closer to what
Neural Cleanse's own schedule reaches; benchmarks/README.md compares them). Each ``--set`` is one variant
(overrides of the budget's fields; an empty string is the budget itself). Results are appended to ``--out``
(resumable: a variant and seed already there is not run again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_detect import overrides

from bdscan.data import load_clean_data
from bdscan.detect.config import budget
from bdscan.detect.scan import ScanConfig, scan
from bdscan.io import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--level", default="pixel", choices=["pixel", "patch"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", default="fast")
    ap.add_argument("--set", dest="sets", nargs="*", default=[""], help="budget overrides per variant, e.g. 'lr=0.2'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/seeds.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    info = lm.wrapper.info
    data = load_clean_data(args.model.parent / info.metadata["samples"], info.input_size, info.num_classes, info.class_names)
    target = lm.original_trigger.target if lm.original_trigger else None
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    model_hash = hashlib.sha256(args.model.read_bytes()).hexdigest()[:16]
    for spec in args.sets:
        for seed in args.seeds:
            key = {"model": args.model.name, "model_sha256_16": model_hash, "level": args.level, "budget": args.budget,
                   "set": spec, "seed": seed, "threads": args.threads}
            if any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"]):
                continue
            cfg = ScanConfig(modes=(args.level,), budget=args.budget, inversion=budget(args.budget).with_(seed=seed, **overrides(spec)))
            t = time.perf_counter()
            mr = scan(lm.wrapper, data, cfg).modes[args.level]
            secs = time.perf_counter() - t
            norms = {r.label: r.norm for r in mr.labels}
            others = [v for k, v in norms.items() if k != target and v is not None]
            row = key | {
                "anomaly_index": round(mr.anomaly.anomaly_index, 2), "min_label": mr.anomaly.min_label, "true_target": target,
                "target_size": None if target is None or norms.get(target) is None else round(norms[target], 1),
                "median_size_others": round(statistics.median(others), 1) if others else None,
                "seconds": round(secs, 1), "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
            }
            doc["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| model | level | budget | variant | seed | anomaly index | smallest class | target size | median size of others | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in doc["rows"]:
        print(f"| {r['model']} | {r['level']} | {r['budget']} | {r['set'] or '(as is)'} | {r['seed']} | {r['anomaly_index']} | "
              f"{r['min_label']} | {r['target_size']} | {r['median_size_others']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
