"""Detection quality over the lab zoo: pixel and patch anomaly index, target found, true target, time.

Each model is scanned as ``bdscan scan MODEL --budget B`` would (both levels) on its bundled clean samples, with
``--set`` overriding fields of the budget. Prints a Markdown table (for benchmarks/README.md) and writes JSON
after every model, so a long run over the zoo resumes where it stopped (same budget and overrides).
``--histories`` also stores every label's best size after every step: what ``schedule``, ``schedule-more``,
``converged`` and ``floor`` replay.
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    Stopwatch,
    add_budget,
    add_manifest,
    add_out,
    add_overrides,
    add_threads,
    budget_config,
    load_with_samples,
    machine_line,
    new_parser,
    print_row,
    read_json,
    scan,
    scan_config,
    set_threads,
    table_header,
    write_json,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    add_manifest(ap)
    add_budget(ap)
    ap.add_argument("--only", nargs="*", help="zoo model names to scan (default: all)")
    add_out(ap, "detect.json")
    add_threads(ap, 2)
    ap.add_argument("--seed", type=int, default=0)
    add_overrides(ap)
    ap.add_argument("--histories", action="store_true", help="also store every label's best size per step (for schedule)")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    entries = read_json(args.manifest)
    rows: list[dict] = []
    prev = read_json(args.out)
    if prev and prev.get("budget") == args.budget and prev.get("set") == args.set:
        rows = prev["rows"]
    done = {r["model"] for r in rows}
    for e in entries:
        if e["name"] in done:
            continue
        f = args.manifest.parent / e["file"]
        if (args.only and e["name"] not in args.only) or not f.exists():
            continue
        lm, data = load_with_samples(f)
        info = lm.wrapper.info
        cfg = scan_config(args.budget, budget_config(args.budget, args.set, seed=args.seed))
        with Stopwatch() as sw:
            fd = scan(lm.wrapper, data, cfg)
        row = {"model": e["name"], "arch": info.arch, "kind": e["kind"], "true_target": e.get("target"),
               "verdict": fd.verdict.status, "verdict_target": fd.verdict.target, "basis": fd.verdict.basis,
               "seconds": round(sw.seconds, 1)}
        for m, r in fd.modes.items():
            row[f"{m}_ai"] = round(r.anomaly.anomaly_index, 2)
            row[f"{m}_min_label"] = r.anomaly.min_label
            row[f"{m}_flagged"] = list(r.anomaly.flagged)
            if args.histories:
                row.setdefault("histories", {})[m] = {p: {str(k): h for k, h in hs.items()} for p, hs in r.histories.items()}
        rows.append(row)
        print_row({k: v for k, v in row.items() if k != "histories"})
        write_json(args.out, {"machine": machine_line(), "budget": args.budget, "set": args.set, "rows": rows})
    print(f"\nmachine: {machine_line()}; budget {args.budget}\n")
    table_header("model", "kind", "true target", "pixel AI", "pixel min class", "patch AI", "patch min class", "verdict", "target", "s")
    for r in rows:
        print(f"| {r['model']} | {r['kind']} | {r['true_target'] if r['true_target'] is not None else '-'} | {r.get('pixel_ai', '-')} | "
              f"{r.get('pixel_min_label', '-')} | {r.get('patch_ai', '-')} | {r.get('patch_min_label', '-')} | {r['verdict']} | "
              f"{r['verdict_target'] if r['verdict_target'] is not None else '-'} | {r['seconds']} |")
