"""MM-BD (``--detectors mm-bd``) over the lab zoo: per model and seed its calibrated p-value, suspected class,
the true target, right or wrong, and seconds; TPR, FPR and ROC AUC at ``--alpha``, overall and per family.

Every model is scanned exactly as a user scans it, ``bdscan scan MODEL --detectors mm-bd --budget B --seed S``
(bundled clean samples, ``--steps`` passed through), in a fresh process per scan with ``--threads`` torch threads,
and the numbers are read back from the scan document (``mm_bd`` section; seconds: the detector's own timing). A
backdoored model counts as found when it is flagged (p < alpha) with its true target; a clean model is a false alarm
when flagged. AUC ranks backdoored against clean models by p-value (ties count half), whatever the suspected class.
JSON is written after every scan, so a run resumes where it stopped (same budget and steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import (
    BDSCAN_ARCHS,
    add_budget,
    add_manifest,
    add_out,
    add_threads,
    machine_line,
    new_parser,
    print_row,
    read_json,
    scan_cli,
    sha16,
    table_header,
    utc_now,
    write_json,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    add_manifest(ap)
    add_budget(ap, help="scan budget (MM-BD's schedule for it: bdscan.detect.mmbd.SCHEDULES)")
    ap.add_argument("--steps", type=int, default=None, help="override the budget's optimisation steps")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    ap.add_argument("--only", nargs="*", help="zoo model names (default: all)")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level of the summary (default: %(default)s)")
    add_out(ap, "mmbd.json")
    add_threads(ap, 1)
    return ap


def scan_one(model: Path, budget: str, steps: int | None, seed: int, threads: int) -> tuple[dict, float]:
    """One ``bdscan scan --detectors mm-bd`` in a fresh process: its scan document and the process's wall time."""
    args = [str(model), "--detectors", "mm-bd", "--budget", budget, "--seed", str(seed), "--no-activations", "-q", "--fail-on", "never"]
    return scan_cli(args + (["--steps", str(steps)] if steps is not None else []), threads)


def row_of(e: dict, doc: dict, seed: int, wall: float, alpha: float) -> dict:
    sec = doc["mm_bd"]
    ev = sec["evidence"]
    p = float(sec["p_value"])
    stats = [float(s["score"]) for s in sec["scores"]]
    tgt = e.get("target")
    flagged = p < alpha
    suspect = int(sec["max_label"])
    rank = None if tgt is None else 1 + sum(s > stats[tgt] for s in stats)
    right = (flagged and suspect == tgt) if tgt is not None else not flagged
    return {"model": e["name"], "arch": e["arch"], "dataset": e.get("dataset"), "kind": e.get("kind"), "classes": len(stats),
            "true_target": tgt, "seed": seed, "p": p, "p_raw": float(sec["null"]["p_raw"]), "suspect": suspect,
            "flagged": flagged, "right": right, "target_rank": rank, "max": float(sec["max_statistic"]),
            "median": float(sec["median_statistic"]), "statistic": sec["measured"].get("statistic"),
            "status": ev["status"], "seconds": float(doc["timings"].get("mm-bd_s", float("nan"))), "wall_s": round(wall, 1),
            # per class, for replaying the test offline (another null, another baseline)
            "stats": stats, "maxima": [s.get("max_margin") for s in sec["scores"]], "baselines": [s.get("baseline") for s in sec["scores"]]}


def auc(rows: list[dict]) -> float | None:
    """ROC AUC of "backdoored" by smaller p-value (Mann-Whitney; ties count half); None without both kinds."""
    bd = [r["p"] for r in rows if r["true_target"] is not None]
    cl = [r["p"] for r in rows if r["true_target"] is None]
    if not bd or not cl:
        return None
    return sum((b < c) + 0.5 * (b == c) for b in bd for c in cl) / (len(bd) * len(cl))


def summary(rows: list[dict]) -> dict:
    bd = [r for r in rows if r["true_target"] is not None]
    cl = [r for r in rows if r["true_target"] is None]
    return {"backdoored": len(bd), "clean": len(cl),
            "tpr": sum(r["right"] for r in bd) / len(bd) if bd else None,
            "flagged_any_class": sum(r["flagged"] for r in bd) / len(bd) if bd else None,
            "target_ranked_first": sum(r["target_rank"] == 1 for r in bd) / len(bd) if bd else None,
            "fpr": sum(r["flagged"] for r in cl) / len(cl) if cl else None, "auc": auc(rows)}


def _fmt(v: float | None, pct: bool = True) -> str:
    return "—" if v is None else (f"{100 * v:.0f} %" if pct else f"{v:.2f}")


def run(args: argparse.Namespace) -> None:
    entries = read_json(args.manifest)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    prev = read_json(args.out)
    key = {"budget": args.budget, "steps": args.steps}
    rows: list[dict] = prev["rows"] if prev and prev.get("key") == key else []
    done = {(r["model"], r["seed"]) for r in rows}
    for seed in seeds:
        for e in entries:
            f = args.manifest.parent / e["file"]
            if (args.only and e["name"] not in args.only) or not f.exists() or (e["name"], seed) in done:
                continue
            doc, wall = scan_one(f, args.budget, args.steps, seed, args.threads)
            row = row_of(e, doc, seed, wall, args.alpha) | {"sha16": sha16(f)}
            rows.append(row)
            print_row(row)
            write_json(args.out, {"benchmark": "bench-mmbd", "key": key, "alpha": args.alpha, "when": utc_now(),
                                  "machine": machine_line(threads=args.threads), "rows": rows})
    rows = [r for r in rows if r["seed"] in seeds and (not args.only or r["model"] in args.only)]
    print(f"\nMM-BD, budget {args.budget}{f', {args.steps} steps' if args.steps else ''}, seeds {args.seeds}, alpha {args.alpha:g}; "
          f"{machine_line(threads=args.threads)}\n")
    table_header("model", "seed", "statistic", "p", "suspect", "true target", "target rank", "right", "seconds")
    for r in sorted(rows, key=lambda r: (r["true_target"] is None, r["model"], r["seed"])):
        tt = "clean" if r["true_target"] is None else str(r["true_target"])
        print(f"| {r['model']} | {r['seed']} | {r['statistic']} | {r['p']:.3g} | {r['suspect']} | {tt} | {r['target_rank'] or '—'} "
              f"| {'yes' if r['right'] else 'NO'} | {r['seconds']:.0f} |")
    print()
    table_header("models", "backdoored", "clean", "TPR (flagged, right class)", "flagged (any class)", "target ranked 1st", "FPR", "AUC")
    groups = {"all": rows} | {f"{BDSCAN_ARCHS.get(a, a)}": [r for r in rows if r["arch"] == a] for a in sorted({r["arch"] for r in rows})}
    groups |= {f"{k} classes": [r for r in rows if r["classes"] == k] for k in sorted({r["classes"] for r in rows})}
    for name, rs in groups.items():
        s = summary(rs)
        print(f"| {name} | {s['backdoored']} | {s['clean']} | {_fmt(s['tpr'])} | {_fmt(s['flagged_any_class'])} "
              f"| {_fmt(s['target_ranked_first'])} | {_fmt(s['fpr'])} | {_fmt(s['auc'], pct=False)} |")
