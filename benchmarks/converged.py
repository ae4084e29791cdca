"""How close do a budget's trigger sizes come to what Neural Cleanse's own schedule converges to?

Each ``NAME=files`` is one recorded scan of the zoo (``detect --histories`` outputs, merged by model).
The reference is the original schedule's per-label pixel sizes cached by ``speed`` (1000 samples, batch 32,
up to 1000 epochs, label by label). For every model the original ran on, it prints, per recording:

* ``others ×``: the geometric mean, over the non-target labels the original ran, of (budget's size / original's):
  how far from converged the budget stops (1.00 = converged);
* ``spread``: the standard deviation of log(budget / original) over those labels: the part of the error that
  differs from label to label, which is what moves the anomaly index (a common factor cancels out of it);
* ``target ×``: the same ratio for the true target.

Only the pixel level is compared: the original schedule has no patch level.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from benchmarks.common import RESULTS, add_manifest, new_parser, recordings, sha16, table_header


def originals(cache: dict, manifest: list[dict], root: Path) -> dict[str, tuple[dict[int, float], int | None]]:
    """Model name -> (label -> original pixel size, true target), preferring the run with the most labels."""
    out: dict[str, tuple[dict[int, float], int | None]] = {}
    for e in manifest:
        f = root / e["file"]
        if not f.exists():
            continue
        h = sha16(f)
        best: dict[int, float] = {}
        for key, v in cache.items():
            if key.startswith(h + "|") and v.get("which") == "original":
                sizes = {int(k): d["norm"] for k, d in v["per_label"]["pixel"].items() if d["norm"] is not None}
                if len(sizes) > len(best):
                    best = sizes
        if best:
            out[e["name"]] = (best, e.get("target"))
    return out


def final_pixel_sizes(row: dict) -> dict[int, float | None]:
    """A recorded row's final pixel size per label (None where the label never succeeded)."""
    hs = next(iter(row["histories"]["pixel"].values()))
    return {int(k): (h[-1] if h else None) for k, h in hs.items()}


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("recordings", nargs="+", help="NAME=file.json[,file2.json]")
    ap.add_argument("--original", type=Path, default=RESULTS / "speed_original.json",
                    help="the original schedule's cached runs (default: benchmarks/results/speed_original.json)")
    add_manifest(ap)
    return ap


def run(args: argparse.Namespace) -> None:
    ref = originals(json.loads(args.original.read_text()), json.loads(args.manifest.read_text()), args.manifest.parent)
    recs = {name: {m: final_pixel_sizes(r) for m, r in rows.items()} for name, rows in recordings(args.recordings).items()}
    table_header("model", "original's labels", "recording", "others ×", "spread", "target ×")
    for model, (orig, target) in ref.items():
        for name, rec in recs.items():
            if model not in rec:
                continue
            logs = [math.log(rec[model][k] / v) for k, v in orig.items() if k != target and rec[model].get(k)]
            t = rec[model].get(target) if target is not None else None
            tcell = f"{t / orig[target]:.2f}" if t and target in orig else "–"
            print(f"| {model} | {len(orig)} | {name} | {math.exp(statistics.fmean(logs)):.2f} | "
                  f"{statistics.pstdev(logs):.2f} | {tcell} |")

