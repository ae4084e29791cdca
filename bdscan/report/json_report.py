"""The scan document: one JSON that the console, HTML and SARIF renderers all read.

Schema ``bdscan.scan/1`` (documented in docs/scan-json.md). Everything that can differ between two runs
with the same inputs and seed (wall times, dates, output paths) lives under ``timings`` so two runs
compare equal once that key is removed.
"""

from __future__ import annotations

import math
import platform
from typing import Any

import timm
import torch

import bdscan
from bdscan.data import CleanData
from bdscan.detect.anomaly import AnomalyResult
from bdscan.detect.inversion import LabelResult, cpu_has_native_bf16
from bdscan.detect.scan import ModeResult, ScanFindings
from bdscan.io.base import LoadedModel
from bdscan.report.images import data_uri
from bdscan.trigger import Trigger

SCHEMA = "bdscan.scan/1"
#: labels per mode whose reversed triggers are embedded as images (the suspect and the next few)
TOP_TRIGGERS = 5


def _f(x: float | None, nd: int = 6) -> float | None:
    if x is None:
        return None
    if math.isinf(x):
        return 1e9  # JSON has no infinity; an index this large means "MAD was 0 and the label is below the median"
    return round(float(x), nd)


def versions() -> dict[str, str]:
    """Software and the CPU features a scan's speed and precision depend on ("auto" picks bf16 only where the CPU
    has native bf16 instructions)."""
    return {"bdscan": bdscan.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_threads": str(torch.get_num_threads()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": "native" if cpu_has_native_bf16() else "emulated"}


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
        d["original_trigger"] = {"attack": t.kind, "target": t.target, "params": t.params, "l1": _f(t.l1()),
                                 "images": trigger_images(t, None)}
    return d


def trigger_images(t: Trigger, example: torch.Tensor | None) -> dict[str, str]:
    """Inline PNGs of a trigger: mask, pattern, mask·pattern, and a stamped clean image."""
    imgs = {"mask": data_uri(t.mask), "pattern": data_uri(t.pattern), "product": data_uri(t.mask * t.pattern)}
    if example is not None:
        imgs["stamped"] = data_uri(t.stamp(example.unsqueeze(0))[0])
    return imgs


def label_trigger(r: LabelResult, mode: str) -> Trigger:
    return Trigger(r.mask, r.pattern, r.label, f"reversed-{mode}", {"norm": r.norm, "param": r.param})


def anomaly_section(a: AnomalyResult) -> dict[str, Any]:
    return {"median": _f(a.median), "mad": _f(a.mad), "raw_mad": _f(a.raw_mad), "min_label": a.min_label,
            "min_norm": _f(a.min_norm), "anomaly_index": _f(a.anomaly_index), "threshold": a.threshold,
            "flagged": list(a.flagged), "failed": list(a.failed), "conclusive": a.conclusive}


def mode_section(m: ModeResult, names: list[str], example: torch.Tensor | None, original: Trigger | None) -> dict[str, Any]:
    labels = []
    for r in m.labels:
        labels.append({
            "label": r.label, "name": names[r.label], "norm": _f(r.norm), "succeeded": r.succeeded,
            "success_rate": _f(r.success_rate, 4), "steps": r.steps, "stopped_early": r.stopped_early,
            "final_lambda": _f(r.final_lambda, 8), "param": r.param,
            "anomaly_index": _f(m.anomaly.indices.get(r.label, 0.0)), "flagged": r.label in m.anomaly.flagged,
            "phases": [{"step": p.step, "norm": _f(p.norm)} for p in r.phases],
            "history": [_f(h, 4) for h in r.history],
        })
    ranked = sorted((r for r in m.labels if r.succeeded), key=lambda r: (r.norm, r.label))[:TOP_TRIGGERS]
    triggers = []
    for rank, r in enumerate(ranked):
        t = label_trigger(r, m.mode)
        triggers.append({"label": r.label, "rank": rank + 1, "norm": _f(r.norm),
                         "distance_to_original": _f(t.distance(original)) if original is not None else None,
                         "images": trigger_images(t, example)})
    return {"statistic": m.statistic, "params": m.params, "anomaly": anomaly_section(m.anomaly), "labels": labels,
            "triggers": triggers}


def example_image(data: CleanData, avoid: int | None) -> torch.Tensor | None:
    """A deterministic clean image to stamp (the first not of the suspected class)."""
    for i in range(len(data)):
        if avoid is None or int(data.y[i]) != avoid:
            return data.x[i]
    return None


def scan_document(lm: LoadedModel, data: CleanData, findings: ScanFindings, seed: int,
                  extra_timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole scan as a JSON-able dict (schema :data:`SCHEMA`)."""
    info = lm.wrapper.info
    names = [info.class_name(k) for k in range(info.num_classes)]
    v = findings.verdict
    example = example_image(data, v.target)
    original = lm.original_trigger
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "versions": versions(),
        "seed": seed,
        "model": model_section(lm),
        "data": {"source": data.source, "images": len(data), "samples_used": findings.samples_used},
        "config": findings.config.to_dict(),
        "verdict": {
            "status": v.status, "target": v.target, "target_name": names[v.target] if v.target is not None else None,
            "anomaly_index": _f(v.anomaly_index), "basis": v.basis, "modes_agree": v.agree,
            "threshold": findings.config.threshold, "reason": v.reason,
            "true_target": original.target if original is not None else None,
        },
        "modes": {m: mode_section(r, names, example, original) for m, r in findings.modes.items()},
        "activations": None,
        "repair": None,
        "timings": {"total_s": round(findings.seconds, 3),
                    **{f"{m}_s": round(r.seconds, 3) for m, r in findings.modes.items()}, **(extra_timings or {})},
    }
    return doc
