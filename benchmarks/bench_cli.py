"""End-to-end wall time of ``bdscan scan`` as a user runs it, one scan after the other, with a throughput probe.

Usage:
    python benchmarks/bench_cli.py MODEL [MODEL ...] [--budget fast] [--precision auto fp32] [--workers 0 1]
                                   [--out benchmarks/results/cli.json]

Each (model, precision, workers) runs ``bdscan scan MODEL -q --budget B --precision P [--workers W] --json F``
(workers 0: the default, the option left out) in a fresh
process (2 torch threads, the CLI's default), so the time includes start-up, loading and the report. Before
and after the scans the ViT forward+backward probe of ``bench_throughput.py`` (64 images, 2 threads) is run:
this shared machine's speed changes by the hour, and the probe says how fast it was while the scans ran. Stop
every other job first; the script records the load average before each scan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE_MODEL = "sample_models/gtsrb_vit_badnets.safetensors"


def probe() -> float:
    """The ViT's forward+backward images/s at 64 images on 2 threads (best of 3 after a warm-up)."""
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_throughput.py"), PROBE_MODEL, "--sizes", "64"],
                       capture_output=True, text=True, check=True)
    line = next(ln for ln in p.stdout.splitlines() if "images/s" in ln)
    return float(line.rsplit("64: ", 1)[1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--budget", default="fast")
    ap.add_argument("--precision", nargs="+", default=["auto"])
    ap.add_argument("--workers", nargs="+", type=int, default=[0], help="0 = the default (option left out)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cli.json"))
    args = ap.parse_args()
    rows = []
    before = probe()
    for m in args.models:
        for prec, workers in [(p, w) for p in args.precision for w in args.workers]:
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "scan.json"
                load = os.getloadavg()[0]
                t = time.perf_counter()
                extra = ["--workers", str(workers)] if workers else []
                log = Path(tmp) / "log.txt"
                with log.open("w") as fh:
                    p = subprocess.Popen([sys.executable, "-m", "bdscan.cli", "scan", m, "-q", "--budget", args.budget,
                                          "--precision", prec, *extra, "--json", str(js)], stdout=fh, stderr=subprocess.STDOUT)
                    _, status, usage = os.wait4(p.pid, 0)  # this scan's own peak memory
                secs = time.perf_counter() - t
                code = os.waitstatus_to_exitcode(status)
                if code not in (0, 1):
                    raise SystemExit(f"{m}: exit {code}: {log.read_text()}")
                doc = json.loads(js.read_text())
            row = {"model": Path(m).stem, "budget": args.budget, "precision_option": prec,
                   "precision": doc["config"]["inversion"]["precision"], "workers": doc["config"].get("workers", 1),
                   "verdict": doc["verdict"]["status"],
                   "target": doc["verdict"]["target"],
                   "ai": {m: round(r["anomaly"]["anomaly_index"], 4) for m, r in doc["modes"].items()},
                   "end_to_end_s": round(secs, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "timings": doc["timings"],
                   "loadavg_before": round(load, 2),
                   # the host's vector instructions: this machine's speed differs by host as well as by hour
                   "cpu": f"{doc['versions']['cpu_capability']}, bf16 {doc['versions']['cpu_bf16']}",
                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    after = probe()
    out = {"command": "bdscan scan MODEL -q --budget B --precision P [--workers W] --json ... (2 torch threads), "
                      "one after the other",
           "vit_probe_images_per_s": {"before": round(before), "after": round(after)}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nViT probe (64 images, 2 threads): {before:.0f} images/s before, {after:.0f} after\n")
    print("| model | precision | workers | verdict (target) | end to end s | scan s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['workers']} | {r['verdict']} ({r['target']}) | {r['end_to_end_s']} | "
              f"{r['timings'].get('total_s', '-')} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
