"""A whole batch: the cache, the engine, each model's outputs and row, and the summary, for any caller.

:func:`run_batch` never prints: it reports through a :class:`BatchEvents` object (the CLI draws a progress bar
and one line per model from it), as :func:`bdscan.pipeline.run_scan` does for one scan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdscan import machine
from bdscan.atomic import check_output_path, refuse_input_overwrite
from bdscan.batch.cache import Cache
from bdscan.batch.engine import EngineOptions, RayEngine
from bdscan.batch.inputs import Job, Plan, display
from bdscan.batch.outputs import FAILURES, FINDINGS, summary_document, write_batch_outputs, write_model_folder
from bdscan.batch.task import REPORT, TaskResult
from bdscan.errors import UsageError
from bdscan.io.base import sha256_file
from bdscan.jsonnum import json_number


class BatchEvents:
    """Callbacks of a running batch; the default ignores them all."""

    def planned(self, total: int, cached: int) -> None:
        """``total`` models will be reported, ``cached`` of them from the cache (their ``finished`` follows)."""

    def running(self, n: int) -> None:
        """``n`` tasks are running now."""

    def finished(self, row: dict[str, Any]) -> None:
        """A model's row is final (scanned, served from the cache, or failed)."""


@dataclass
class BatchResult:
    """A finished (or interrupted) batch."""

    summary: dict[str, Any]
    written: list[Path] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.summary["rows"]

    @property
    def counts(self) -> dict[str, int]:
        return self.summary["counts"]

    @property
    def interrupted(self) -> bool:
        return bool(self.summary["interrupted"])

    @property
    def findings(self) -> int:
        return sum(1 for r in self.rows if r["status"] in FINDINGS)

    @property
    def failures(self) -> int:
        return sum(1 for r in self.rows if r["status"] in FAILURES)


def check_out(out: Path, inputs: Sequence[Path]) -> None:
    """Raises :class:`UsageError` when ``out`` cannot be written or overlaps an input (the output folder is
    replaced piece by piece; the models and manifests must stay untouched, and a folder walk must not find it)."""
    check_output_path(out, folder=True)
    o = out.resolve()
    for p in inputs:
        r = Path(p).resolve()
        if r == o or r in o.parents or o in r.parents:
            raise UsageError(f"refusing to write {out}: it overlaps the input {p}", "choose an output folder outside the models you scan")


def check_plan_out(plan: Plan, out: Path) -> None:
    """:func:`check_out` for every input of ``plan`` (its arguments and manifest, models and data)."""
    check_out(out, [*plan.inputs, *(j.request.model for j in plan.jobs), *(j.request.data for j in plan.jobs if j.request.data)])


def _row(job: Job, sha: str | None, res: TaskResult, folder: str | None, wall: float) -> dict[str, Any]:
    report = f"{folder}/{REPORT}" if folder and any(rel == REPORT for rel, _ in res.files) else None
    return {"path": job.path, "sha256": sha, "status": res.status, "target": res.target, "target_name": res.target_name,
            "scores": {k: json_number(v, 4) for k, v in res.scores.items()}, "seconds": res.seconds, "error": res.error,
            "error_type": res.error_type, "folder": folder, "report": report, "cached": False,
            "data": display(Path(res.data_path)) if res.data_path else None, "where": job.where, "node": res.node,
            "torch_threads": res.torch_threads, "task_seconds": res.task_seconds, "wall_seconds": round(wall, 3)}


def run_batch(plan: Plan, out: Path, engine: EngineOptions = EngineOptions(), events: BatchEvents | None = None,
              use_cache: bool = True, extra: Mapping[str, Path | None] | None = None) -> BatchResult:
    """Scans every job of ``plan`` (each a Ray task), writes each model's folder and the batch's outputs under ``out``.

    Args:
        plan: the jobs (:func:`bdscan.batch.inputs.plan_batch`).
        out: the output folder.
        engine: where and how the tasks run.
        events: progress callbacks.
        use_cache: serve models scanned before with the same inputs from ``out/.cache`` (results are stored either way).
        extra: also write the summary (``"json"``) and the SARIF log (``"sarif"``) at these paths.

    Returns:
        the summary (also written) and the paths written. Ctrl-C during the scans cancels the running tasks and
        returns the summary of what finished (``interrupted`` true); it is not raised.
    """
    ev = events or BatchEvents()
    check_plan_out(plan, out)
    for target in (extra or {}).values():
        if target is not None:
            check_output_path(target)
            refuse_input_overwrite(target, [*plan.inputs, *(j.request.model for j in plan.jobs)])
    started_at, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    cache = Cache(out, use_cache)
    rows: list[dict[str, Any] | None] = [None] * len(plan.jobs)
    shas: dict[int, str | None] = {}
    keys: dict[int, str | None] = {}
    todo: list[Job] = []
    early: list[dict[str, Any]] = []
    for job in plan.jobs:
        try:
            shas[job.index] = sha256_file(job.request.model)
        except OSError as e:
            res = TaskResult("error", error=f"{job.path}: cannot read it ({e.strerror or e})", error_type="ModelLoadError")
            rows[job.index] = _row(job, None, res, None, 0.0)
            early.append(rows[job.index])  # type: ignore[arg-type]
            continue
        try:
            keys[job.index] = cache.key(job.request, shas[job.index])  # type: ignore[arg-type]
        except OSError:  # unreadable data: the scan says so in its row
            keys[job.index] = None
        hit = cache.get(keys[job.index]) if keys[job.index] else None
        if hit is not None:
            rows[job.index] = {**hit, "path": job.path, "where": job.where, "cached": True}
            early.append(rows[job.index])  # type: ignore[arg-type]
        else:
            todo.append(job)
    ev.planned(len(plan.jobs), sum(1 for r in early if r.get("cached")))
    for r in early:
        ev.finished(r)

    def done(job: Job, res: TaskResult, wall: float) -> None:
        folder = write_model_folder(out, job.slug, res.files)
        row = _row(job, shas.get(job.index), res, folder, wall)
        rows[job.index] = row
        key = keys.get(job.index)
        if key:
            cache.put(key, row, res.data_path)
        ev.finished(row)

    interrupted, not_finished = False, []
    engine_info: dict[str, Any] = {"name": "ray", "note": "nothing to scan: every model was served from the cache"}
    if todo:
        with RayEngine(engine) as eng:
            engine_info = eng.describe()
            run = eng.run(todo, done, ev.running)
        engine_info["shutdown_s"] = round(eng.shutdown_s, 3)
        interrupted, not_finished = run.interrupted, [j.path for j in run.not_finished]
    final = [r for r in rows if r is not None]
    summary = summary_document(final, [{"path": s.path, "reason": s.reason} for s in plan.skipped], engine_info, started_at,
                               time.perf_counter() - t0, interrupted, not_finished, machine.versions())
    written = write_batch_outputs(out, summary, extra)
    return BatchResult(summary, written)
