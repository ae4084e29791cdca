"""One model's scan inside a batch: the body of the Ray task (it runs as well without Ray, in-process).

The task calls :func:`bdscan.pipeline.run_scan`, the same scan ``bdscan scan`` runs, with its outputs in a
temporary folder of the worker; it returns them as bytes, so the driver writes every output under its own
``--out`` folder whichever node ran the scan (workers need to read the models and data, not to share a disk
with the driver). Every error a scan can meet becomes the result's status (``unsafe`` for a file refused by the
static pickle scan, ``error`` otherwise); only a worker that dies (killed, out of memory) does not return, and
the engine retries it.

Detectors registered outside bdscan (a plug-in module) are registered in the driver's process only; the task
imports the modules that define the requested detectors (``plugins``) before it scans, so a worker knows them.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bdscan.detect import detectors_in
from bdscan.errors import BdscanError, UnsafeModelError, first_line
from bdscan.pipeline import Outputs, ScanEvents, ScanPlan, ScanRequest, run_scan

log = logging.getLogger(__name__)

#: names of a model's outputs inside its folder
SCAN_DIR, REPORT = "scan", "report.html"


@dataclass
class TaskResult:
    """What a task sends back to the driver.

    Attributes:
        status: "backdoor", "clean", "inconclusive", "unsafe" or "error".
        target: the suspected target class (backdoor only) and its name.
        scores: each detector's score (Neural Cleanse: the anomaly index the verdict rests on).
        seconds: the scan's wall time (``run_scan``).
        error: the one-line error of an unsafe or failed scan; ``error_type`` its class name.
        files: the model's outputs, ``(path relative to its folder, bytes)``.
        data_path: the clean data the scan read (resolved: a sample model's bundled images too).
        node: the Ray node that ran it (None outside Ray); ``pid`` its worker process.
        torch_threads: the torch threads the scan ran on.
        task_seconds: the task's own wall time (``seconds`` plus set-up and packing the outputs).
    """

    status: str
    target: int | None = None
    target_name: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    data_path: str | None = None
    node: str | None = None
    pid: int = 0
    torch_threads: int = 0
    task_seconds: float = 0.0


class _Seen(ScanEvents):
    """Keeps what a scan says that the row needs (the data it read, its warnings)."""

    def __init__(self) -> None:
        self.data_path: Path | None = None
        self.warnings: list[str] = []

    def planned(self, plan: ScanPlan) -> None:
        self.data_path = plan.data_path

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def _node() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray, or a Ray without a runtime context
        return None


def _files(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root)
        name = rel.relative_to(SCAN_DIR).as_posix() if rel.parts[0] == SCAN_DIR else rel.as_posix()
        out.append((name, p.read_bytes()))
    return out


def _scores(doc: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for det in detectors_in(doc):
        ev = det.evidence_from_doc(doc)
        out[det.name] = ev.score if ev is not None else None
    return out


def scan_one(request: ScanRequest, cpus: int, plugins: tuple[str, ...] = (), sarif_uri: str | None = None) -> TaskResult:
    """Scans one model with ``cpus`` torch threads and returns its status and outputs (never raises a scan error).

    Args:
        request: the scan; its outputs are replaced by a temporary folder (scan folder + ``report.html``).
        cpus: the CPUs the task was given: torch runs on as many threads, so tasks never oversubscribe a node.
        plugins: modules to import first (they register detectors the driver knows and the worker may not).
        sarif_uri: how the model is named in its outputs.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, cpus))
    for module in plugins:
        importlib.import_module(module)
    seen = _Seen()
    res = TaskResult("error", node=_node(), pid=os.getpid(), torch_threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="bdscan-task-") as tmp:
        root = Path(tmp)
        req = replace(request, outputs=Outputs(folder=root / SCAN_DIR, html=root / REPORT, sarif_uri=sarif_uri))
        t_scan = time.perf_counter()
        try:
            doc = run_scan(req, seen).doc
            v = doc["verdict"]
            res.status, res.target, res.target_name, res.scores = str(v["status"]), v.get("target"), v.get("target_name"), _scores(doc)
        except UnsafeModelError as e:  # its outputs (an "unsafe" document) were written before the error
            res.status, res.error, res.error_type = "unsafe", str(e), type(e).__name__
        except BdscanError as e:
            res.error, res.error_type = str(e), type(e).__name__
        except Exception as e:  # a bug, or a third-party failure no loader caught: the batch goes on
            log.exception("scan of %s failed", request.model)
            res.error, res.error_type = f"internal error: {type(e).__name__}: {first_line(e)}", type(e).__name__
        res.seconds = round(time.perf_counter() - t_scan, 3)
        res.files = _files(root)
    res.data_path = str(seen.data_path) if seen.data_path is not None else None
    res.task_seconds = round(time.perf_counter() - t0, 3)
    return res
