"""Replays recorded scans to ask: what verdict would a shorter schedule have given?

Record first (slow): ``python -m benchmarks detect --histories --out benchmarks/results/detect_hist.json``.

Every label's optimisation is independent of the others' (its own parameters, Adam state, λ schedule and
early stop; all labels see the same mini-batches), so the best size a label had after step ``s`` of a long
run is exactly what a run with ``steps=s`` would have reported (``tests/detect/test_inversion.py`` checks it).
From one recorded run per model this recomputes, for each step budget, each mode's anomaly index and the
combined verdict, and the share of optimisation work it needs. ``--two-stage S1:FRAC`` also replays a
K-Arm-like schedule: every label runs ``S1`` steps, then only the lowest ``FRAC`` of labels (by size after
``S1``) run on to the end; the others keep their size after ``S1``. ``--detail S`` prints the per-model
detection table of benchmarks/README.md; ``--compare`` puts recordings (budgets, seeds) side by side.

This is the evidence behind the step budget of the ``fast`` preset (benchmarks/README.md, "How the default
was chosen").
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.common import at, is_right, judge, load_rows, new_parser, recordings, smin, table_header


def labels_of(per_param: dict) -> list[int]:
    return sorted({int(k) for hs in per_param.values() for k in hs})


def replay(row: dict, steps_of: dict[int, int] | int, log: bool = False) -> tuple[dict[str, object], object, float]:
    """Per-mode anomaly results, the combined verdict, and the work in label-steps, when label ``k`` runs
    ``steps_of[k]`` steps (or every label ``steps_of``). ``log``: the same MAD test on log sizes (scale-free;
    the token floor has no meaning there)."""
    sizes, work = {}, 0.0
    for mode, per_param in row["histories"].items():
        norms = {}
        for k in labels_of(per_param):
            s = steps_of if isinstance(steps_of, int) else steps_of[k]
            norms[k] = smin([at(hs[str(k)], s) for hs in per_param.values()])
            work += sum(min(s, len(hs[str(k)])) for hs in per_param.values())
        if log:
            norms = {k: (math.log(max(v, 1e-6)) if v is not None else None) for k, v in norms.items()}
        sizes[mode] = norms
    modes, verdict = judge(sizes, patch_floor=not log)
    return modes, verdict, work


def two_stage_steps(row: dict, s1: int, frac: float, full: int) -> dict[int, int]:
    """Steps per label when every label runs ``s1`` steps and the lowest ``frac`` of them, by size after ``s1``
    in any mode, run on to ``full``."""
    keep: set[int] = set()
    for per_param in row["histories"].values():
        labels = labels_of(per_param)
        size = {k: smin([at(hs[str(k)], s1) for hs in per_param.values()]) for k in labels}
        order = sorted(labels, key=lambda k: (size[k] is None, size[k] or 0.0))
        keep |= set(order[: max(3, math.ceil(frac * len(labels)))])
    return {k: (full if k in keep else s1) for k in labels_of(next(iter(row["histories"].values())))}


def detail(rows: list[dict], s: int) -> None:
    """The detection table of benchmarks/README.md for a run of ``s`` steps."""
    print()
    table_header("model", "kind", "true target", "pixel AI (smallest class)", "patch AI (smallest class)", "verdict", "recorded s")
    right = 0
    for r in rows:
        an, v, _ = replay(r, s)
        ok = is_right(v, r)
        right += ok
        cells = [f"{an[m].anomaly_index:.2f} ({an[m].min_label})" if m in an else "–" for m in ("pixel", "patch")]
        tgt = r["true_target"] if r["true_target"] is not None else "–"
        verdict = f"{v.status} ({v.target}, {v.basis})" if v.status == "backdoor" else v.status
        sweep = r.get("recorded_sweep", len(r["histories"].get("patch", {})))
        secs = f"{r['seconds']:.0f}" + (f" (recorded with a {sweep}-grid sweep)" if sweep > 1 else "")
        print(f"| {r['model']} | {r['kind']} | {tgt} | {cells[0]} | {cells[1]} | {verdict} {'✔' if ok else '✘'} | {secs} |")
    print(f"\nright verdicts: {right} of {len(rows)}")


def cell(v: object, row: dict) -> str:
    mark = "✔" if is_right(v, row) else "✘"
    if v.status == "backdoor":
        return f"{v.anomaly_index:.2f} {mark}({v.target})"
    return f"{v.anomaly_index:.2f} {mark}"


def compare(specs: list[str], sweep: str | None, steps: int) -> None:
    """One column per recording (``NAME=file[,file]``, e.g. one budget at one seed): each model's verdict."""
    recs = recordings(specs, sweep)
    models = list(dict.fromkeys(m for rec in recs.values() for m in rec))
    table_header("model", "true target", *recs)
    right = {n: [0, 0] for n in recs}
    for m in models:
        cells = []
        for n, rec in recs.items():
            if m not in rec:
                cells.append("not run")
                continue
            _, v, _ = replay(rec[m], steps)
            cells.append(cell(v, rec[m]))
            right[n][0] += is_right(v, rec[m])
            right[n][1] += 1
        tgt = next(rec[m]["true_target"] for rec in recs.values() if m in rec)
        print(f"| {m} | {tgt if tgt is not None else '-'} | " + " | ".join(cells) + " |")
    print("| **right verdicts** | | " + " | ".join(f"**{a}/{b}**" for a, b in right.values()) + " |")
    common = [m for m in models if all(m in rec for rec in recs.values())]
    if len(common) < len(models):  # recordings of different model sets: also count on the models all of them ran
        counts = [sum(is_right(replay(rec[m], steps)[1], rec[m]) for m in common) for rec in recs.values()]
        print(f"| **right, on the {len(common)} models every recording ran** | | "
              + " | ".join(f"**{a}/{len(common)}**" for a in counts) + " |")


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("results", type=Path, nargs="*", help="`detect --histories` outputs (rows are merged)")
    ap.add_argument("--steps", type=int, nargs="*", default=[10, 15, 20, 25, 30])
    ap.add_argument("--two-stage", nargs="*", default=[], help="S1:FRAC, e.g. 10:0.25")
    ap.add_argument("--sweep", default=None,
                    help="replay a CNN's patch sweep with only these parametrisations, e.g. '1,3' (1-based, in sweep order)")
    ap.add_argument("--detail", type=int, default=None, metavar="S", help="print the per-model detection table at S steps")
    ap.add_argument("--log", action="store_true", help="replay the outlier test on log sizes instead of sizes")
    ap.add_argument("--compare", nargs="*", metavar="NAME=FILES",
                    help="instead: one column per recording (NAME=file.json[,more.json]), verdicts at the largest --steps")
    return ap


def run(args: argparse.Namespace) -> None:
    if args.compare:
        compare(args.compare, args.sweep, max(args.steps))
        return
    data = json.loads(args.results[0].read_text())
    rows = load_rows(args.results, args.sweep)
    if args.detail:
        detail(rows, args.detail)
        return
    cols = [f"{s} steps" for s in args.steps] + [f"2-stage {t}" for t in args.two_stage]
    print(f"machine of the recording: {data['machine']}; budget {data['budget']} {data.get('set', '')}\n")
    print("Cell: highest anomaly index, then ✔ / ✘ for a right / wrong verdict (with the flagged class).\n")
    table_header("model", "true target", *cols)
    totals = {c: [0, 0.0] for c in cols}
    full = max(args.steps)
    for r in rows:
        cells = []
        _, _, full_work = replay(r, full, args.log)
        plans = [(f"{s} steps", s) for s in args.steps]
        plans += [(f"2-stage {t}", two_stage_steps(r, int(t.split(":")[0]), float(t.split(":")[1]), full)) for t in args.two_stage]
        for col, steps_of in plans:
            _, v, w = replay(r, steps_of, args.log)
            cells.append(cell(v, r))
            totals[col][0] += is_right(v, r)
            totals[col][1] += w / full_work
        print(f"| {r['model']} | {r['true_target'] if r['true_target'] is not None else '-'} | " + " | ".join(cells) + " |")
    n = len(rows)
    print("| **right verdicts** | | " + " | ".join(f"**{totals[c][0]}/{n}**" for c in cols) + " |")
    print("| **work vs full** | | " + " | ".join(f"{totals[c][1] / max(n, 1):.2f}" for c in cols) + " |")
