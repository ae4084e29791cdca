"""Detection quality over the sample zoo: pixel and patch anomaly index, target found, true target, time.

Usage:
    python benchmarks/bench_detect.py [--manifest sample_models/zoo.json] [--budget fast] [--only NAME ...]
                                      [--out benchmarks/results/detect.json] [--threads 2]

Each model is scanned with the default scan (both levels) on its bundled clean samples, exactly as
``bdscan scan MODEL`` would. Prints a Markdown table (pasted into benchmarks/README.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bdscan.data import load_clean_data
from bdscan.detect.config import budget
from bdscan.detect.scan import ScanConfig, scan
from bdscan.io import load_model


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.processor() or 'cpu'}"


def overrides(spec: str) -> dict[str, int | float | str]:
    """Budget field overrides from ``'steps=20,lr=0.2,precision=bf16'`` (integers stay integers, words words)."""
    return {k: _value(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}


def _value(v: str) -> int | float | str:
    if v.isdigit():
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, default=Path("sample_models/zoo.json"))
    ap.add_argument("--budget", default="fast")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detect.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="", help="budget overrides, e.g. 'steps=20,batches_per_step=1'")
    ap.add_argument("--histories", action="store_true", help="also store every label's best size per step (for bench_schedule.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    entries = json.loads(args.manifest.read_text())
    over = overrides(args.set)
    rows: list[dict] = []
    if args.out.exists():  # resumable: a long run over the zoo survives interruptions
        prev = json.loads(args.out.read_text())
        if prev.get("budget") == args.budget and prev.get("set") == args.set:
            rows = prev["rows"]
    done = {r["model"] for r in rows}
    for e in entries:
        if e["name"] in done:
            continue
        f = args.manifest.parent / e["file"]
        if (args.only and e["name"] not in args.only) or not f.exists():
            continue
        lm = load_model(f)
        info = lm.wrapper.info
        data = load_clean_data(args.manifest.parent / info.metadata["samples"], info.input_size, info.num_classes, info.class_names)
        cfg = ScanConfig(budget=args.budget, inversion=budget(args.budget).with_(seed=args.seed, **over))
        t = time.perf_counter()
        fd = scan(lm.wrapper, data, cfg)
        secs = time.perf_counter() - t
        row = {"model": e["name"], "arch": info.arch, "kind": e["kind"], "true_target": e.get("target"),
               "verdict": fd.verdict.status, "verdict_target": fd.verdict.target, "basis": fd.verdict.basis, "seconds": round(secs, 1)}
        for m, r in fd.modes.items():
            row[f"{m}_ai"] = round(r.anomaly.anomaly_index, 2)
            row[f"{m}_min_label"] = r.anomaly.min_label
            row[f"{m}_flagged"] = list(r.anomaly.flagged)
            if args.histories:
                row.setdefault("histories", {})[m] = {p: {str(k): h for k, h in hs.items()} for p, hs in r.histories.items()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "histories"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "budget": args.budget, "set": args.set, "rows": rows}, indent=1) + "\n")
    print(f"\nmachine: {machine()}; budget {args.budget}\n")
    print("| model | kind | true target | pixel AI | pixel min class | patch AI | patch min class | verdict | target | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['kind']} | {r['true_target'] if r['true_target'] is not None else '-'} | {r.get('pixel_ai', '-')} | "
              f"{r.get('pixel_min_label', '-')} | {r.get('patch_ai', '-')} | {r.get('patch_min_label', '-')} | {r['verdict']} | "
              f"{r['verdict_target'] if r['verdict_target'] is not None else '-'} | {r['seconds']} |")


if __name__ == "__main__":
    main()
