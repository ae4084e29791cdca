"""Speed: a bdscan scan against Neural Cleanse's original schedule, on the same model, data and machine.

For each model, in one run:

* the bdscan scan (both levels, labels batched) with ``--budget`` (default ``fast``, the scan's default);
  ``--precision`` overrides its precision (default: the budget's, ``auto``); then the scan's other default detectors
  (neuron noise, which says "not applicable" at once on a model without a LayerNorm), each timed on its own: the
  default scan's seconds are their sum;
* the original schedule (budget ``original``: 1000 samples, batch 32, up to 1000 epochs, early stop 25), run
  label by label as the original does, at the pixel level, always in float32 as Neural Cleanse does. It takes
  hours on a CPU, so by default it runs on a sample of ``--labels-sample`` labels (the true target among them)
  and its wall time is extrapolated per label to all labels; the output says so. ``--full-original`` runs
  every label (then the original's verdict and target are real, not extrapolated). A cached full run of a
  model is used in preference to a sampled one.

Each measurement runs in its own subprocess so peak memory (max RSS) is per measurement.

The original schedule's measurements are kept in ``--original-cache`` (keyed by model file hash, labels,
threads, device and the CPU's vector capability) so that hours of CPU are not spent twice; ``--original-only``
fills the cache without the bdscan scan. Every measurement records when it ran and the load average, and the
output names cached rows, so a reader knows which numbers come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from dataclasses import astuple
from pathlib import Path

from benchmarks.common import (
    DEFAULT_DETECTORS,
    DETECTORS,
    RESULTS,
    ScanSettings,
    Stopwatch,
    add_budget,
    add_out,
    add_threads,
    budget_config,
    load_model,
    load_with_samples,
    machine_line,
    new_parser,
    print_row,
    read_json,
    run_benchmark,
    scan,
    scan_config,
    set_threads,
    sha16,
    table_header,
    true_target,
    utc_now,
    versions,
    write_json,
)


def child(model: str, which: str, labels: list[int] | None, threads: int, device: str, budget_name: str = "fast",
          precision: str = "-", second_look: str = "auto") -> dict:
    """Runs one measurement in this process (called through a subprocess)."""
    set_threads(threads)
    lm, data = load_with_samples(model)
    info = lm.wrapper.info
    if which == "default":
        inv = budget_config(budget_name, precision=precision) if precision != "-" else budget_config(budget_name)
        # "off": one look at the budget's steps, what a two-look scan in doubt costs at most
        cfg = scan_config(budget_name, inv, device=device, **({"second_look": None} if second_look == "off" else {}))
    else:
        cfg = scan_config("original", budget_config("original", batched=False), modes=("pixel",),
                          labels=tuple(labels) if labels else None, device=device)
    load_before = os.getloadavg()[0]
    with Stopwatch() as sw:
        f = scan(lm.wrapper, data, cfg)
    seconds = {"neural-cleanse": sw.seconds}
    others: dict[str, dict] = {}
    if which == "default":
        settings = ScanSettings(budget=budget_name, seed=cfg.inversion.seed, device=device)
        for name in DEFAULT_DETECTORS:
            if name == "neural-cleanse":
                continue
            det = DETECTORS[name]
            with Stopwatch() as ds:
                res = det.detect(lm.wrapper, data, det.configure(settings))
            seconds[name] = ds.seconds
            others[name] = {"status": res.evidence.status, "target": res.evidence.target, "p": res.evidence.p_value}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_label = {m: {r.label: {"norm": r.norm, "steps": r.steps} for r in mr.labels} for m, mr in f.modes.items()}
    return {"which": which, "budget": cfg.budget, "seconds": sum(seconds.values()), "detector_seconds": seconds,
            "other_detectors": others, "measured_at": utc_now(),
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2), "per_label": per_label,
            "labels": len(cfg.labels) if cfg.labels else info.num_classes,
            "num_classes": info.num_classes, "peak_rss_mb": round(rss_mb), "verdict": f.verdict.status,
            "target": f.verdict.target, "true_target": true_target(lm), "looks": f.verdict.looks,
            "second_look": None if f.config.second_look is None else list(astuple(f.config.second_look)),
            "ai": {m: round(r.anomaly.anomaly_index, 2) for m, r in f.modes.items()}, "precision": f.config.inversion.precision,
            "min_label": {m: r.anomaly.min_label for m, r in f.modes.items()}}


def run_child(*args: str) -> dict:
    p = run_benchmark("speed", "--child", *args)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--labels-sample", type=int, default=5, help="labels the original runs on, the target among them")
    ap.add_argument("--full-original", action="store_true", help="run the original on every label")
    add_threads(ap, 2)
    ap.add_argument("--device", default="cpu")
    add_out(ap, "speed.json")
    ap.add_argument("--original-cache", type=Path, default=RESULTS / "speed_original.json",
                    help="the original schedule's runs (default: benchmarks/results/speed_original.json)")
    ap.add_argument("--original-only", action="store_true", help="only measure (and cache) the original schedule")
    add_budget(ap, help="budget of the bdscan scan measured against the original")
    ap.add_argument("--precision", default="-", help="precision of the bdscan scan (default: the budget's)")
    ap.add_argument("--second-look", choices=("auto", "off"), default="auto",
                    help="the bdscan scan's two-look schedule: auto (the budget's) or off (one look at its steps: the "
                         "cost of a scan whose first look was in doubt)")
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    return ap


def run(args: argparse.Namespace) -> None:
    if args.child:
        model, which, labels, threads, device, budget_name, precision, look = args.child
        lab = [int(v) for v in labels.split(",")] if labels != "-" else None
        print(json.dumps(child(model, which, lab, int(threads), device, budget_name, precision, look)))
        return
    set_threads(args.threads)  # as the measurements run, so that the machine line says their thread count
    # the host's vector instructions and bf16, as every scan report records them
    host = versions()
    rows = []
    for m in args.models:
        lm = load_model(m)
        k = lm.wrapper.num_classes
        target = true_target(lm) or 0
        cache = read_json(args.original_cache, {})
        digest = sha16(m)
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
            o = run_child(m, "original", labels, str(args.threads), args.device, "original", "-", "off")
            cache[key] = o
            write_json(args.original_cache, cache)
        print_row({"model": m, "original": {k: v for k, v in o.items() if k != "per_label"}})
        if args.original_only:
            continue
        d = run_child(m, "default", "-", str(args.threads), args.device, args.budget, args.precision, args.second_look)
        per_label = o["seconds"] / o["labels"]
        orig_full = per_label * k
        row = {"model": Path(m).name, "classes": k, "default": d, "original": o,
               "original_extrapolated": labels != "-", "original_seconds_all_labels": round(orig_full, 1),
               "speedup": round(orig_full / d["seconds"], 1)}
        rows.append(row)
        print_row(row)
    if args.original_only:
        return
    precision = args.precision if args.precision != "-" else "the budget's"
    machine = machine_line(device=args.device, budget=args.budget, precision=precision, second_look=args.second_look)
    write_json(args.out, {"machine": machine, "rows": rows})
    print(f"\nmachine: {machine}\n")
    table_header("model", "classes", "default scan s", "per detector s", "precision", "looks", "default verdict (target)",
                 "default peak MB", "original s (all labels)", "original verdict (target)", "speed-up")
    for r in rows:
        d, o = r["default"], r["original"]
        ext = f" (extrapolated from {o['labels']} labels)" if r["original_extrapolated"] else ""
        ov = "n/a (label sample)" if r["original_extrapolated"] else f"{o['verdict']} ({o['target']})"
        per = ", ".join(f"{k} {v:.0f}" for k, v in d.get("detector_seconds", {"neural-cleanse": d["seconds"]}).items())
        print(f"| {r['model']} | {r['classes']} | {d['seconds']:.0f} | {per} | {d.get('precision', 'fp32')} | {d.get('looks', 1)} | "
              f"{d['verdict']} ({d['target']}) | "
              f"{d['peak_rss_mb']} | "
              f"{r['original_seconds_all_labels']:.0f}{ext} | {ov} | {r['speedup']}× |")
