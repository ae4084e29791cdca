"""SARIF 2.1.0 output of a scan document, for code-scanning dashboards (GitHub, GitLab, Azure DevOps).

One run, tool ``bdscan``, one rule per registered detector (``Detector.sarif_rule``) and two of the scan's own:

* ``BDS001`` backdoor-suspected (error; Neural Cleanse's rule): one result per suspected target class (its
  target first, then any other class a conclusive level flagged). A detector without its own results function
  in :data:`SARIF_RESULTS` gets one result from its evidence when it suspects a backdoor.
* ``BDS002`` unsafe-serialization (error): one result per dangerous import the static pickle scan found
  (suspicious ones are warnings), and one if the scanner itself failed.
* ``BDS003`` scan-inconclusive (warning): the scan could not judge the model.

Every result points at the model file (``artifactLocation``). A path the user gave relative to the directory
bdscan ran in (the repository root in CI) is written as a relative ``uri`` with ``uriBaseId: "%SRCROOT%"``,
declared in ``run.originalUriBaseIds`` without a machine-specific base, which is how GitHub code scanning maps
a result to a file of the repository; an absolute path is a ``file://`` URI without a base id (SARIF 2.1.0,
3.4.4: a ``uriBaseId`` only goes with a relative reference). A clean model with a safe file gives a run with
its rules and no results. ``run.properties`` carries the verdict, seed and the file's SHA-256.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import bdscan
from bdscan.detect.base import DETECTORS, Detector, detectors_in, p_number

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SARIF_VERSION = "2.1.0"

#: rules of the scan itself; each detector adds its own (``Detector.sarif_rule``) before them
CORE_RULES: list[dict[str, Any]] = [
    {
        "id": "BDS002",
        "name": "unsafe-serialization",
        "shortDescription": {"text": "Model file can execute code when loaded"},
        "fullDescription": {"text": (
            "The static scan of the file's pickle data found imports that run code when the file is loaded with "
            "torch.load or pickle (for example os.system or builtins.eval). bdscan never unpickles such a file.")},
        "help": {
            "text": ("Do not load this file with torch.load or pickle outside a sandbox. Obtain the weights as "
                     "safetensors or ONNX, or convert them in an isolated environment, and check where the file came from."),
            "markdown": ("**Do not load this file with `torch.load` or `pickle` outside a sandbox.**\n\n"
                         "Obtain the weights as safetensors or ONNX, or convert them inside an isolated environment, "
                         "and check where the file came from."),
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "supply-chain", "deserialization"], "precision": "high",
                       "security-severity": "9.8"},
    },
    {
        "id": "BDS003",
        "name": "scan-inconclusive",
        "shortDescription": {"text": "Backdoor scan inconclusive"},
        "fullDescription": {"text": (
            "Too few classes could be reached by any reversed trigger to tell an outlier from normal variation, so "
            "the scan can neither flag nor clear the model.")},
        "help": {
            "text": ("Scan again with a larger budget (more optimisation steps) and more clean images of every class; "
                     "check that the data matches the model's classes and input preprocessing."),
            "markdown": ("Scan again with a larger budget (`--budget thorough`) and more clean images of every class; "
                         "check that the data matches the model's classes and input preprocessing."),
        },
        "defaultConfiguration": {"level": "warning"},
        "properties": {"tags": ["machine-learning", "backdoor"], "precision": "medium"},
    },
]


def rules() -> list[dict[str, Any]]:
    """Every registered detector's rule (registry order), then the scan's own."""
    return [d.sarif_rule for d in DETECTORS.values() if d.sarif_rule] + CORE_RULES


def rule_index(rule_id: str) -> int:
    return next(i for i, r in enumerate(rules()) if r["id"] == rule_id)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: the base id of paths relative to the directory bdscan ran in (GitHub code scanning: the repository root)
SRCROOT = "%SRCROOT%"


def artifact_uri(model_uri: str) -> str:
    """A URI reference for the model: kept as is when it has a scheme; an absolute path becomes a ``file://``
    URI, a relative one a relative reference (``./`` dropped); backslashes become slashes, and spaces and other
    reserved characters are percent-encoded."""
    if _SCHEME.match(model_uri) and not re.match(r"^[A-Za-z]:[\\/]", model_uri):
        return model_uri
    path = model_uri.replace("\\", "/")
    if re.match(r"^[A-Za-z]:/", path):  # a Windows drive path
        return "file:///" + quote(path, safe="/:")
    if path.startswith("/"):
        return "file://" + quote(path, safe="/")
    path = posixpath.normpath(path)
    return quote(path, safe="/")


def artifact_location(model_uri: str) -> dict[str, Any]:
    """``{"uri": ...}`` plus ``"uriBaseId": "%SRCROOT%"`` when the URI is a relative reference."""
    uri = artifact_uri(model_uri)
    return {"uri": uri} if _SCHEME.match(uri) else {"uri": uri, "uriBaseId": SRCROOT}


def _name(doc: dict[str, Any], k: int | None) -> str:
    names = (doc.get("model") or {}).get("class_names") or []
    if k is None:
        return "?"
    return str(names[k]) if isinstance(k, int) and 0 <= k < len(names) else str(k)


def _label_indices(doc: dict[str, Any], k: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for mode, m in (doc.get("modes") or {}).items():
        row = next((r for r in (m or {}).get("labels") or [] if r.get("label") == k), None)
        out[mode] = row.get("anomaly_index") if row else None
    return out


def _fmt(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "n/a"
    return "infinite" if x >= 1e9 else f"{x:.2f}"


def _location(uri: str) -> list[dict[str, Any]]:
    return [{"physicalLocation": {"artifactLocation": {**artifact_location(uri), "index": 0}}}]


def _result(rule: str, level: str, text: str, uri: str, fingerprint: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"ruleId": rule, "ruleIndex": rule_index(rule), "level": level, "message": {"text": text},
            "locations": _location(uri), "partialFingerprints": {"bdscanFinding/v1": fingerprint}, "properties": props}


def _neural_cleanse_results(det: Detector, doc: dict[str, Any], uri: str, sha: str) -> list[dict[str, Any]]:
    """One result per class Neural Cleanse suspects: its target first, then any other class a conclusive level flagged."""
    ev = det.evidence_from_doc(doc)
    if ev is None:
        return []
    v = {"status": ev.status, "target": ev.target, **ev.details}
    thr = ev.threshold
    targets: list[int] = []
    if v.get("status") == "backdoor" and isinstance(v.get("target"), int):
        targets.append(v["target"])
    if v.get("status") == "backdoor":
        for m in (doc.get("modes") or {}).values():
            an = (m or {}).get("anomaly") or {}
            if an.get("conclusive", True):
                targets += [k for k in an.get("flagged") or [] if isinstance(k, int) and k not in targets]
    out = []
    for k in targets:
        idx = _label_indices(doc, k)
        flagged_in = [mode for mode, m in (doc.get("modes") or {}).items()
                      if k in (((m or {}).get("anomaly") or {}).get("flagged") or [])]
        basis = v.get("basis") if k == v.get("target") and v.get("basis") else (flagged_in[0] if flagged_in else None)
        main = idx.get(basis) if basis else None
        if k == v.get("target") and isinstance(v.get("anomaly_index"), (int, float)):
            main = v["anomaly_index"]
        others = "; ".join(f"{mode} level: {_fmt(x)}" for mode, x in idx.items() if mode != basis)
        p = ev.p_value if k == ev.target else None
        alpha = (doc.get("verdict") or {}).get("alpha")
        why = (f"p = {p:.2g} ≤ α = {alpha:g}, corrected for the levels and detectors; {basis or 'anomaly'} anomaly index {_fmt(main)}"
               if p is not None and isinstance(alpha, (int, float))
               else f"{basis or 'anomaly'} anomaly index {_fmt(main)} > threshold {thr:g}")
        text = (f"Backdoor suspected: class '{_name(doc, k)}' (index {k}) can be reached from any image with an abnormally "
                f"small {basis or 'reversed'} trigger ({why}" + (f"; {others}" if others else "") + "). Do not deploy this model.")
        out.append(_result(det.sarif_rule["id"], "error", text, uri, f"{sha}:backdoor:{k}", {
            "targetClass": k, "targetName": _name(doc, k), "mode": basis, "flaggedIn": flagged_in,
            "anomalyIndex": main, "anomalyIndices": idx, "threshold": thr, "verdictTarget": k == v.get("target"),
            "pValue": p_number(p),
        }))
    return out


def _pickle_results(doc: dict[str, Any], uri: str, sha: str) -> list[dict[str, Any]]:
    ps = (doc.get("model") or {}).get("pickle_scan")
    if not ps:
        return []
    out = []
    for f in ps.get("findings") or []:
        sev = f.get("severity", "dangerous")
        level = "error" if sev == "dangerous" else "warning"
        ref = f.get("ref") or "?"
        where = f.get("location") or ""
        text = (f"Unsafe serialization: the pickle data{' in ' + where if where else ''} imports '{ref}' ({sev}), "
                f"which can run code when the file is loaded with torch.load or pickle.")
        out.append(_result("BDS002", level, text, uri, f"{sha}:pickle:{ref}:{where}",
                           {"import": ref, "severity": sev, "location": where, "scanner": ps.get("scanner")}))
    if ps.get("error"):
        out.append(_result("BDS002", "error", f"Unsafe serialization: the static pickle scan failed ({ps['error']}); "
                           "the file must be treated as able to run code when loaded.", uri, f"{sha}:pickle-scan-error",
                           {"error": ps["error"], "scanner": ps.get("scanner")}))
    return out


def _inconclusive_results(doc: dict[str, Any], uri: str, sha: str) -> list[dict[str, Any]]:
    v = doc.get("verdict") or {}
    if v.get("status") != "inconclusive":
        return []
    failed = {mode: len(((m or {}).get("anomaly") or {}).get("failed") or []) for mode, m in (doc.get("modes") or {}).items()}
    reason = v.get("reason") or "too few classes could be reached by any trigger"
    return [_result("BDS003", "warning", f"Backdoor scan inconclusive: {reason} Scan again with a larger budget and more "
                    "clean images per class.", uri, f"{sha}:inconclusive", {"failedLabels": failed})]


def _evidence_results(det: Detector, doc: dict[str, Any], uri: str, sha: str) -> list[dict[str, Any]]:
    """A detector's finding from its evidence alone: one result when it suspects a backdoor."""
    ev = det.evidence_from_doc(doc)
    if ev is None or ev.status != "backdoor" or not det.sarif_rule:
        return []
    text = f"Backdoor suspected by {det.title}: {ev.reason} Do not deploy this model."
    return [_result(det.sarif_rule["id"], "error", text, uri, f"{sha}:{det.name}:{ev.target}",
                    {"detector": det.name, "targetClass": ev.target, "targetName": _name(doc, ev.target), "score": ev.score,
                     "threshold": ev.threshold})]


#: detector name -> its SARIF results; a detector without an entry gets :func:`_evidence_results`
SARIF_RESULTS: dict[str, Callable[[Detector, dict[str, Any], str, str], list[dict[str, Any]]]] = {
    "neural-cleanse": _neural_cleanse_results,
}


def to_sarif(doc: dict[str, Any], model_uri: str) -> dict[str, Any]:
    """The scan document as a SARIF 2.1.0 log (a JSON-able dict).

    Args:
        doc: the scan document (schema ``bdscan.scan/1`` to ``/3``).
        model_uri: how the log names the model file: a path relative to the directory bdscan ran in (for code
            scanning: the repository root), an absolute path, or any URI; see the module docstring.

    Returns:
        ``{"$schema", "version": "2.1.0", "runs": [one run]}``; see the module docstring for the rules and results.
    """
    uri = model_uri
    location = artifact_location(uri)
    model = doc.get("model") or {}
    v = doc.get("verdict") or {}
    sha = model.get("sha256") or ""
    version = (doc.get("versions") or {}).get("bdscan") or bdscan.__version__
    results = [r for det in detectors_in(doc) for r in SARIF_RESULTS.get(det.name, _evidence_results)(det, doc, uri, sha)]
    results += _pickle_results(doc, uri, sha) + _inconclusive_results(doc, uri, sha)
    artifact: dict[str, Any] = {"location": location, "roles": ["analysisTarget"]}
    if sha:
        artifact["hashes"] = {"sha-256": sha}
    run_props: dict[str, Any] = {
        "verdict": v.get("status"), "seed": doc.get("seed"), "sha256": sha or None, "schema": doc.get("schema"),
        "targetClass": v.get("target"), "anomalyIndex": v.get("anomaly_index"), "basis": v.get("basis"),
        "threshold": v.get("threshold"), "format": model.get("format"), "arch": model.get("arch"),
        "anomalyIndices": {mode: ((m or {}).get("anomaly") or {}).get("anomaly_index")
                           for mode, m in (doc.get("modes") or {}).items()},
    }
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "bdscan", "version": str(version), "semanticVersion": str(version),
                            "rules": copy.deepcopy(rules())}},
        "invocations": [{"executionSuccessful": True}],
    }
    if "uriBaseId" in location:  # declared without a uri: the base is wherever the log is read (no local path leaks)
        run["originalUriBaseIds"] = {SRCROOT: {"description": {
            "text": "The directory bdscan ran in: the repository root when it runs in a checkout, as in CI."}}}
    run.update({"artifacts": [artifact], "results": results, "properties": run_props})
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}
