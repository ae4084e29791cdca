"""The input guard (`bdscan guard`) over the lab zoo's backdoored models: the share of triggered inputs it
flags at a false-positive rate, per family.

For each backdoored zoo model (or ``--only``), its bundled clean samples are split as ``bdscan guard`` splits
them (fit / calibration / test, stratified, ``--seed``). A scan (``--budget``, both levels) runs on the fit and
calibration images only, and the guard is built from its reversed trigger: the verdict's level and target, or,
when the scan misses the backdoor, the pixel level's smallest class (what ``bdscan guard --label K`` does).
Every guard variant (``--layers`` × ``--neurons``; ``tokens`` only on models with a token grid) is measured on
the test images: the false-positive rate on clean images, the share of images (not of the target) stamped with
the reversed trigger that are flagged, and the same for the model's original trigger, the one an attacker
uses. Reversed triggers are kept in ``benchmarks/results/guard_triggers/`` so a rerun (other variants, or after
an interruption) does not scan again; JSON is written after every model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from benchmarks.common import (
    BDSCAN_ARCHS,
    RESULTS,
    GuardConfig,
    Stopwatch,
    Trigger,
    add_budget,
    add_manifest,
    add_out,
    add_threads,
    build_guard,
    cached_reversed_trigger,
    load_with_samples,
    machine_line,
    new_parser,
    print_row,
    read_json,
    set_threads,
    split_guard_data,
    table_header,
    write_json,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    add_manifest(ap)
    add_budget(ap, help="budget of the scan that reverses the trigger")
    ap.add_argument("--only", nargs="*", help="zoo model names (default: every backdoored model)")
    ap.add_argument("--fpr", type=float, default=0.05, help="requested false-positive rate (default: %(default)s)")
    ap.add_argument("--layers", default="penultimate,tokens", help="guard layers to measure (default: %(default)s)")
    ap.add_argument("--neurons", default="0.01,0.05", help="neuron shares to measure (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the scan")
    ap.add_argument("--triggers", type=Path, default=RESULTS / "guard_triggers", help="cache of reversed triggers")
    add_out(ap, "guard.json")
    add_threads(ap, 1)
    return ap


def _reversed(e: dict, lm: object, scan_part: object, args: argparse.Namespace) -> tuple[Trigger, dict, float]:
    """The reversed trigger of a scan on ``scan_part`` (cached), how it was chosen, and the scan's seconds."""
    trig, info = cached_reversed_trigger(args.triggers / f"{e['name']}_{args.budget}_seed{args.seed}.npz", lm.wrapper,  # type: ignore[attr-defined]
                                         scan_part, args.budget, args.seed)
    return trig, info, float(info["scan_seconds"])


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    entries = [e for e in read_json(args.manifest) if e.get("kind") != "clean" and (not args.only or e["name"] in args.only)]
    layers = [s for s in args.layers.split(",") if s]
    shares = [float(s) for s in args.neurons.split(",") if s]
    key = {"budget": args.budget, "fpr": args.fpr, "seed": args.seed, "layers": layers, "neurons": shares}
    prev = read_json(args.out)
    rows: list[dict] = prev["rows"] if prev and prev.get("key") == key else []
    done = {r["model"] for r in rows}
    for e in entries:
        f = args.manifest.parent / e["file"]
        if e["name"] in done or not f.exists():
            continue
        lm, data = load_with_samples(f)
        base = GuardConfig(fpr=args.fpr, seed=args.seed)
        fit, cal, _ = split_guard_data(data, base)
        scan_part = dataclasses.replace(fit, x=torch.cat([fit.x, cal.x]), y=torch.cat([fit.y, cal.y]))
        trig, info, scan_s = _reversed(e, lm, scan_part, args)
        row = {"model": e["name"], "family": BDSCAN_ARCHS.get(lm.wrapper.info.arch, lm.wrapper.info.arch), "attack": e["kind"],
               "true_target": e.get("target"), "scan_verdict": info["verdict"], "trigger_level": info["level"],
               "trigger_label": info["label"], "scan_seconds": round(scan_s, 1), "variants": []}
        for layer in layers:
            if layer == "tokens" and lm.wrapper.token_grid is None:
                continue
            for share in shares:
                with Stopwatch() as sw:
                    r = build_guard(lm.wrapper, data, trig, base.with_(layer=layer, neurons=share), original=lm.original_trigger)
                d = r.to_dict()
                t = d["test"]
                row["variants"].append({
                    "layer": layer, "neurons": share, "count": d["neurons"]["count"], "threshold": d["threshold"],
                    "reached": r.reached, "split": d["split"], "fpr": t["clean"]["rate"], "fpr_ci95": t["clean"]["ci95"],
                    "flagged_reversed": t["stamped"]["rate"], "asr_reversed": t["stamped"]["attack_success"],
                    "flagged_successful_reversed": t["stamped"]["flagged_successful"],
                    "flagged_original": (t["stamped_original"] or {}).get("rate"),
                    "asr_original": (t["stamped_original"] or {}).get("attack_success"),
                    "flagged_successful_original": (t["stamped_original"] or {}).get("flagged_successful"),
                    "stamped_images": t["stamped"]["images"], "seconds": round(sw.seconds, 2)})
        rows.append(row)
        print_row(row)
        write_json(args.out, {"machine": machine_line(threads=args.threads), "key": key, "rows": rows})
    _tables(rows, args)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _mean(vs: list[float | None]) -> float | None:
    ok = [v for v in vs if v is not None]
    return sum(ok) / len(ok) if ok else None


def _tables(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {machine_line(threads=args.threads)}; scan budget {args.budget}; requested FPR {args.fpr}\n")
    variants = sorted({(v["layer"], v["neurons"]) for r in rows for v in r["variants"]})
    first = (variants[0] if variants else None) if ("penultimate", 0.01) not in variants else ("penultimate", 0.01)
    print(f"{first[0]}, {first[1]:g} of the neurons (%):\n" if first else "")
    table_header("model", "scan", "trigger (level, class)", "FPR (95 % CI)", "rev. flagged", "orig. flagged", "orig. ASR",
                 "orig. flagged of successful")
    for r in rows:
        v = next((v for v in r["variants"] if (v["layer"], v["neurons"]) == first), None)
        if v is None:
            continue
        ci = v["fpr_ci95"] or [None, None]
        print(f"| {r['model']} | {r['scan_verdict']} | {r['trigger_level']}, {r['trigger_label']}"
              f"{'' if r['trigger_label'] == r['true_target'] else ' (not the true target)'} | {_pct(v['fpr'])} ({_pct(ci[0])}-{_pct(ci[1])})"
              f"{'' if v['reached'] else ', rate not reached'} | {_pct(v['flagged_reversed'])} | {_pct(v['flagged_original'])} | "
              f"{_pct(v['asr_original'])} | {_pct(v.get('flagged_successful_original'))} |")
    print()
    table_header("family", "models", *[f"{lay} {n:g}: FPR / orig. flagged (min) / of successful" for lay, n in variants])
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    for fam, rs in [*fams.items(), ("all", rows)]:
        cells = []
        for k in variants:
            vs = [v for r in rs for v in r["variants"] if (v["layer"], v["neurons"]) == k]
            orig = [v["flagged_original"] for v in vs if v["flagged_original"] is not None]
            cells.append("–" if not vs else f"{_pct(_mean([v['fpr'] for v in vs]))} / {_pct(_mean(orig))} "
                         f"({_pct(min(orig)) if orig else '–'}) / {_pct(_mean([v.get('flagged_successful_original') for v in vs]))}")
        print(f"| {fam} | {len(rs)} | " + " | ".join(cells) + " |")
