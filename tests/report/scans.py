"""Real scan documents of the session's tiny models (see tests/conftest.py), built once and shared by the
report and analysis tests, plus variants made by editing a real document (cheaper than more scans)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdscan.data import CleanData
from bdscan.detect import ScanSettings
from bdscan.detect.scan import ScanFindings
from bdscan.io import load_model
from bdscan.io.base import LoadedModel
from bdscan.pipeline import scan_loaded


@dataclass
class Scanned:
    lm: LoadedModel
    data: CleanData
    findings: ScanFindings
    doc: dict[str, Any]


_CACHE: dict[tuple[str, tuple[str, ...]], Scanned] = {}


def scanned(model: Path, data: CleanData, modes: tuple[str, ...] = ("pixel", "patch"), activations: bool = True) -> Scanned:
    """Loads ``model``, scans it with the smoke budget and builds its scan document (cached per file and modes)."""
    key = (str(model), modes)
    if key not in _CACHE:
        torch.set_num_threads(1)
        lm = load_model(model)
        doc, det = scan_loaded(lm, data, Path(data.source or "data"), ScanSettings(budget="smoke", levels=modes), activations=activations)
        _CACHE[key] = Scanned(lm, data, det.results["neural-cleanse"].findings, doc)
    return _CACHE[key]


def as_flagged(doc: dict[str, Any], target: int) -> dict[str, Any]:
    """The document itself when its verdict already names ``target``; else a copy edited so it does (the pixel
    level flags ``target``). Keeps the report tests independent of how well a smoke-budget scan does."""
    v = doc["verdict"]
    if v["status"] == "backdoor" and v["target"] == target:
        return doc
    d = copy.deepcopy(doc)
    names = d["model"]["class_names"]
    real = [(m["anomaly"]["anomaly_index"], mode) for mode, m in d["modes"].items() if target in m["anomaly"]["flagged"]]
    if real:  # a level did flag the target: let the verdict rest on it, as the scan would have with that level alone
        idx, mode = max(real)
        d["verdict"].update(status="backdoor", target=target, target_name=names[target], basis=mode, anomaly_index=idx,
                            reason=f"Class {target} can be reached with an abnormally small {mode} trigger.")
        return d
    idx = max(3.0, float(v.get("anomaly_index") or 0.0))
    d["verdict"].update(status="backdoor", target=target, target_name=names[target], basis="pixel", anomaly_index=idx,
                        reason=f"Class {target} can be reached with an abnormally small pixel trigger.")
    m = d["modes"]["pixel"]
    m["anomaly"].update(flagged=[target], anomaly_index=idx, conclusive=True)
    for r in m["labels"]:
        r["flagged"] = r["label"] == target
        if r["label"] == target:
            r["anomaly_index"] = idx
    return d


def as_clean(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a document edited to a clean verdict (nothing flagged)."""
    d = copy.deepcopy(doc)
    d["verdict"].update(status="clean", target=None, target_name=None, reason="No class is abnormally easy to reach.")
    for ev in d["verdict"].get("evidence") or []:  # schema 2: each detector's evidence beside the verdict
        ev.update(status="clean", target=None, target_name=None)
    for m in d["modes"].values():
        m["anomaly"]["flagged"] = []
        if isinstance(m["anomaly"].get("test"), dict):  # schema 2: the level's outlier test decides
            m["anomaly"]["p_value"] = m["anomaly"]["test"]["p_value"] = 1.0
            m["anomaly"]["test"]["p_class"] = 1.0
        for r in m["labels"]:
            r["flagged"] = False
    return d


def as_inconclusive(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy edited to an inconclusive verdict: most labels failed in every mode."""
    d = copy.deepcopy(doc)
    d["verdict"].update(status="inconclusive", target=None, target_name=None, anomaly_index=0.0, basis=None,
                        modes_agree=None, reason="Too few labels could be reached by any trigger to judge this model.")
    for m in d["modes"].values():
        labels = m["labels"]
        for r in labels[2:]:
            r.update(norm=None, succeeded=False, flagged=False, anomaly_index=0.0)
            for p in r["phases"]:
                p["norm"] = None
        m["anomaly"].update(conclusive=False, flagged=[], failed=[r["label"] for r in labels[2:]], anomaly_index=0.0,
                            median=0.0, mad=0.0, raw_mad=0.0, min_label=None, min_norm=None)
        m["triggers"] = [t for t in m["triggers"] if t["label"] in (labels[0]["label"], labels[1]["label"])]
    d["activations"] = None
    return d


def unsafe_doc() -> dict[str, Any]:
    """The minimal document the CLI writes for a pickle file it refused (dangerous imports)."""
    return {"schema": "bdscan.scan/1", "versions": {"bdscan": "0.1.0"}, "seed": 0,
            "model": {"file": "evil.pt", "sha256": "ab" * 32, "format": "pickle",
                      "pickle_scan": {"scanner": "picklescan", "dangerous": True, "error": None, "scanned_files": 1,
                                      "findings": [{"ref": "os.system", "severity": "dangerous", "location": "evil.pt/data.pkl"},
                                                   {"ref": "builtins.exec", "severity": "dangerous", "location": "evil.pt/data.pkl"}]}},
            "verdict": {"status": "unsafe", "target": None, "reason": "evil.pt: dangerous pickle imports"},
            "modes": {}, "activations": None, "repair": None, "timings": {}}
