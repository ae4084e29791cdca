"""Seed robustness: one model, one level, several seeds and budget variants; how stable is the anomaly index?

A scan's seed sets the mask and pattern initialisation and the mini-batch order. A verdict that changes with
the seed was luck, so a budget is judged here by the spread of its anomaly index over seeds, and by how far
its trigger sizes are from converged (the median size of the non-target classes: smaller is closer to what
Neural Cleanse's own schedule reaches; benchmarks/README.md compares them). Each ``--set`` is one variant
(overrides of the budget's fields; an empty string is the budget itself). Results are appended to ``--out``
(resumable: a variant and seed already there is not run again).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import (
    Stopwatch,
    add_budget,
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
    sha16,
    table_header,
    true_target,
    write_json,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--level", default="pixel", choices=["pixel", "patch"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_budget(ap)
    add_overrides(ap, many=True)
    add_threads(ap, 1)
    add_out(ap, "seeds.json", "JSON output, appended to")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    lm, data = load_with_samples(args.model)
    target = true_target(lm)
    doc = read_json(args.out, {"rows": []})
    model_hash = sha16(args.model)
    for spec in args.sets:
        for seed in args.seeds:
            key = {"model": args.model.name, "model_sha256_16": model_hash, "level": args.level, "budget": args.budget,
                   "set": spec, "seed": seed, "threads": args.threads}
            if any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"]):
                continue
            cfg = scan_config(args.budget, budget_config(args.budget, spec, seed=seed), modes=(args.level,))
            with Stopwatch() as sw:
                mr = scan(lm.wrapper, data, cfg).modes[args.level]
            norms = {r.label: r.norm for r in mr.labels}
            others = [v for k, v in norms.items() if k != target and v is not None]
            row = key | {
                "anomaly_index": round(mr.anomaly.anomaly_index, 2), "min_label": mr.anomaly.min_label, "true_target": target,
                "target_size": None if target is None or norms.get(target) is None else round(norms[target], 1),
                "median_size_others": round(statistics.median(others), 1) if others else None,
                "seconds": round(sw.seconds, 1), "machine": machine_line(),
            }
            doc["rows"].append(row)
            write_json(args.out, doc)
            print_row(row)
    print()
    table_header("model", "level", "budget", "variant", "seed", "anomaly index", "smallest class", "target size",
                 "median size of others", "s")
    for r in doc["rows"]:
        print(f"| {r['model']} | {r['level']} | {r['budget']} | {r['set'] or '(as is)'} | {r['seed']} | {r['anomaly_index']} | "
              f"{r['min_label']} | {r['target_size']} | {r['median_size_others']} | {r['seconds']} |")
