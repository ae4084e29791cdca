"""Speed: the default scan against Neural Cleanse's original schedule, on the same model, data and machine.

Usage:
    python benchmarks/bench_speed.py MODEL [MODEL ...] [--labels-sample 5] [--full-original] [--threads 2]
                                     [--budget fast] [--precision auto|fp32|bf16] [--device cpu|cuda]
                                     [--out benchmarks/results/speed.json]

For each model, in one run:
* the bdscan scan (``--mode both``, labels batched) with ``--budget`` (default ``fast``, the scan's default);
* the original schedule (budget ``original``: 1000 samples, batch 32, up to 1000 epochs, early stop 25), run
  label by label as the original does, at the pixel level. The original takes hours on a CPU, so by default it
  runs on a sample of ``--labels-sample`` labels (the true target among them) and its wall time is extrapolated
  per label to all labels; the output says so. ``--full-original`` runs every label (then the verdict and target
  of the original schedule are real, not extrapolated). A cached full run of a model is used in preference to
  a sampled one.
* ``--precision`` overrides the bdscan scan's precision (default: the budget's, ``auto``); the original
  schedule always runs in float32, as Neural Cleanse does.
Each measurement runs in its own subprocess so peak memory (max RSS) is per measurement.

The original schedule's measurements are kept in ``--original-cache`` (keyed by model file hash, labels,
threads and device) so that hours of CPU are not spent twice; ``--original-only`` fills the cache without
the default scan. Every measurement records when it ran and the load average, and the output names cached
rows, so a reader knows which numbers come from the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def child(model: str, which: str, labels: list[int] | None, threads: int, device: str, budget_name: str = "fast",
          precision: str = "-") -> dict:
    """Runs one measurement in this process (called through a subprocess)."""
    torch.set_num_threads(threads)
    from bdscan.data import load_clean_data
    from bdscan.detect.config import budget
    from bdscan.detect.scan import ScanConfig, scan
    from bdscan.io import load_model

    lm = load_model(model)
    info = lm.wrapper.info
    data = load_clean_data(Path(model).parent / info.metadata["samples"], info.input_size, info.num_classes, info.class_names)
    if which == "default":
        inv = budget(budget_name)
        cfg = ScanConfig(budget=budget_name, inversion=inv.with_(precision=precision) if precision != "-" else inv, device=device)
    else:
        cfg = ScanConfig(modes=("pixel",), budget="original", inversion=budget("original").with_(batched=False),
                         labels=tuple(labels) if labels else None, device=device)
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    f = scan(lm.wrapper, data, cfg)
    secs = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_label = {m: {r.label: {"norm": r.norm, "steps": r.steps} for r in mr.labels} for m, mr in f.modes.items()}
    return {"which": which, "budget": cfg.budget, "seconds": secs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2), "per_label": per_label,
            "labels": len(cfg.labels) if cfg.labels else info.num_classes,
            "num_classes": info.num_classes, "peak_rss_mb": round(rss_mb), "verdict": f.verdict.status,
            "target": f.verdict.target, "true_target": lm.original_trigger.target if lm.original_trigger else None,
            "ai": {m: round(r.anomaly.anomaly_index, 2) for m, r in f.modes.items()}, "precision": f.config.inversion.precision,
            "min_label": {m: r.anomaly.min_label for m, r in f.modes.items()}}


def run_child(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--labels-sample", type=int, default=5)
    ap.add_argument("--full-original", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    ap.add_argument("--original-cache", type=Path, default=Path("benchmarks/results/speed_original.json"))
    ap.add_argument("--original-only", action="store_true", help="only measure (and cache) the original schedule")
    ap.add_argument("--budget", default="fast", help="budget of the bdscan scan measured against the original (default: the default)")
    ap.add_argument("--precision", default="-", help="precision of the bdscan scan (default: the budget's)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, which, labels, threads, device, budget_name, precision = args.child
        lab = [int(v) for v in labels.split(",")] if labels != "-" else None
        print(json.dumps(child(model, which, lab, int(threads), device, budget_name, precision)))
        return
    from bdscan.report.json_report import versions

    # the host's vector instructions and bf16, as every scan report records them
    host = versions()
    rows = []
    for m in args.models:
        from bdscan.io import load_model

        lm = load_model(m)
        k = lm.wrapper.num_classes
        target = lm.original_trigger.target if lm.original_trigger else 0
        cache = json.loads(args.original_cache.read_text()) if args.original_cache.exists() else {}
        digest = hashlib.sha256(Path(m).read_bytes()).hexdigest()[:16]
        # the host's vector instructions are part of the key: the project's machine is not always the same host
        # (AVX-512 with bf16 on some days, AVX2 only on others), and the original's seconds differ between them
        cpu = host["cpu_capability"]
        full_key = f"{digest}|-|{args.threads}|{args.device}|{cpu}"
        if args.full_original or full_key in cache:  # a real full run beats an extrapolated sample
            labels = "-"
        else:
            others = [c for c in range(k) if c != target][: args.labels_sample - 1]
            labels = ",".join(map(str, sorted([target, *others])))
        key = f"{digest}|{labels}|{args.threads}|{args.device}|{cpu}"
        if key in cache:
            o = cache[key] | {"cached": True}
        else:
            o = run_child(m, "original", labels, str(args.threads), args.device, "original", "-")
            cache[key] = o
            args.original_cache.parent.mkdir(parents=True, exist_ok=True)
            args.original_cache.write_text(json.dumps(cache, indent=1) + "\n")
        print(json.dumps({"model": m, "original": {k: v for k, v in o.items() if k != "per_label"}}), flush=True)
        if args.original_only:
            continue
        d = run_child(m, "default", "-", str(args.threads), args.device, args.budget, args.precision)
        per_label = o["seconds"] / o["labels"]
        orig_full = per_label * k
        row = {"model": Path(m).name, "classes": k, "default": d, "original": o,
               "original_extrapolated": labels != "-", "original_seconds_all_labels": round(orig_full, 1),
               "speedup": round(orig_full / d["seconds"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.original_only:
        return
    precision = args.precision if args.precision != "-" else "the budget's"
    machine = (f"{platform.machine()} ({host['cpu_capability']}, bf16 {host['cpu_bf16']}), {args.threads} torch "
               f"threads, torch {torch.__version__}, device {args.device}, "
               f"budget {args.budget}, precision {precision}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"\nmachine: {machine}\n")
    print("| model | classes | default scan s | precision | default verdict (target) | default peak MB | original s (all labels) | "
          "original verdict (target) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        d, o = r["default"], r["original"]
        ext = f" (extrapolated from {o['labels']} labels)" if r["original_extrapolated"] else ""
        ov = "n/a (label sample)" if r["original_extrapolated"] else f"{o['verdict']} ({o['target']})"
        print(f"| {r['model']} | {r['classes']} | {d['seconds']:.0f} | {d.get('precision', 'fp32')} | {d['verdict']} ({d['target']}) | "
              f"{d['peak_rss_mb']} | "
              f"{r['original_seconds_all_labels']:.0f}{ext} | {ov} | {r['speedup']}× |")


if __name__ == "__main__":
    main()
