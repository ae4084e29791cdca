"""Detection quality over the evaluation zoo (benchmarks/zoo/manifest.json): the published figures of issue #24.

Every built model of the chosen half (``--split calibration`` to choose thresholds, rules and budgets;
``--split evaluation`` for the figures we publish) is scanned exactly as a user scans it, ``bdscan scan MODEL
--data sample_models/<dataset>_samples.npz --detectors D --budget B --seed S``, in a fresh process with ``--threads``
torch threads, once per seed. From each scan document it keeps the combined verdict (status, class, corrected
p-value, the deciding detector) and every detector's own evidence (p-value, suspected class), so that another
alpha or another combination can be replayed offline from the JSON without scanning again.

Figures, overall and per architecture family, attack kind and data set:

* **TPR**: backdoored models flagged with their true target (a flag naming another class is a miss);
* **FPR**: clean twins flagged;
* **AUC**: backdoored against clean models ranked by the combined p-value (ties count half);
* **same verdict**: models whose status and class are the same under every seed scanned;
* **seconds**: the scan's own wall time (``timings.total_s``), median.

JSON is written after every scan, so a run resumes where it stopped (same detectors, budget and steps). Each row
also keeps, per Neural Cleanse level and class, the best trigger size after every step (``sizes``): a run of S steps
holds the scan that any shorter schedule would have made (the best size after step s of a long run is exactly what an
s-step run reports, ``tests/detect/test_inversion.py``), so ``--replay-steps 30,60,90`` judges each step count
offline from one run with ``--steps 90``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BDSCAN_ARCHS,
    DATASET_SAMPLES,
    DEFAULT_BUDGET,
    DEFAULT_LEVELS,
    DETECTORS,
    EVAL_ZOO,
    LEVELS,
    LOG_SD_FLOOR,
    P_RULES,
    PATCH_MAD_FLOOR,
    Evidence,
    SpreadFloor,
    add_budget,
    add_out,
    add_threads,
    budget_config,
    combine_detectors,
    level_anomaly,
    machine_line,
    new_parser,
    print_row,
    read_json,
    resolve_second_look,
    scan_cli,
    sha16,
    table_header,
    utc_now,
    write_json,
)

#: level -> the size test's spread floor for a replay (None: the scan's own, :func:`level_floor`; a row's recorded
#: p-values, which a one-look replay without ``--spread-floor`` reuses, keep the floor of the code that scanned it)
Floors = dict[str, SpreadFloor] | None

#: a backdoored row counts only when its backdoor works (the zoo's own target, bdscan.lab.evalzoo_table.MIN_ASR)
MIN_ASR = 0.90


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--manifest", type=Path, default=EVAL_ZOO, help="evaluation-zoo manifest (default: benchmarks/zoo/manifest.json)")
    ap.add_argument("--split", choices=("calibration", "evaluation"), required=True,
                    help="which half: choose on calibration, publish from evaluation")
    ap.add_argument("--detectors", default="neural-cleanse,mm-bd", help="comma-separated detectors (default: %(default)s)")
    add_budget(ap)
    ap.add_argument("--steps", type=int, default=None, help="override the budget's optimisation steps")
    ap.add_argument("--replay-steps", default=None, metavar="S1,S2,...",
                    help="scan nothing: replay the recorded scans (--out, recorded with --steps at least the largest) as if "
                         "stopped after each step count, with --replay's first combination (default: pixel,patch)")
    ap.add_argument("--replay-two-look", default=None, metavar="S1:S2:A1:C",
                    help="scan nothing: replay a two-look schedule from recorded sizes: judge after S1 steps; flag there when "
                         "Neural Cleanse's p <= A1, call it clean when p > C, else judge after S2 steps at alpha - A1 "
                         "(the two looks' false-alarm rates add up to at most alpha)")
    ap.add_argument("--levels", default=None, help="Neural Cleanse's levels, passed to the scan (default: the scan's own, "
                    "pixel,patch); e.g. all, to replay any subset of levels offline from each level's own p-value")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.05, help="the verdict's level, passed to the scan (default: %(default)s)")
    ap.add_argument("--only", nargs="*", help="model names (default: every built model of the split)")
    ap.add_argument("--cell", nargs="*", help="only these cells (<dataset>_<arch>)")
    ap.add_argument("--replay-trajectory", type=int, default=None, metavar="S",
                    help="scan nothing: one look after S steps, judged on each class's trigger size at step S (as a scan) "
                         "and, beside it, on the geometric mean of its best size over steps 1..S (how fast a class is "
                         "reached: measured, not adopted; benchmarks/README.md)")
    ap.add_argument("--replay", nargs="+", metavar="LEVELS,DETECTORS",
                    help="scan nothing: replay the recorded scans (--out) with only these levels and detectors, one summary "
                         "table per combination, e.g. --replay pixel,patch pixel,patch,blend pixel,patch,blend,mm-bd")
    ap.add_argument("--spread-floor", default=None, metavar="SD[,token]",
                    help="offline replays (--replay, --replay-two-look, --replay-steps): judge the recorded sizes with this floor on "
                         "the other classes' log-size spread instead of the scan's own; ',token' adds one token at the patch "
                         "level's typical count (docs/verdict.md, \"The spread's floor\"), e.g. 0.14,token")
    ap.add_argument("--seed-noise", type=int, default=None, metavar="S",
                    help="scan nothing: each class's seed noise at step S (the standard deviation of its log size over the "
                         "recorded seeds), per clean model and level, and the median over them")
    ap.add_argument("--summary", action="store_true",
                    help="scan nothing: print the recorded scans' (--out) verdicts and tables as a finished run prints them")
    add_out(ap, "zoo_detect.json", help="JSON output (default: benchmarks/results/zoo_detect_<split>.json)")
    ap.add_argument("--also", nargs="+", type=Path, default=[], metavar="JSON",
                    help="offline modes (--summary, --replay, --replay-steps, --replay-two-look, --replay-trajectory): further recordings whose "
                         "scans join --out's, each judged under its own recording's schedule; a model and seed recorded "
                         "in several files is taken from the first given (--out first)")
    ap.add_argument("--noise-p", choices=tuple(P_RULES), default="larger",
                    help="with --noise: how the neuron-noise detector's p-value joins its size and count tests "
                         "(its p_rule; default: %(default)s)")
    ap.add_argument("--noise-splits-below", type=int, default=0, metavar="N",
                    help="with --noise: the neuron-noise detector's splits_below (a model whose data set's bundled "
                         "images are fewer takes every split's recorded run: the smallest p-value times the splits)")
    ap.add_argument("--noise", nargs="+", type=Path, default=[], metavar="JSON",
                    help="offline modes: `neuron-noise` benchmark recordings (untargeted, the detector's eps and steps) whose "
                         "runs join each LayerNorm model's scan at the same seed as the neuron-noise detector's evidence "
                         "(replay it with --replay pixel,patch,neuron-noise); a scan without such a run is left out and named")
    add_threads(ap, 1)
    return ap


def scan_one(model: Path, data: Path, detectors: str, budget: str, steps: int | None, seed: int, alpha: float,
             threads: int, levels: str | None = None) -> tuple[dict, float]:
    """One ``bdscan scan`` in a fresh process: its scan document and the process's wall time."""
    args = [str(model), "--data", str(data), "--detectors", detectors, "--budget", budget, "--seed", str(seed),
            "--alpha", str(alpha), "--no-activations", "-q", "--fail-on", "never"]
    # a run with --steps records every class's sizes up to those steps for the replays: one look, never stopped early
    args += ["--steps", str(steps), "--second-look", "off"] if steps is not None else []
    args += ["--levels", levels] if levels is not None else []
    return scan_cli(args, threads)


def row_of(entry: dict, doc: dict, seed: int, wall: float) -> dict[str, Any]:
    """What the benchmark keeps of one scan of one zoo model (``entry``: its manifest row)."""
    v = doc["verdict"]
    target = entry.get("target")
    status, suspect = v["status"], v.get("target")
    flagged = status == "backdoor"
    right = (flagged and suspect == target) if target is not None else not flagged
    evidence = {e["detector"]: {"status": e["status"], "target": e.get("target"), "p": e.get("p_value"),
                                "weight": e.get("weight", 1.0)} for e in v.get("evidence", [])}
    return {"model": entry["name"], "arch": entry["arch"], "dataset": entry["dataset"], "attack": entry.get("attack"),
            "split": entry.get("split"), "true_target": target, "seed": seed, "status": status, "suspect": suspect,
            "p": v.get("p_value"), "decided_by": (v.get("decided_by") or {}).get("detector"), "flagged": flagged, "right": right,
            "looks": v.get("looks"),  # Neural Cleanse's two-look schedule: 2 when its first look was in doubt
            "evidence": evidence,
            # Neural Cleanse's levels, flagged or not: each level's p-value (before the correction) and smallest class
            "levels": {m: {"p": (sec.get("anomaly") or {}).get("p_value"), "min_label": (sec.get("anomaly") or {}).get("min_label")}
                       for m, sec in (doc.get("modes") or {}).items()},
            "clean_acc": entry.get("clean_acc"), "asr": entry.get("asr"),
            "seconds": float(doc["timings"]["total_s"]), "wall_s": round(wall, 1),
            # each detector's own wall time (Neural Cleanse's per level: pixel_s, patch_s; others <name>_s)
            "detector_seconds": {k: v for k, v in doc["timings"].items() if k != "total_s"},
            "sizes": sizes_of(doc)}


def _sig(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.5g}")


def sizes_of(doc: dict) -> dict[str, dict[str, list[float | None]]]:
    """Per Neural Cleanse level and class, the best trigger size after each step (None until the class's trigger
    first succeeds), from a scan document's label histories, to 5 significant digits."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for m, sec in (doc.get("modes") or {}).items():
        out[m] = {str(lab["label"]): [_sig(v) for v in (lab.get("history") or [])] for lab in sec.get("labels") or []}
    return out


def recorded_sizes(row: dict, steps: int) -> dict[str, dict[str, list[float | None]]] | None:
    """``row``'s per-level, per-class best sizes after every step, when it recorded at least ``steps`` of them."""
    sizes = row.get("sizes")
    if not sizes or not all(sizes.values()) or any(len(h) < steps for lv in sizes.values() for h in lv.values()):
        return None
    return sizes


def levels_at(row: dict, steps: int, floors: Floors = None) -> dict[str, dict[str, Any]] | None:
    """Each level's p-value and smallest class had the scan stopped after ``steps`` steps (from ``sizes``); None when
    the row recorded no sizes or fewer steps. ``floors``: level -> the size test's spread floor (default: the
    scan's own)."""
    sizes = recorded_sizes(row, steps)
    if sizes is None:
        return None
    out = {}
    for m, lv in sizes.items():
        res = level_anomaly({int(k): h[steps - 1] for k, h in lv.items()}, m, floor=(floors or {}).get(m))
        out[m] = {"p": res.p_value, "min_label": res.min_label}
    return out


def parse_floor(text: str | None) -> Floors:
    """``--spread-floor`` "SD[,token]" -> level -> :class:`SpreadFloor` (None: the scan's own floor)."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        sd = float(parts[0])
    except (IndexError, ValueError):
        sd = -1.0
    if sd <= 0 or not math.isfinite(sd) or any(x != "token" for x in parts[1:]):
        raise SystemExit(f"zoo-detect --spread-floor: {text!r} is not SD[,token] with SD a positive number, e.g. "
                         f"{LOG_SD_FLOOR:g} (the scan's own) or 0.14,token")
    token = "token" in parts[1:]
    return {m: SpreadFloor(sd, PATCH_MAD_FLOOR if token and m == "patch" else 0.0) for m in LEVELS}


def seed_noise(rows: Sequence[dict], steps: int) -> list[dict[str, Any]]:
    """Each model's and level's seed noise at ``steps``: the root mean square over its classes of each class's
    standard deviation (ddof 1) of the log best size over the recorded seeds. Classes without a size at every seed
    are left out; a model needs two seeds recorded that long."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if recorded_sizes(r, steps) is not None:
            by.setdefault(r["model"], []).append(r)
    out = []
    for model, rs in sorted(by.items()):
        if len(rs) < 2:
            continue
        for level in sorted(set.intersection(*(set(r["sizes"]) for r in rs))):
            sds = []
            for lab in rs[0]["sizes"][level]:
                vals = [r["sizes"][level].get(lab, [None] * steps)[steps - 1] for r in rs]
                if all(v is not None for v in vals):
                    sds.append(statistics.stdev(math.log(max(v, 1e-6)) for v in vals))
            if sds:
                out.append({"model": model, "level": level, "seeds": sorted(r["seed"] for r in rs), "classes": len(sds),
                            "noise": math.sqrt(statistics.fmean(x * x for x in sds))})
    return out


def run_seed_noise(args: argparse.Namespace) -> None:
    """``--seed-noise S``: :func:`seed_noise` of the clean models, per model and level, and the median over them (a
    backdoor's target moves differently from a class that no trigger was planted for)."""
    _, rows = recorded_rows(args, "--seed-noise")
    rows = [r for r in rows if r["true_target"] is None]
    steps = args.seed_noise
    table = seed_noise(rows, steps)
    print(f"Seed noise at step {steps}, from {source(args)}, seeds {args.seeds}: per class, the standard deviation of the log "
          f"best size over the seeds; per clean model and level, its root mean square over the classes\n")
    table_header("model", "level", "seeds", "classes", "noise")
    for t in table:
        print(f"| {t['model']} | {t['level']} | {','.join(map(str, t['seeds']))} | {t['classes']} | {t['noise']:.3f} |")
    if table:
        med = statistics.median(t["noise"] for t in table)
        print(f"\nmedian over {len(table)} model-levels: {med:.4f} (rounded up to 0.01: {math.ceil(med * 100 - 1e-9) / 100:.2f})")
        for level in sorted({t["level"] for t in table}):
            print(f"  {level}: median {statistics.median(t['noise'] for t in table if t['level'] == level):.4f}")


def levels_trajectory(row: dict, steps: int) -> dict[str, dict[str, Any]] | None:
    """As :func:`levels_at`, but each class's statistic is the geometric mean of its best trigger size over steps
    1..``steps`` (a step before the class's first success counts as the largest size any class had by then): a
    class the inversion reaches early scores small even when the others catch up later. The same size test
    (:func:`bdscan.detect.anomaly.min_size_test`) turns it into a p-value; its null (normal log values) is assumed,
    not derived, for this statistic. None when the row recorded no sizes or fewer steps."""
    sizes = recorded_sizes(row, steps)
    if sizes is None:
        return None
    out = {}
    for m, lv in sizes.items():
        cap = max((v for h in lv.values() for v in h[:steps] if v is not None), default=None)
        if cap is None:
            out[m] = {"p": None, "min_label": None}
            continue
        stat = {int(k): math.exp(statistics.fmean(math.log(max(cap if v is None else v, 1e-6)) for v in h[:steps]))
                for k, h in lv.items()}
        res = level_anomaly(stat, m)
        out[m] = {"p": res.p_value, "min_label": res.min_label}
    return out


def auc(rows: Sequence[dict]) -> float | None:
    """ROC AUC of "backdoored" by smaller combined p-value (Mann-Whitney; ties count half; a missing p counts as 1)."""
    bd = [1.0 if r["p"] is None else r["p"] for r in rows if r["true_target"] is not None]
    cl = [1.0 if r["p"] is None else r["p"] for r in rows if r["true_target"] is None]
    if not bd or not cl:
        return None
    return sum((b < c) + 0.5 * (b == c) for b in bd for c in cl) / (len(bd) * len(cl))


def verdict_key(r: dict) -> tuple[str, Any]:
    """What "the same verdict" compares: the status and, when flagged, the suspected class."""
    return r["status"], r["suspect"] if r["flagged"] else None


def same_verdict(rows: Iterable[dict]) -> tuple[int, int]:
    """(models whose status and class agree under every seed scanned, models scanned under two seeds or more)."""
    by: dict[str, set[tuple[str, Any]]] = {}
    seeds: dict[str, set[int]] = {}
    for r in rows:
        by.setdefault(r["model"], set()).add(verdict_key(r))
        seeds.setdefault(r["model"], set()).add(r["seed"])
    multi = [m for m in by if len(seeds[m]) > 1]
    return sum(len(by[m]) == 1 for m in multi), len(multi)


def summary(rows: Sequence[dict]) -> dict[str, Any]:
    """TPR, FPR, AUC, seed agreement and median seconds of a group of rows (every seed counts once per model)."""
    bd = [r for r in rows if r["true_target"] is not None]
    cl = [r for r in rows if r["true_target"] is None]
    agree, multi = same_verdict(rows)
    return {"scans_backdoored": len(bd), "scans_clean": len(cl),
            "tpr": sum(r["right"] for r in bd) / len(bd) if bd else None,
            "flagged_any_class": sum(r["flagged"] for r in bd) / len(bd) if bd else None,
            "fpr": sum(r["flagged"] for r in cl) / len(cl) if cl else None, "auc": auc(rows),
            "same_verdict": agree, "models_multi_seed": multi,
            "median_seconds": statistics.median(r["seconds"] for r in rows) if rows else None,
            # scans whose two-look schedule looked twice (rows recorded before the schedule, or replays, say None)
            "second_looks": sum(r.get("looks") == 2 for r in rows), "looks_known": sum(r.get("looks") is not None for r in rows)}


#: family labels of the zoo's architectures (its folder rows' too)
FAMILY_LABELS = {**BDSCAN_ARCHS, "hf_vit": "ViT (Hugging Face folder)"}


def groups(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The groups the tables report: all, per family, per attack kind (clean twins in every kind's FPR), per data set."""
    out: dict[str, list[dict]] = {"all": list(rows)}
    for a in sorted({r["arch"] for r in rows}):
        out[f"family {FAMILY_LABELS.get(a, a)}"] = [r for r in rows if r["arch"] == a]
    clean = [r for r in rows if r["attack"] is None]
    for k in sorted({r["attack"] for r in rows if r["attack"] is not None}):
        out[f"attack {k}"] = [r for r in rows if r["attack"] == k] + clean
    for d in sorted({r["dataset"] for r in rows}):
        out[f"data {d}"] = [r for r in rows if r["dataset"] == d]
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def replay(row: dict, levels: Sequence[str], detectors: Sequence[str], alpha: float) -> dict[str, Any]:
    """The verdict ``row``'s scan would have given with only these Neural Cleanse ``levels`` and other ``detectors``,
    from the p-values it recorded, by the scan's own nested rule (docs/verdict.md): Neural Cleanse's p-value is its
    smallest level p-value times the number of its levels; the combined one the weighted Bonferroni over the
    detectors (:func:`decide`), at most ``alpha`` to flag, naming the deciding one's class. Levels or detectors the
    scan did not run, or that had no p-value (inconclusive), are left out of both counts, as in a scan.

    Args:
        row: a benchmark row (``levels``: level -> {p, min_label}; ``evidence``: detector -> {p, target, weight}).
        levels: Neural Cleanse's levels to keep (none: Neural Cleanse left out).
        detectors: the other detectors to keep, e.g. ("mm-bd",).
        alpha: the verdict's level.

    Returns:
        ``row`` with status, suspect, p, decided_by, flagged and right replaced.
    """
    lv = {m: v for m, v in (row.get("levels") or {}).items() if m in levels and v.get("p") is not None}
    cands: dict[str, tuple[float, Any, float]] = {}
    nc = (row.get("evidence") or {}).get("neural-cleanse") or {}
    if "levels" not in row and set(levels) == set(DEFAULT_LEVELS) and nc.get("p") is not None:
        # recorded before rows kept their levels: the scan's own Neural Cleanse p-value is the default levels'
        cands["neural-cleanse"] = (float(nc["p"]), nc.get("target"), 1.0)
    elif lv:
        best = min(lv, key=lambda m: lv[m]["p"])
        cands["neural-cleanse"] = (min(1.0, len(lv) * lv[best]["p"]), lv[best].get("min_label"), 1.0)
    return decide(row, cands | others(row, detectors), alpha)


def others(row: dict, detectors: Sequence[str]) -> dict[str, tuple[float, Any, float]]:
    """The recorded (p-value, class, weight) of each of ``detectors`` that gave a p-value in ``row``'s scan."""
    out: dict[str, tuple[float, Any, float]] = {}
    for d in detectors:
        e = (row.get("evidence") or {}).get(d) or {}
        if e.get("p") is not None:
            out[d] = (float(e["p"]), e.get("target"), float(e.get("weight") or 1.0))
    return out


def decide(row: dict, cands: dict[str, tuple[float, Any, float]], alpha: float) -> dict[str, Any]:
    """The combined verdict over ``cands`` (detector -> (p-value, class, weight)) by the scan's weighted Bonferroni
    (:func:`bdscan.detect.base.combine`): each p-value times the sum of the weights over its own (times their
    number when the weights are equal), the smallest at most ``alpha`` to flag; ``row`` with the verdict's fields
    replaced."""
    out = dict(row)
    if not cands:
        out.update(status="inconclusive", suspect=None, p=None, decided_by=None, flagged=False,
                   right=row["true_target"] is None)
        return out
    # the scan's own rule decides which detector's corrected p-value counts (the flag below keeps the replay's
    # reading: a p-value at most alpha flags, whether or not the detector named a class)
    v = combine_detectors([Evidence(d, "clean", None, 0.0, 0.0, "", {}, p, w) for d, (p, _, w) in cands.items()], alpha)
    by, p = v.decided_by.detector, float(v.p_value)  # type: ignore[union-attr, arg-type]
    flagged = p <= alpha
    suspect = cands[by][1] if flagged else None
    right = (flagged and suspect == row["true_target"]) if row["true_target"] is not None else not flagged
    out.update(status="backdoor" if flagged else "clean", suspect=suspect, p=p, decided_by=by, flagged=flagged, right=right)
    return out


def replayable(row: dict, levels: Sequence[str]) -> bool:
    """Whether ``row`` recorded what a replay with these levels needs (rows recorded before the benchmark kept each
    level's p-value hold only the default levels' combined one)."""
    return not levels or "levels" in row or set(levels) == set(DEFAULT_LEVELS)


def parse_combo(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """"pixel,patch,blend,mm-bd" -> ((levels), (other detectors)): Neural Cleanse's levels, then the other registered
    detectors. Anything else stops the replay: a misspelt name would otherwise be replayed as a detector that never
    ran, and the table would silently judge by fewer levels than asked."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    others = [d for d in DETECTORS if d != "neural-cleanse"]
    bad = [x for x in items if x not in LEVELS and x not in others]
    if bad:
        raise SystemExit(f"zoo-detect --replay: {bad[0]!r} in {text!r} is neither a Neural Cleanse level ({', '.join(LEVELS)}) "
                         f"nor another detector ({', '.join(others)}); Neural Cleanse is named by its levels, e.g. pixel,patch")
    return tuple(x for x in items if x in LEVELS), tuple(x for x in items if x not in LEVELS)


def select(entries: Sequence[dict], args: argparse.Namespace, root: Path) -> list[dict]:
    """The manifest rows to scan: the split, ``--only``/``--cell``, built models only (a file beside the manifest)."""
    out = []
    for e in entries:
        if e.get("split") != args.split or (args.only and e["name"] not in args.only):
            continue
        if args.cell and e.get("cell") not in args.cell:
            continue
        if not (e.get("sha256") and (root / e["file"]).exists()):
            continue
        if e.get("attack") is not None and (e.get("asr") or 0.0) < MIN_ASR:
            # a backdoor that does not work is not one to find: such a row fails the zoo's targets and is rebuilt
            log_skip(e)
            continue
        out.append(e)
    return out


def log_skip(e: dict) -> None:
    print(f"skipped {e['name']}: its attack success rate {e.get('asr')} is under the zoo's {MIN_ASR:.0%} (no working backdoor)",
          file=sys.stderr)


def print_summary(rows: Sequence[dict]) -> None:
    """The per-group table: TPR, flagged, FPR, AUC, seed agreement, median seconds."""
    table_header("group", "backdoored scans", "clean scans", "TPR (right class)", "flagged (any class)", "FPR", "AUC",
                 "same verdict, all seeds", "median s", "looked twice")
    for name, rs in groups(rows).items():
        s = summary(rs)
        auc_s = "—" if s["auc"] is None else f"{s['auc']:.2f}"
        sec_s = "—" if s["median_seconds"] is None else f"{s['median_seconds']:.0f}"
        twice = f"{s['second_looks']}/{s['looks_known']}" if s["looks_known"] else "—"
        print(f"| {name} | {s['scans_backdoored']} | {s['scans_clean']} | {_pct(s['tpr'])} | {_pct(s['flagged_any_class'])} "
              f"| {_pct(s['fpr'])} | {auc_s} | {s['same_verdict']}/{s['models_multi_seed']} | {sec_s} | {twice} |")


def matrix(rows: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """Every cell's scans by attack kind, the cells the issue's targets are stated for: cell ("<data set> <family>")
    -> kind -> (backdoored scans found with the true target, backdoored scans), and "clean" -> (clean scans flagged,
    clean scans)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for (d, a) in sorted({(r["dataset"], r["arch"]) for r in rows}):
        cell = [r for r in rows if (r["dataset"], r["arch"]) == (d, a)]
        kinds = {k: [r for r in cell if r["attack"] == k] for k in sorted({r["attack"] for r in cell if r["attack"] is not None})}
        counts = {k: (sum(r["right"] for r in rs), len(rs)) for k, rs in kinds.items()}
        clean = [r for r in cell if r["attack"] is None]
        if clean:
            counts["clean"] = (sum(r["flagged"] for r in clean), len(clean))
        out[f"{d} {FAMILY_LABELS.get(a, a)}"] = counts
    return out


def print_matrix(rows: Sequence[dict]) -> None:
    """:func:`matrix` as a table: one row a cell, one column an attack kind (found / scans), then the clean models
    (flagged / scans); an empty cell had no scan of that kind."""
    m = matrix(rows)
    kinds = sorted({k for counts in m.values() for k in counts if k != "clean"})
    table_header("cell", *(f"{k} found" for k in kinds), "clean flagged")
    for cell, counts in m.items():
        cells = [f"{counts[k][0]}/{counts[k][1]}" if k in counts else "" for k in (*kinds, "clean")]
        print(f"| {cell} | {' | '.join(cells)} |")


def per_seed(rows: Sequence[dict]) -> dict[str, dict[int, dict[str, int]]]:
    """The issue's targets are stated for one run per seed: group (as :func:`groups`, attack kinds left out) -> seed ->
    counts (backdoored scans found with the true target, backdoored scans, clean scans flagged, clean scans)."""
    out: dict[str, dict[int, dict[str, int]]] = {}
    for name, rs in groups(rows).items():
        if name.startswith("attack "):
            continue
        out[name] = {}
        for seed in sorted({r["seed"] for r in rs}):
            bd = [r for r in rs if r["seed"] == seed and r["true_target"] is not None]
            cl = [r for r in rs if r["seed"] == seed and r["true_target"] is None]
            out[name][seed] = {"found": sum(r["right"] for r in bd), "backdoored": len(bd),
                               "clean_flagged": sum(r["flagged"] for r in cl), "clean": len(cl)}
    return out


def print_per_seed(rows: Sequence[dict]) -> None:
    """:func:`per_seed` as a table: one row a group, per seed the backdoors found and the clean models flagged."""
    seeds = sorted({r["seed"] for r in rows})
    table_header("group", *(f"seed {s}: found" for s in seeds), *(f"seed {s}: clean flagged" for s in seeds))
    for name, by_seed in per_seed(rows).items():
        found = [_ratio(by_seed.get(s), "found", "backdoored") for s in seeds]
        flagged = [_ratio(by_seed.get(s), "clean_flagged", "clean") for s in seeds]
        print(f"| {name} | {' | '.join(found)} | {' | '.join(flagged)} |")


def _ratio(counts: dict[str, int] | None, part: str, whole: str) -> str:
    return f"{counts[part]}/{counts[whole]}" if counts and counts[whole] else "—"


def seed_flips(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """The models scanned under several seeds whose verdict (status and suspected class) is not the same under all
    of them, each with its rows in seed order: where the verdict depends on the seed."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    out = []
    for m in sorted(by):
        rs = sorted(by[m], key=lambda r: r["seed"])
        if len(rs) > 1 and len({verdict_key(r) for r in rs}) > 1:
            out.append((m, rs))
    return out


def print_seed_flips(rows: Sequence[dict]) -> None:
    """:func:`seed_flips` as a table: each seed's verdict and combined p-value, and how many looks it took."""
    flips = seed_flips(rows)
    if not flips:
        return
    table_header("verdict depends on the seed", "attack", "true target", "per seed: verdict, p (looks)")
    for m, rs in flips:
        tt = "clean" if rs[0]["true_target"] is None else rs[0]["true_target"]
        print(f"| {m} | {rs[0]['attack'] or 'clean'} | {tt} | {'; '.join(_seed_verdict(r) for r in rs)} |")


def _seed_verdict(r: dict) -> str:
    """"1: backdoor 8, 0.014 (1)": a row's seed, verdict, combined p-value and looks."""
    verdict = f"{r['status']} {r['suspect']}" if r["flagged"] else r["status"]
    p = "—" if r["p"] is None else f"{r['p']:.3g}"
    return f"{r['seed']}: {verdict}, {p} ({r.get('looks') or '?'})"


def recorded_rows(args: argparse.Namespace, option: str) -> tuple[dict, list[dict]]:
    """The recorded scan document (``--out``) and the rows of ``--seeds`` (and ``--only``) of it and of ``--also``'s
    recordings, for an offline replay. Each row keeps its recording's key and path (``recorded_key``, ``recorded_in``:
    in memory only), so that a replay judges it under the schedule it ran; a (model, seed) recorded in several files
    (on the model's current build) is taken from the first."""
    docs = [(path, read_json(path)) for path in (args.out, *args.also)]
    for path, doc in docs:
        if not doc or not doc.get("rows"):
            raise SystemExit(f"zoo-detect {option}: no recorded scans in {path} (run the benchmark first, or give --out)")
    seeds = {int(s) for s in str(args.seeds).split(",") if s.strip()}
    rows = [r | {"recorded_key": doc.get("key") or {}, "recorded_in": str(path)}
            for path, doc in docs for r in doc["rows"] if r["seed"] in seeds and (not args.only or r["model"] in args.only)]
    current, stale = split_stale(rows, read_json(args.manifest) or [])
    if stale:
        print(f"({len(stale)} scans left out: their models were rebuilt or reset since: "
              f"{', '.join(sorted({r['model'] for r in stale}))})\n")
    first: dict[tuple[str, int], dict] = {}
    for r in current:
        first.setdefault((r["model"], r["seed"]), r)
    current = list(first.values())
    if getattr(args, "noise", None):
        current = with_noise(current, args.noise, read_json(args.manifest) or [], args.noise_p,
                             args.noise_splits_below)
    if args.also:
        counts = [sum(r["recorded_in"] == str(path) for r in current) for path, _ in docs]
        print("Recordings: " + "; ".join(f"{path} ({n} scans, {d['key']})" for (path, d), n in zip(docs, counts, strict=True))
              + "\n")
    return docs[0][1], current


def with_noise(rows: list[dict], paths: Sequence[Path], manifest: Sequence[dict], rule: str = "larger",
               splits_below: int = 0) -> list[dict]:
    """``rows`` with the neuron-noise detector's evidence added from ``neuron-noise`` benchmark recordings: for each
    scan of a model with a LayerNorm (the detector's reach), the recorded run at the same seed with the detector's
    own bound and steps (halves, cross-fit or no split, as recorded: the files must give a scan one kind), judged by
    the detector's test (its p-value joined by ``rule``, the detector's ``p_rule``). With ``splits_below`` (the
    detector's), a model whose data set's bundled images are fewer takes the runs at every split's seed
    (:func:`split_seeds`) and the smallest p-value times their number. Models without a LayerNorm keep their rows
    (the detector reports "not applicable" there); a LayerNorm model's scan with no such run is left out and named."""
    from benchmarks.common import NeuronNoise, NeuronNoiseConfig, split_seeds
    from benchmarks.neuron_noise import detector_evidence

    cfg = NeuronNoiseConfig(p_rule=rule, splits_below=splits_below)
    # the bundled images' count decides the splits: read once per data set, and only when splits are asked for
    counts = {d: _bundled_images(d) for d in {e.get("dataset") for e in manifest}} if splits_below else {}
    images = {e["name"]: counts.get(e.get("dataset")) for e in manifest}
    runs: dict[tuple[str, int], dict] = {}
    kinds: dict[tuple[str, int], tuple[bool, bool]] = {}
    for path in paths:
        for r in (read_json(path) or {}).get("rows", []):
            if r.get("mode") == "untargeted" and r.get("eps") == [cfg.eps] and r.get("steps") == cfg.steps:
                key, kind = (r["model"], int(r["seed"])), (bool(r.get("cross_fit", False)), bool(r.get("no_split", False)))
                if kinds.setdefault(key, kind) != kind:
                    raise SystemExit(f"--noise: {key[0]} at seed {key[1]} is recorded more than one way (halves, cross-fit, "
                                     "no split); give the files of one kind")
                runs.setdefault(key, r["runs"][0])
    layer_norm = {e["name"] for e in manifest if e.get("arch") in LAYER_NORM_ARCHS}
    out, missing = [], []
    for row in rows:
        if row["model"] not in layer_norm:
            out.append(row)
            continue
        seeds = split_seeds(cfg.with_(seed=row["seed"]), images.get(row["model"]) or 0)
        found = [runs.get((row["model"], s)) for s in seeds]
        if any(run is None for run in found):
            missing.append(f"{row['model']} (seed {row['seed']})")
            continue
        p, target = detector_evidence(found, rule)
        status = "inconclusive" if p is None else "backdoor" if p <= cfg.alpha else "clean"
        ev = {"status": status, "target": target, "p": p, "weight": NeuronNoise.weight}
        out.append(row | {"evidence": dict(row.get("evidence") or {}) | {"neuron-noise": ev}})
    if missing:
        print(f"({len(missing)} LayerNorm scans left out: no neuron-noise run at their seed: {', '.join(sorted(missing))})\n")
    return out


def _bundled_images(dataset: str | None) -> int | None:
    """How many images the data set's bundled samples hold (what a zoo model is scanned with), or None."""
    path = DATASET_SAMPLES.get(dataset or "")
    if path is None or not Path(path).exists():
        return None
    with np.load(path) as d:
        return len(d["y"])


#: the zoo's architectures with a LayerNorm (the neuron-noise detector's reach; ``has_layer_norm`` on the built models)
LAYER_NORM_ARCHS = ("bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct", "hf_vit")


def split_stale(rows: Sequence[dict], manifest: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``rows`` split into those of the manifest's current builds and the stale ones: a row recorded on a model file
    whose SHA-256 the manifest no longer holds (re-planned, reset or rebuilt since) measures a model that is gone.
    Rows recorded before they kept their file's digest (no ``sha16``) are kept."""
    sha = {e["name"]: (e.get("sha256") or "")[:16] for e in manifest}
    current: list[dict] = []
    stale: list[dict] = []
    for r in rows:
        (stale if r.get("sha16") and sha.get(r["model"]) != r["sha16"] else current).append(r)
    return current, stale


def recorded_schedule(doc: dict, alpha: float) -> tuple[int, int, float, float] | None:
    """The two-look schedule a recording's scans ran under, at the replay's ``alpha``, as (S1, S2, A1, C); None for
    one look (``--steps`` turns the second look off). Resolved as a scan resolves it (:func:`resolve_second_look`)."""
    key = doc.get("key") or {}
    if key.get("steps") is not None:
        return None
    name = key.get("budget") or DEFAULT_BUDGET
    steps = budget_config(name).steps
    look = resolve_second_look("auto", name, steps, alpha)
    return None if look is None else (look.first_steps, steps, look.alpha_first, look.clean_above)


def replay_as_run(row: dict, levels: Sequence[str], detectors: Sequence[str], alpha: float,
                  schedule: tuple[int, int, float, float] | None, floors: Floors = None) -> dict[str, Any] | None:
    """:func:`replay` for a one-look scan; a scan that ran the two-look schedule is re-judged by that schedule from
    its recorded sizes (:func:`two_look`: its looks' corrections included), None when it would need a second look it
    did not record. Rows recorded before scans kept their sizes are judged by :func:`replay` as before. With
    ``floors``, a one-look scan's levels are judged again from its last recorded sizes (None without sizes)."""
    if schedule is None or row.get("looks") is None or not row.get("sizes"):
        if floors is None:
            return replay(row, levels, detectors, alpha)
        steps = min((len(h) for lv in (row.get("sizes") or {}).values() for h in lv.values()), default=0)
        lv = levels_at(row, steps, floors) if steps else None
        return None if lv is None else replay(row | {"levels": lv}, levels, detectors, alpha)
    s1, s2, a1, c = schedule
    return two_look(row, s1, s2, a1, c, alpha, levels, detectors, floors)


def floor_note(args: argparse.Namespace) -> str:
    """The replay header's note of ``--spread-floor`` (nothing when the scans' own floor judges)."""
    return f", spread floor {args.spread_floor} (replayed)" if args.spread_floor else ""


def source(args: argparse.Namespace) -> str:
    """The recordings an offline mode reads, for its header: --out, and how many more --also adds."""
    return f"{args.out} and {len(args.also)} more recordings" if args.also else f"{args.out}"


def run_replay(args: argparse.Namespace) -> None:
    """``--replay``: the recorded rows re-judged under each combination of levels and detectors (under the schedule
    they ran: one look, or the budget's two looks)."""
    doc, rows = recorded_rows(args, "--replay")
    schedules = [recorded_schedule({"key": r["recorded_key"]}, args.alpha) for r in rows]  # each under its own recording
    print(f"Replayed from {source(args)} ({len(rows)} scans; recorded with {doc['key']}), alpha {args.alpha:g}{floor_note(args)}\n")
    floors = parse_floor(args.spread_floor)
    for combo in args.replay:
        levels, dets = parse_combo(combo)
        print(f"### {combo}: levels {', '.join(levels) or 'none'}; detectors {', '.join(('neural-cleanse',) * bool(levels) + dets)}\n")
        kept = [(r, sch) for r, sch in zip(rows, schedules, strict=True) if replayable(r, levels)]
        if len(kept) < len(rows):
            print(f"({len(rows) - len(kept)} scans left out: recorded without their levels' own p-values)\n")
        judged = [j for j in (replay_as_run(r, levels, dets, args.alpha, sch, floors) for r, sch in kept) if j is not None]
        if len(judged) < len(kept):
            print(f"({len(kept) - len(judged)} scans left out: they would need a second look that was not recorded)\n")
        print_summary(judged)
        print()


def run(args: argparse.Namespace) -> None:
    if args.out.name == "zoo_detect.json":
        args.out = args.out.with_name(f"zoo_detect_{args.split}.json")
    if args.replay_steps:
        run_replay_steps(args)
        return
    if args.replay_two_look:
        run_replay_two_look(args)
        return
    if args.spread_floor and not (args.replay or args.replay_steps or args.replay_two_look):
        raise SystemExit("zoo-detect --spread-floor re-judges recorded sizes in --replay, --replay-steps and --replay-two-look "
                         "only: add one of them, or drop --spread-floor")
    if args.replay_trajectory:
        run_replay_trajectory(args)
        return
    if args.seed_noise:
        run_seed_noise(args)
        return
    if args.replay:
        run_replay(args)
        return
    if args.summary:
        run_summary(args)
        return
    if args.also:
        raise SystemExit("zoo-detect --also joins recordings for --summary and the replays only; a scanning run reads and "
                         "writes --out alone: drop --also, or add --summary to read them")
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    entries = select(read_json(args.manifest), args, args.manifest.parent)
    key = {"detectors": args.detectors, "budget": args.budget, "steps": args.steps, "alpha": args.alpha, "split": args.split}
    if args.levels is not None:  # only when given, so that results recorded before the option keep their key
        key["levels"] = args.levels
    prev = read_json(args.out)
    rows: list[dict] = prev["rows"] if prev and prev.get("key") == key else []
    done = {(r["model"], r["seed"], r.get("sha16")) for r in rows}
    for seed in seeds:
        for e in entries:
            f = args.manifest.parent / e["file"]
            digest = sha16(f)
            if (e["name"], seed, digest) in done:
                continue
            doc, wall = scan_one(f, DATASET_SAMPLES[e["dataset"]], args.detectors, args.budget, args.steps, seed, args.alpha, args.threads,
                                 args.levels)
            row = row_of(e, doc, seed, wall) | {"sha16": digest}
            rows = [r for r in rows if (r["model"], r["seed"]) != (e["name"], seed)] + [row]
            print_row({k: v for k, v in row.items() if k != "evidence"})
            write_json(args.out, {"benchmark": "zoo-detect", "key": key, "when": utc_now(),
                                  "machine": machine_line(threads=args.threads), "rows": rows})
    names = {e["name"] for e in entries}
    print_recorded(args, args.detectors, [r for r in rows if r["seed"] in seeds and r["model"] in names])


def run_summary(args: argparse.Namespace) -> None:
    """``--summary``: the recorded verdicts' tables (--out), as a finished run prints them; while a run goes on, what
    it has scanned so far."""
    doc, rows = recorded_rows(args, "--summary")
    print(f"Recorded in {source(args)} ({len(rows)} scans, {doc.get('when', '?')}; recorded with {doc['key']})")
    print_recorded(args, doc["key"]["detectors"], rows)


def print_recorded(args: argparse.Namespace, detectors: str, rows: list[dict]) -> None:
    """Every scan's row, then the summary tables (all, per family, per attack kind, per data set); ``detectors``: the
    comma-separated detectors the rows were scanned with."""
    print(f"\nEvaluation zoo, {args.split} half: detectors {detectors}"
          f"{f' (levels {args.levels})' if args.levels else ''}, budget {args.budget}"
          f"{f', {args.steps} steps' if args.steps else ''}, seeds {args.seeds}, alpha {args.alpha:g}; "
          f"{machine_line(threads=args.threads)}\n")
    dets = [d.strip() for d in detectors.split(",")]
    table_header("model", "attack", "seed", "verdict", "p", "by", *(f"{d} p (class)" for d in dets), "true target", "right", "s")
    for r in sorted(rows, key=lambda r: (r["true_target"] is None, r["model"], r["seed"])):
        tt = "clean" if r["true_target"] is None else str(r["true_target"])
        ev = [r["evidence"].get(d, {}) for d in dets]
        cells = [f"{e.get('p') if e.get('p') is not None else '—'} ({e.get('target')})" for e in ev]
        verdict = f"{r['status']} {r['suspect']}" if r["flagged"] else r["status"]
        print(f"| {r['model']} | {r['attack'] or 'clean'} | {r['seed']} | {verdict} | {r['p'] if r['p'] is not None else '—'} "
              f"| {r['decided_by'] or '—'} | {' | '.join(cells)} | {tt} | {'yes' if r['right'] else 'NO'} | {r['seconds']:.0f} |")
    print()
    print_summary(rows)
    print()
    print_matrix(rows)
    if len({r["seed"] for r in rows}) > 1:
        print()
        print_per_seed(rows)
        print()
        print_seed_flips(rows)


def run_replay_steps(args: argparse.Namespace) -> None:
    """``--replay-steps``: the recorded rows re-judged as if each scan had stopped after S steps."""
    doc, rows = recorded_rows(args, "--replay-steps")
    levels, dets = parse_combo(args.replay[0] if args.replay else ",".join(DEFAULT_LEVELS))
    print(f"Replayed from {source(args)} ({len(rows)} scans; recorded with {doc['key']}), levels {', '.join(levels)}, "
          f"detectors {', '.join(('neural-cleanse', *dets))}, alpha {args.alpha:g}{floor_note(args)}\n")
    floors = parse_floor(args.spread_floor)
    for steps in [int(s) for s in args.replay_steps.split(",") if s.strip()]:
        judged = []
        for r in rows:
            lv = levels_at(r, steps, floors)
            if lv is not None:
                judged.append(replay(r | {"levels": lv}, levels, dets, args.alpha) | {"looks": None})  # one look at S steps
        print(f"### {steps} steps ({len(judged)} of {len(rows)} scans recorded that long)\n")
        print_summary(judged)
        print()
        table_header("model", "seed", "verdict", "p", *(f"{m} p (class)" for m in levels), "true target")
        for r in sorted(judged, key=lambda r: (r["true_target"] is None, r["model"], r["seed"])):
            lv = levels_at(r, steps, floors) or {}
            cells = [f"{lv[m]['p']:.4f} ({lv[m]['min_label']})" if lv.get(m, {}).get("p") is not None else "—" for m in levels]
            verdict = f"{r['status']} {r['suspect']}" if r["flagged"] else r["status"]
            truth = "clean" if r["true_target"] is None else r["true_target"]
            print(f"| {r['model']} | {r['seed']} | {verdict} | {r['p']:.4f} | {' | '.join(cells)} | {truth} |")
        print()


def two_look(row: dict, s1: int, s2: int, a1: float, c: float, alpha: float, levels: Sequence[str],
             detectors: Sequence[str], floors: Floors = None) -> dict[str, Any] | None:
    """The verdict of a two-look schedule replayed from ``row``'s sizes (None when not recorded for ``s2`` steps).

    After ``s1`` steps the scan flags when the combined p-value is at most ``a1`` and stops as clean when it exceeds
    ``c``; otherwise every class runs on to ``s2`` steps and the scan flags at ``alpha - a1``. Under the null, the
    first look flags with probability at most ``a1`` and the second at most ``alpha - a1``, so the schedule's
    false-alarm rate is at most ``alpha`` whatever ``c`` (stopping as clean never adds a flag).

    A scan the first look decides needs only ``s1`` recorded steps, so the schedule replays on the rows of a default
    run too (which stopped at its own first look): exactly for any ``a1`` and ``c`` that send to the second look
    only scans the run itself sent there, and None for a scan that would need a second look the run did not record.

    ``floors``: the size test's spread floor per level (default: the scan's own).

    Returns:
        the replayed row with ``looks`` (1 or 2) and ``steps_run`` added; None when the sizes it needs were not recorded.
    """
    lv1 = levels_at(row, s1, floors)
    if lv1 is None:
        return None
    first = replay(row | {"levels": lv1}, levels, (), a1)
    p1 = first["p"]
    # as bdscan.detect.scan's SecondLook: an inconclusive first look is in doubt too; the reported p-value carries
    # the look's correction (alpha / a1, or alpha / (alpha - a1)), so that AUCs compare with one-look scans
    if p1 is not None and (first["flagged"] or p1 > c):
        return _with_others(row, first | {"p": min(1.0, p1 * alpha / a1), "looks": 1, "steps_run": s1}, lv1, detectors, alpha)
    lv2 = levels_at(row, s2, floors)
    if lv2 is None:
        return None
    second = replay(row | {"levels": lv2}, levels, (), alpha - a1)
    p2 = second["p"]
    return _with_others(row, second | {"p": None if p2 is None else min(1.0, p2 * alpha / (alpha - a1)), "looks": 2,
                                       "steps_run": s2}, lv2, detectors, alpha)


def _with_others(row: dict, nc: dict, lv: dict, detectors: Sequence[str], alpha: float) -> dict:
    """Neural Cleanse's verdict after its looks (its p-value carrying the looks' correction), combined with the other
    detectors' recorded evidence as a scan combines them: the looks are Neural Cleanse's own (its detector runs
    them), and the combined rule then weighs its final p-value against the others'."""
    if not detectors:
        return nc
    cands: dict[str, tuple[float, Any, float]] = {}
    if nc["p"] is not None:
        ok = {m: v for m, v in lv.items() if v.get("p") is not None}
        cands["neural-cleanse"] = (nc["p"], min(ok.values(), key=lambda v: v["p"]).get("min_label") if ok else None, 1.0)
    return decide(row, cands | others(row, detectors), alpha) | {"looks": nc["looks"], "steps_run": nc["steps_run"]}


def run_replay_trajectory(args: argparse.Namespace) -> None:
    """``--replay-trajectory S``: one look after S steps, judged on the final sizes (a scan's statistic) and on the
    trajectory statistic (:func:`levels_trajectory`), over the same scans."""
    _, rows = recorded_rows(args, "--replay-trajectory")
    steps = args.replay_trajectory
    levels, dets = parse_combo(args.replay[0] if args.replay else ",".join(DEFAULT_LEVELS))
    kept = [r for r in rows if levels_at(r, steps) is not None]
    print(f"Replayed from {source(args)}: one look after {steps} steps, levels {', '.join(levels)}, alpha {args.alpha:g}; "
          f"{len(kept)} of {len(rows)} scans recorded that long\n")
    for title, stat in (("the size at that step (a scan's statistic)", levels_at),
                        ("the geometric mean size over the steps (trajectory)", levels_trajectory)):
        judged = [replay(r | {"levels": stat(r, steps)}, levels, dets, args.alpha) | {"looks": None} for r in kept]
        print(f"### {title}\n")
        print_summary(judged)
        print()
        clean_p = [r["p"] for r in judged if r["true_target"] is None and r["p"] is not None]
        if clean_p:
            print(f"smallest clean p-value: {min(clean_p):.3g}\n")


def run_replay_two_look(args: argparse.Namespace) -> None:
    """``--replay-two-look``: the recorded rows re-judged by a two-look schedule, beside one look at S1 and at S2."""
    _, rows = recorded_rows(args, "--replay-two-look")
    s1, s2, a1, c = (t(v) for t, v in zip((int, int, float, float), args.replay_two_look.split(":"), strict=True))
    levels, dets = parse_combo(args.replay[0] if args.replay else ",".join(DEFAULT_LEVELS))
    floors = parse_floor(args.spread_floor)
    replayed = [(r, two_look(r, s1, s2, a1, c, args.alpha, levels, dets, floors)) for r in rows]
    judged = [j for _, j in replayed if j is not None]
    print(f"Replayed from {source(args)}: two looks: {s1} steps (flag at p <= {a1:g}, clean at p > {c:g}), else {s2} steps at "
          f"alpha {args.alpha - a1:g}{floor_note(args)}; {len(judged)} of {len(rows)} scans judged (the others' sizes were not recorded "
          f"for the steps they would need)\n")
    missing = sorted(f"{r['model']} (seed {r['seed']})" for r, j in replayed if j is None)
    if missing:  # what to scan again with --steps S2 to judge them
        print(f"not judged: {', '.join(missing)}\n")
    def once(steps: int) -> list[dict]:  # one look at ``steps``, over the scans recorded for s2 steps
        return [replay(r | {"levels": levels_at(r, steps, floors)}, levels, dets, args.alpha) | {"looks": None}
                for r in rows if levels_at(r, s2) is not None]

    for name, rs in ((f"one look, {s1} steps", once(s1)), (f"one look, {s2} steps", once(s2)),
                     ("two looks", judged)):
        print(f"### {name}\n")
        print_summary(rs)
        print()
    if judged:
        second = sum(j["looks"] == 2 for j in judged)
        mean = statistics.fmean(j["steps_run"] for j in judged)
        print(f"second look on {second} of {len(judged)} scans; mean steps {mean:.1f} ({mean / s1:.2f}x the first look alone)")
    if len({j["seed"] for j in judged}) > 1:  # the two looks' verdicts per seed, and where the seed changes them
        print()
        print_per_seed(judged)
        print()
        print_seed_flips(judged)

