"""The scan document: one JSON that the console, HTML and SARIF renderers all read.

Schema ``bdscan.scan/3`` (documented in docs/scan-json.md; what changed from schemas 1 and 2 is listed there, and
``bdscan report`` still reads their documents). Everything that can differ between two runs
with the same inputs and seed lives under ``timings`` (wall times) and ``invocation`` (the paths as the user
gave them, and where the outputs went), so two runs compare equal once those keys are removed. Each detector's section is what its result returns
(:meth:`bdscan.detect.base.DetectorResult.section`), stored under the detector's ``json_key``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bdscan.data import CleanData
from bdscan.detect.base import ALPHA_PROVISIONAL, COMBINE_RULE, DETECTORS, CombinedVerdict, DetectorResult, Evidence, p_number
from bdscan.io.base import LoadedModel, LoadOptions
from bdscan.jsonnum import json_number
from bdscan.machine import versions
from bdscan.report.images import trigger_images

if TYPE_CHECKING:
    from bdscan.repair.core import RepairResult

SCHEMA = "bdscan.scan/3"


def model_section(lm: LoadedModel) -> dict[str, Any]:
    info = lm.wrapper.info
    d: dict[str, Any] = {
        "file": lm.path.name,
        "sha256": lm.sha256,
        "format": lm.format,
        "arch": info.arch,
        "num_classes": info.num_classes,
        "class_names": [info.class_name(k) for k in range(info.num_classes)],
        "input_size": list(info.input_size),
        "mean": list(info.mean),
        "std": list(info.std),
        "scale": info.scale,
        "output": info.output,
        "parameters": sum(p.numel() for p in lm.wrapper.net.parameters()),
        "token_grid": info.token_grid.to_dict() if info.token_grid else None,
        "notes": list(lm.notes),
        "metadata": info.to_dict()["metadata"],
        "pickle_scan": None,
        "original_trigger": None,
    }
    if lm.pickle_scan is not None:
        ps = lm.pickle_scan
        d["pickle_scan"] = {
            "scanner": ps.scanner, "scanned_files": ps.scanned_files, "error": ps.error, "dangerous": ps.dangerous,
            "findings": [{"ref": f.ref, "severity": f.severity, "location": f.location} for f in ps.findings],
        }
    if lm.original_trigger is not None:
        t = lm.original_trigger
        d["original_trigger"] = {"attack": t.kind, "target": t.target, "params": t.params, "l1": json_number(t.l1()),
                                 "images": trigger_images(t, None)}
    return d


def example_image(data: CleanData, avoid: int | None) -> torch.Tensor | None:
    """A deterministic clean image to stamp (the first not of the suspected class)."""
    for i in range(len(data)):
        if avoid is None or int(data.y[i]) != avoid:
            return data.x[i]
    return None




def scan_document(lm: LoadedModel, data: CleanData, results: Mapping[str, DetectorResult], verdict: CombinedVerdict,
                  seed: int, example: torch.Tensor | None, seconds: float) -> dict[str, Any]:
    """The whole scan as a JSON-able dict (schema :data:`SCHEMA`).

    Args:
        lm: the loaded model.
        data: the clean data the detectors used.
        results: per detector name (in the order they ran), its result.
        verdict: the combined verdict (:func:`bdscan.detect.base.combine`).
        seed: the scan's seed.
        example: the clean image (C, H, W) stamped in the trigger pictures, or None.
        seconds: the scan's wall time.
    """
    info = lm.wrapper.info
    names = [info.class_name(k) for k in range(info.num_classes)]
    original = lm.original_trigger
    used = [r.samples_used for r in results.values() if getattr(r, "samples_used", None) is not None]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "versions": versions(),
        "seed": seed,
        "model": model_section(lm),
        "data": {"source": data.source, "images": len(data), **({"samples_used": max(used)} if used else {})},
    }
    sections: dict[str, Any] = {}
    timings: dict[str, Any] = {"total_s": round(seconds, 3)}
    for name, r in results.items():
        det = DETECTORS[name]
        sec = r.section(names, example, original)
        cfg = r.config.to_dict()
        if det.config_key:
            doc[det.config_key] = cfg
        else:
            sec = {"config": cfg, "evidence": evidence_dict(r), **sec}
        sections[det.json_key] = sec
        timings.update(r.timings() if hasattr(r, "timings") else {f"{name}_s": round(r.seconds, 3)})
    doc["verdict"] = verdict_section(verdict, names, original.target if original is not None else None, len(results) > 1)
    doc.update(sections)
    doc.update({"activations": None, "repair": None, "timings": timings})
    return doc


def evidence_dict(r: DetectorResult) -> dict[str, Any]:
    """A detector's evidence as its own section stores it (``<json_key>.evidence``)."""
    e = r.evidence
    return {"status": e.status, "target": e.target, "score": json_number(e.score), "threshold": e.threshold,
            "p_value": p_number(e.p_value), "weight": e.weight, "reason": e.reason, "details": dict(e.details)}


def evidence_row(e: Evidence, names: list[str]) -> dict[str, Any]:
    """One detector's evidence as the verdict lists it, beside the combined verdict."""
    title = DETECTORS[e.detector].title if e.detector in DETECTORS else e.detector
    return {"detector": e.detector, "title": title, "status": e.status, "target": e.target,
            "target_name": names[e.target] if e.target is not None and 0 <= e.target < len(names) else None,
            "score": json_number(e.score), "threshold": e.threshold, "p_value": p_number(e.p_value), "weight": e.weight,
            "reason": e.reason}


def verdict_section(v: CombinedVerdict, names: list[str], true_target: int | None, name_detector: bool) -> dict[str, Any]:
    """The verdict: status and target, how it was decided (the rule, alpha, the corrected p-value, the deciding
    detector and level), the deciding detector's own fields, every detector's evidence, the reason (and the
    lab's true target)."""
    d = v.decided_by
    out: dict[str, Any] = {"status": v.status, "target": v.target,
                           "target_name": names[v.target] if v.target is not None else None}
    out.update(dict(d.details) if d is not None else {})
    if name_detector:
        out["detector"] = d.detector if d is not None else None
    out.update({
        "rule": COMBINE_RULE if v.calibrated else "uncalibrated-status", "alpha": v.alpha, "alpha_provisional": ALPHA_PROVISIONAL,
        "p_value": p_number(v.p_value), "tests": v.tests, "calibrated": v.calibrated,
        "factors": {det: json_number(f) for det, f in v.factors},
        "decided_by": {"detector": d.detector, "test": (d.details or {}).get("basis"), "p_value": p_number(d.p_value)} if d else None,
        "disagree": [{"detector": det, "target": k} for det, k in v.disagree],
        "evidence": [evidence_row(e, names) for e in v.evidence],
    })
    out["reason"] = v.reason
    out["true_target"] = true_target
    return out


def unsafe_document(file_name: str, sha256: str, fmt: str | None, scanner: str | None, findings: list[str], seed: int,
                    reason: str) -> dict[str, Any]:
    """The document of a file refused as unsafe (a pipeline still gets machine-readable output)."""
    return {"schema": SCHEMA, "versions": versions(), "seed": seed,
            "model": {"file": file_name, "sha256": sha256, "format": fmt,
                      "pickle_scan": {"scanner": scanner, "dangerous": True, "error": None, "scanned_files": 1,
                                      "findings": [{"ref": f, "severity": "dangerous", "location": file_name} for f in findings]}},
            "verdict": {"status": "unsafe", "target": None, "reason": reason},
            "modes": {}, "activations": None, "repair": None, "timings": {}}


def repair_only_document(lm: LoadedModel, data: CleanData, seed: int, target: int | None) -> dict[str, Any]:
    """A document for a repair that ran without a scan, so the report can still render it."""
    return {"schema": SCHEMA, "versions": versions(), "seed": seed, "model": model_section(lm),
            "data": {"source": data.source, "images": len(data)}, "config": {}, "modes": {},
            "verdict": {"status": "inconclusive", "target": target, "reason": "No scan was run; repair only."},
            "activations": None, "repair": None, "timings": {}}


def repair_section(result: RepairResult, data: CleanData, export: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document's ``repair`` section: the repair's measurements, intervals and checks
    (:meth:`~bdscan.repair.core.RepairResult.to_dict`), the trigger it used as images (mask, pattern, mask×pattern
    and a clean image of another class stamped with it), and what happened to the repaired model (``export``:
    ``file``, ``written``, ``forced``, ``refused``)."""
    d = result.to_dict()
    d["trigger"]["images"] = trigger_images(result.trigger, example_image(data, result.trigger.target))
    d["export"] = dict(export or {})
    return d


def load_args(opts: LoadOptions, fmt: str | None = None) -> list[str]:
    """The command-line options that load a model the way ``opts`` and ``fmt`` do (for suggested commands)."""
    args: list[str] = []
    for flag, v in (("--arch", opts.arch), ("--num-classes", opts.num_classes), ("--scale", opts.scale),
                    ("--patch-size", opts.patch_size), ("--format", fmt)):
        if v is not None:
            args += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
    if opts.input_size is not None:
        args += ["--input-size", ",".join(map(str, opts.input_size))]
    for flag, vals in (("--mean", opts.mean), ("--std", opts.std)):
        if vals is not None:
            args += [flag, ",".join(f"{x:g}" for x in vals)]
    if opts.trust_pickle:
        args.append("--trust-pickle")
    return args


def invocation_section(model: Path, data: Path, folder: Path | None, opts: LoadOptions, fmt: str | None = None) -> dict[str, Any]:
    """How the scan was run, with paths as the user gave them (relative stays relative: to the directory the scan
    ran in), so that the commands a report suggests run as printed from there.

    Args:
        model: the model path as given.
        data: the clean data actually read (the bundled samples when none was given).
        folder: the scan folder written (``--out``), if any.
        opts: the model-loading options.
        fmt: ``--format``, if given.
    """
    return {"model": str(model), "data": _as_given(data), "scan_folder": str(folder) if folder is not None else None,
            "load_args": load_args(opts, fmt)}


def _as_given(p: Path) -> str:
    """``p`` as a path from the current directory: relative when it was relative (normalised), else absolute."""
    return os.path.normpath(p) if not Path(p).is_absolute() else str(p)


def command(*args: str | Path | None) -> str:
    """A shell command line, each argument quoted where the shell needs it (``None`` arguments are left out)."""
    return " ".join(shlex.quote(str(a)) for a in args if a is not None)
