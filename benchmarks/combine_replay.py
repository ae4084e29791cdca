"""Replays the verdict's combination of Neural Cleanse and MM-BD from recorded scans, without scanning again.

Neural Cleanse's per-level p-values are recomputed from the final trigger sizes of a ``detect --histories``
recording (the smallest size of each class over a level's parametrisations, as a scan takes it; the CNN patch
sweep's first grid, as the default scans); MM-BD's come from ``bench-mmbd`` rows of the same seed. The combined
verdict is the scan's rule (``bdscan.detect.base.combine``: the smallest p-value times the number of detectors,
at most alpha; the deciding detector's class). Prints, per model, each detector's p-value and class and the
combined one, then how many backdoors each way finds with the true target and how many clean models it flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import RESULTS, combined_verdict, load_rows, nc_evidence, new_parser, read_json


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--nc", nargs="+", type=Path, default=[RESULTS / "detect_hist.json", RESULTS / "detect_fast_seed1.json"],
                    help="detect --histories recordings, one per seed, in --seeds order (default: the fast budget's, seeds 0 and 1)")
    ap.add_argument("--seeds", default="0,1", help="the seed of each --nc recording (default: %(default)s)")
    ap.add_argument("--mmbd", type=Path, default=RESULTS / "mmbd.json", help="bench-mmbd output (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.05, help="the verdict's level (default: %(default)s)")
    return ap


def final_sizes(row: dict) -> dict[str, dict[int, float | None]]:
    """Per level, each class's final trigger size from a recording (the smallest over the level's parametrisations)."""
    out: dict[str, dict[int, float | None]] = {}
    for level, params in row["histories"].items():
        sizes: dict[int, float | None] = {}
        for labels in params.values():
            for label, hist in labels.items():
                x, k = (hist[-1] if hist else None), int(label)
                sizes[k] = x if sizes.get(k) is None else (sizes[k] if x is None else min(sizes[k], x))
        out[level] = sizes
    return out


def run(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    mm = read_json(args.mmbd)["rows"]
    ways = ("neural-cleanse", "mm-bd", "combined")
    verdicts: dict[str, dict[str, set]] = {w: {} for w in ways}  # way -> model -> {(flagged, class)} over seeds
    for seed, rec in zip(seeds, args.nc, strict=True):
        found = dict.fromkeys(ways, 0)
        alarms = dict.fromkeys(ways, 0)
        n_bd = n_clean = 0
        print(f"\nseed {seed}: {rec.name} + {args.mmbd.name}, alpha {args.alpha:g}\n")
        print("| model | Neural Cleanse p (class) | MM-BD p (class) | combined p (class) | true target |")
        print("| --- | --- | --- | --- | --- |")
        for r in load_rows([rec], sweep="1"):
            m = [x for x in mm if x["model"] == r["model"] and x["seed"] == seed]
            if not m:
                continue
            ev = {"neural-cleanse": nc_evidence(final_sizes(r)), "mm-bd": (float(m[0]["p"]), int(m[0]["suspect"]))}
            ev["combined"] = combined_verdict(ev, args.alpha)[:2]
            tt = r["true_target"]
            n_bd += tt is not None
            n_clean += tt is None
            for w in ways:
                p, label = ev[w]
                flagged = p <= args.alpha
                found[w] += tt is not None and flagged and label == tt
                verdicts[w].setdefault(r["model"], set()).add((flagged, label if flagged else None))
                alarms[w] += tt is None and flagged
            cells = " | ".join(f"{ev[w][0]:.3g} ({ev[w][1]})" for w in ways)
            print(f"| {r['model']} | {cells} | {'clean' if tt is None else tt} |")
        print()
        for w in ways:
            print(f"{w}: {found[w]} of {n_bd} backdoors found with the true target, {alarms[w]} of {n_clean} clean models flagged")
    if len(seeds) > 1:
        print()
        for w in ways:
            flips = sorted(m for m, v in verdicts[w].items() if len(v) > 1)
            print(f"{w}: the verdict differs between seeds on {len(flips)} of {len(verdicts[w])} models"
                  f"{': ' + ', '.join(flips) if flips else ''}")
