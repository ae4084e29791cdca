"""Every output of a scan behind one table: the scan folder, JSON, SARIF and HTML (modelscan's report formats
as plug-ins).

A renderer turns a scan document (and, for the scan folder, the detectors' arrays and images) into files.
:func:`write_outputs` renders every requested output in memory first and only then writes them, each
atomically, so a renderer that fails leaves nothing half-written. Adding a report format is one entry in
:data:`RENDERERS` (plus its command-line option).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdscan.atomic import atomic_write_bytes, check_outputs
from bdscan.report.scandir import dumps, folder_files


@dataclass(frozen=True)
class RenderContext:
    """What a renderer may need beyond the document.

    Attributes:
        model_uri: how SARIF names the model (a path relative to the repository root is best for code scanning).
        arrays: the detectors' full-precision arrays (scan folder only; None when re-rendering from JSON).
        images: ``(relative path, image)`` pairs for the scan folder.
    """

    model_uri: str = "model"
    arrays: dict[str, np.ndarray] | None = None
    images: Iterable[tuple[str, torch.Tensor]] = field(default_factory=tuple)


@dataclass(frozen=True)
class Renderer:
    """One output format.

    Attributes:
        name: the key in :data:`RENDERERS` (and in :func:`write_outputs`' targets).
        description: one line for help texts.
        folder: whether the target is a folder (else a file).
        render: ``(doc, ctx) -> [(relative path, bytes)]``; a file renderer returns one entry with path "".
    """

    name: str
    description: str
    folder: bool
    render: Callable[[dict[str, Any], RenderContext], list[tuple[str, bytes]]]


def _json(doc: dict[str, Any], ctx: RenderContext) -> list[tuple[str, bytes]]:
    return [("", dumps(doc).encode("utf-8"))]


def _sarif(doc: dict[str, Any], ctx: RenderContext) -> list[tuple[str, bytes]]:
    from bdscan.report.sarif import to_sarif

    return [("", dumps(to_sarif(doc, ctx.model_uri)).encode("utf-8"))]


def _html(doc: dict[str, Any], ctx: RenderContext) -> list[tuple[str, bytes]]:
    from bdscan.report.html import render_html

    return [("", render_html(doc).encode("utf-8"))]


def _folder(doc: dict[str, Any], ctx: RenderContext) -> list[tuple[str, bytes]]:
    return folder_files(doc, ctx.arrays, ctx.images)


RENDERERS: dict[str, Renderer] = {r.name: r for r in (
    Renderer("folder", "scan folder: scan.json, triggers.npz and the trigger images", True, _folder),
    Renderer("json", "the scan document (JSON)", False, _json),
    Renderer("sarif", "SARIF 2.1.0 for code-scanning dashboards", False, _sarif),
    Renderer("html", "the self-contained HTML report", False, _html),
)}


def check_targets(targets: Mapping[str, Path | None], inputs: Iterable[Path | None]) -> None:
    """Raises :class:`bdscan.errors.UsageError` now, before any work, when an output cannot be written or would
    overwrite an input."""
    ins = list(inputs)
    for name, path in targets.items():
        check_outputs([path], ins, [path] if path is not None and RENDERERS[name].folder else [])


def write_outputs(doc: dict[str, Any], targets: Mapping[str, Path | None], ctx: RenderContext | None = None) -> list[Path]:
    """Renders ``doc`` to every ``{renderer name: path}`` target and writes the files atomically.

    Returns:
        The written outputs (folders as one path), in the order of ``targets``.
    """
    ctx = ctx or RenderContext()
    rendered = [(Path(p), RENDERERS[n], RENDERERS[n].render(doc, ctx)) for n, p in targets.items() if p is not None]
    written: list[Path] = []
    for path, r, files in rendered:
        for rel, data in files:
            dest = path / rel if r.folder else path
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
        written.append(path)
    return written
