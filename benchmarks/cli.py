"""End-to-end wall time of ``bdscan scan`` as a user runs it, one scan after the other, with a throughput probe.

Each (model, precision, workers) runs ``bdscan scan MODEL -q --budget B --precision P [--workers W] --json F``
(workers 0: the default, the option left out) in a fresh process (2 torch threads, the CLI's default), so the
time includes start-up, loading and the report. Before and after the scans the ViT forward+backward probe of
``throughput`` (64 images, 2 threads) is run: this shared machine's speed changes by the hour, and the probe
says how fast it was while the scans ran. Stop every other job first; each row records the load average
before its scan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    LAB_ZOO,
    Stopwatch,
    add_budget,
    add_out,
    new_parser,
    print_row,
    run_benchmark,
    table_header,
    utc_now,
    write_json,
)

PROBE_MODEL = LAB_ZOO / "gtsrb_vit_badnets.safetensors"


def probe() -> float:
    """The ViT's forward+backward images/s at 64 images on 2 threads (best of 3 after a warm-up)."""
    p = run_benchmark("throughput", str(PROBE_MODEL), "--sizes", "64")
    if p.returncode != 0:
        raise SystemExit(f"throughput probe failed: {p.stderr[-2000:]}")
    line = next(ln for ln in p.stdout.splitlines() if "images/s" in ln)
    return float(line.rsplit("64: ", 1)[1].split()[0])


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("models", nargs="+")
    add_budget(ap)
    ap.add_argument("--precision", nargs="+", default=["auto"])
    ap.add_argument("--workers", nargs="+", type=int, default=[0], help="0 = the default (option left out)")
    add_out(ap, "cli.json")
    return ap


def run(args: argparse.Namespace) -> None:
    rows = []
    before = probe()
    for m in args.models:
        for prec, workers in [(p, w) for p in args.precision for w in args.workers]:
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "scan.json"
                load = os.getloadavg()[0]
                extra = ["--workers", str(workers)] if workers else []
                log = Path(tmp) / "log.txt"
                with log.open("w") as fh, Stopwatch() as sw:
                    p = subprocess.Popen([sys.executable, "-m", "bdscan.cli", "scan", m, "-q", "--budget", args.budget,
                                          "--precision", prec, *extra, "--json", str(js)], stdout=fh, stderr=subprocess.STDOUT)
                    _, status, usage = os.wait4(p.pid, 0)  # this scan's own peak memory
                code = os.waitstatus_to_exitcode(status)
                if code not in (0, 1):
                    raise SystemExit(f"{m}: exit {code}: {log.read_text()}")
                doc = json.loads(js.read_text())
            row = {"model": Path(m).stem, "budget": args.budget, "precision_option": prec,
                   "precision": doc["config"]["inversion"]["precision"], "workers": doc["config"].get("workers", 1),
                   "verdict": doc["verdict"]["status"],
                   "target": doc["verdict"]["target"],
                   "ai": {m: round(r["anomaly"]["anomaly_index"], 4) for m, r in doc["modes"].items()},
                   "end_to_end_s": round(sw.seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "timings": doc["timings"],
                   "loadavg_before": round(load, 2),
                   # the host's vector instructions, as the scan's report records them: this shared machine's
                   # speed differs by host as well as by hour
                   "cpu": f"{doc['versions']['cpu_capability']}, bf16 {doc['versions']['cpu_bf16']}",
                   "measured_at": utc_now()}
            rows.append(row)
            print_row(row)
    after = probe()
    out = {"command": "bdscan scan MODEL -q --budget B --precision P [--workers W] --json ... (2 torch threads), "
                      "one after the other",
           "vit_probe_images_per_s": {"before": round(before), "after": round(after)}, "rows": rows}
    write_json(args.out, out)
    print(f"\nViT probe (64 images, 2 threads): {before:.0f} images/s before, {after:.0f} after\n")
    table_header("model", "precision", "workers", "verdict (target)", "end to end s", "scan s", "peak RSS MB")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['workers']} | {r['verdict']} ({r['target']}) | {r['end_to_end_s']} | "
              f"{r['timings'].get('total_s', '-')} | {r['peak_rss_mb']} |")
