"""What a batch writes under ``--out``: each model's folder, ``summary.json``, one SARIF log and ``index.html``.

* ``models/<slug>/``: the model's scan folder (``scan.json``, ``triggers.npz``, trigger images) and its
  ``report.html``, as ``bdscan scan --out --report`` writes them (a file refused as unsafe: its "unsafe" document
  and report; an error: no folder). A folder is replaced whole, so no file of an older scan stays behind.
* ``summary.json`` (schema ``bdscan.batch/1``): one row per model (path, sha256, status, target, each
  detector's score, seconds, error...), the paths skipped and why, the engine (Ray's version, address, the
  cluster's resources), and the counts.
* ``bdscan.sarif``: one SARIF 2.1.0 run with one artifact per model. Each model's results are those of its
  own scan's SARIF (:func:`bdscan.report.sarif.to_sarif`), pointed at its artifact; a model that could not be
  scanned is an error notification of the run's invocation. One run with the tool's rules once, rather than a
  run per model, is what code-scanning services (GitHub's among them) accept for one tool.
* ``index.html``: one self-contained page (inline style and a small inline script that sorts the table by any
  column), linking each model's report.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bdscan
from bdscan.atomic import atomic_write_bytes
from bdscan.report.scandir import SCAN_JSON, dumps, read_document

SCHEMA = "bdscan.batch/1"
MODELS_DIR = "models"
SUMMARY, SARIF, INDEX = "summary.json", "bdscan.sarif", "index.html"
#: every status a row can have, in the order the counts list them
STATUSES = ("backdoor", "unsafe", "error", "inconclusive", "clean")
#: statuses that are findings (exit 1) and that are failures to scan (exit 3)
FINDINGS, FAILURES = ("backdoor", "unsafe"), ("error",)
_TONE = {"backdoor": "bad", "unsafe": "bad", "error": "warn", "inconclusive": "warn", "clean": "good"}


def write_model_folder(out: Path, slug: str, files: Sequence[tuple[str, bytes]]) -> str | None:
    """Writes a model's files to ``out/models/<slug>`` (replacing the folder whole); returns its path relative
    to ``out`` (None when there are no files: the folder of an older scan is removed)."""
    dest = out / MODELS_DIR / slug
    if not files:
        shutil.rmtree(dest, ignore_errors=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{slug}.", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the folder gets the mode mkdir would give it
        for rel, data in files:
            p = (tmp / rel).resolve()
            if tmp.resolve() not in p.parents:  # the names come from the task: never outside its folder
                raise ValueError(f"output name {rel!r} leaves the model's folder")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        old = None
        if dest.exists():
            old = dest.with_name(f".{slug}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{MODELS_DIR}/{slug}"


def counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    c = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    c["cached"] = sum(1 for r in rows if r.get("cached"))
    c["total"] = len(rows)
    return c


def summary_document(rows: Sequence[Mapping[str, Any]], skipped: Sequence[Mapping[str, str]], engine: Mapping[str, Any],
                     started_at: str, seconds: float, interrupted: bool, not_finished: Sequence[str],
                     versions: Mapping[str, str]) -> dict[str, Any]:
    """The batch's ``summary.json`` (schema :data:`SCHEMA`)."""
    return {"schema": SCHEMA, "bdscan": bdscan.__version__, "started_at": started_at, "seconds": round(seconds, 3),
            "interrupted": interrupted, "counts": counts(rows), "engine": dict(engine), "versions": dict(versions),
            "rows": [dict(r) for r in rows], "skipped": [dict(s) for s in skipped], "not_finished": list(not_finished)}


def _doc(out: Path, row: Mapping[str, Any]) -> dict[str, Any] | None:
    folder = row.get("folder")
    if not folder or not (out / folder / SCAN_JSON).is_file():
        return None
    with contextlib.suppress(Exception):
        return read_document(out / folder)
    return None


def batch_sarif(rows: Sequence[Mapping[str, Any]], out: Path) -> dict[str, Any]:
    """One SARIF 2.1.0 log of every model's results (see the module docstring)."""
    from bdscan.report.sarif import SARIF_SCHEMA, SARIF_VERSION, artifact_uri, rules, to_sarif

    artifacts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        uri = artifact_uri(str(row["path"]))
        props: dict[str, Any] = {"status": row["status"], "target": row.get("target"), "scores": row.get("scores") or {},
                                 "report": row.get("report")}
        artifact: dict[str, Any] = {"location": {"uri": uri}, "roles": ["analysisTarget"], "properties": props}
        if row.get("sha256"):
            artifact["hashes"] = {"sha-256": row["sha256"]}
        doc = _doc(out, row)
        if doc is not None:
            run = to_sarif(doc, str(row["path"]))["runs"][0]
            for r in run["results"]:
                for loc in r.get("locations", []):
                    loc["physicalLocation"]["artifactLocation"]["index"] = i
                results.append(r)
            props["scan"] = run.get("properties") or {}
        if row["status"] == "error":
            notes.append({"level": "error", "message": {"text": f"{row['path']}: {row.get('error') or 'the scan failed'}"},
                          "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri, "index": i}}}],
                          "properties": {"errorType": row.get("error_type")}})
        artifacts.append(artifact)
    invocation: dict[str, Any] = {"executionSuccessful": not notes}
    if notes:
        invocation["toolExecutionNotifications"] = notes
    version = bdscan.__version__
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [{
        "tool": {"driver": {"name": "bdscan", "version": version, "semanticVersion": version, "rules": copy.deepcopy(rules())}},
        "invocations": [invocation], "artifacts": artifacts, "results": results,
        "properties": {"batch": True, "counts": counts(rows)}}]}


def index_view(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What ``batch_index.html.j2`` shows: every field present."""
    rows = summary["rows"]
    detectors = sorted({d for r in rows for d in (r.get("scores") or {})})
    view_rows = []
    for r in rows:
        target = r.get("target")
        view_rows.append({
            "path": r["path"], "status": r["status"], "tone": _TONE.get(r["status"], "warn"), "report": r.get("report"),
            "target": "" if target is None else f"{target}" + (f" ({r['target_name']})" if r.get("target_name") else ""),
            "target_sort": -1 if target is None else target,
            "scores": [(r.get("scores") or {}).get(d) for d in detectors], "seconds": r.get("seconds"),
            "sha": (r.get("sha256") or "")[:12], "cached": bool(r.get("cached")), "error": r.get("error") or "",
        })
    e = summary.get("engine") or {}
    return {"title": f"bdscan batch: {summary['counts']['total']} models", "counts": summary["counts"], "statuses": STATUSES,
            "detectors": detectors, "rows": view_rows, "skipped": summary.get("skipped") or [],
            "not_finished": summary.get("not_finished") or [], "interrupted": summary.get("interrupted"),
            "engine": e, "started_at": summary.get("started_at"), "seconds": summary.get("seconds"),
            "version": summary.get("bdscan"), "summary": SUMMARY, "sarif": SARIF}


def render_index(summary: Mapping[str, Any]) -> str:
    """The self-contained ``index.html`` of a batch summary."""
    from bdscan.report.html import environment

    return environment().get_template("batch_index.html.j2").render(v=index_view(summary))


def write_batch_outputs(out: Path, summary: dict[str, Any], extra: Mapping[str, Path | None] | None = None) -> list[Path]:
    """Writes ``summary.json``, ``bdscan.sarif`` and ``index.html`` under ``out`` (each atomically), and the
    summary and SARIF also at ``extra["json"]`` / ``extra["sarif"]`` when given. Returns the written paths."""
    files = {out / SUMMARY: dumps(summary).encode("utf-8"),
             out / SARIF: dumps(batch_sarif(summary["rows"], out)).encode("utf-8"),
             out / INDEX: render_index(summary).encode("utf-8")}
    extra = extra or {}
    if extra.get("json"):
        files[Path(extra["json"])] = files[out / SUMMARY]  # type: ignore[arg-type]
    if extra.get("sarif"):
        files[Path(extra["sarif"])] = files[out / SARIF]  # type: ignore[arg-type]
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return list(files)
