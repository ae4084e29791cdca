"""Manifests: a list of models to scan, one row each, in JSON, JSON Lines, YAML or CSV.

Every row has ``model`` (a path, relative to the manifest's folder) and may set ``data`` (relative too) and any
scan option by its long name with underscores (:data:`bdscan.batch.options.OPTIONS`)::

    [{"model": "vendor/a.onnx", "data": "clean/", "mean": [0.485, 0.456, 0.406], "std": "0.229,0.224,0.225"},
     {"model": "b.pt", "arch": "resnet18", "num_classes": 43, "budget": "quick"}]

The format is chosen by the suffix (``.json``, ``.jsonl``/``.ndjson``, ``.yaml``/``.yml``, ``.csv``). A row is
named in errors by where it is: ``m.jsonl line 3``, ``m.csv line 4`` (the header is line 1), ``m.json row 2``,
``m.yaml item 2``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdscan.errors import UsageError, first_line

#: the most bytes a manifest may have (a registry of many thousands of rows fits; a wrong file does not load)
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class ManifestRow:
    """One row as read: where it is (for messages) and its raw values."""

    where: str
    values: dict[str, Any]


def _objects(items: list[tuple[str, Any]], name: str) -> list[ManifestRow]:
    rows = []
    for where, obj in items:
        if not isinstance(obj, dict):
            raise UsageError(f"{name} {where}: a row must be an object with a 'model' key, not {type(obj).__name__}",
                             'e.g. {"model": "a.safetensors", "data": "clean.npz"}')
        rows.append(ManifestRow(f"{name} {where}", obj))
    return rows


def _json(text: str, name: str) -> list[ManifestRow]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} line {e.lineno}: not valid JSON ({e.msg})", "a JSON manifest is a list of objects") from None
    if not isinstance(doc, list):
        raise UsageError(f"{name}: a JSON manifest must be a list of objects, not {type(doc).__name__}",
                         'e.g. [{"model": "a.safetensors"}]; or use JSON Lines (.jsonl), one object per line')
    return _objects([(f"row {i}", o) for i, o in enumerate(doc, 1)], name)


def _jsonl(text: str, name: str) -> list[ManifestRow]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            items.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{name} line {n}: not valid JSON ({e.msg})", "JSON Lines: one object per line") from None
    return _objects(items, name)


def _yaml(text: str, name: str) -> list[ManifestRow]:
    import yaml

    try:
        doc = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{name}{where}: not valid YAML ({first_line(e, 120)})", "a YAML manifest is a list of mappings") from None
    if doc is None:
        doc = []
    if not isinstance(doc, list):
        raise UsageError(f"{name}: a YAML manifest must be a list of mappings, not {type(doc).__name__}",
                         "e.g.\n- model: a.safetensors\n  data: clean.npz")
    return _objects([(f"item {i}", o) for i, o in enumerate(doc, 1)], name)


def _csv(text: str, name: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    if "model" not in header:
        raise UsageError(f"{name} line 1: the header has no 'model' column", "the first line names the columns, e.g. model,data,budget")
    if len(set(header)) != len(header) or "" in header:
        raise UsageError(f"{name} line 1: empty or repeated column names", "name each column once")
    rows = []
    for cells in reader:
        n = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UsageError(f"{name} line {n}: {len(cells)} cells for {len(header)} columns",
                             "quote cells that hold commas, e.g. \"0.5,0.5,0.5\"")
        rows.append(ManifestRow(f"{name} line {n}", dict(zip(header, cells, strict=True))))
    return rows


#: suffix -> reader
READERS: dict[str, Callable[[str, str], list[ManifestRow]]] = {
    ".json": _json, ".jsonl": _jsonl, ".ndjson": _jsonl, ".yaml": _yaml, ".yml": _yaml, ".csv": _csv,
}


def read_manifest(path: Path) -> list[ManifestRow]:
    """The rows of a manifest file (raw values; :func:`bdscan.batch.options.parse_row` parses them).

    Raises:
        UsageError: an unreadable file, an unknown suffix, a malformed row (naming it), or no rows at all.
    """
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UsageError(f"--manifest {path}: unknown manifest format {path.suffix or '(no suffix)'!r}",
                         f"name it with one of: {', '.join(READERS)}")
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UsageError(f"--manifest {path}: larger than {MAX_BYTES >> 20} MiB", "split it into several manifests")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--manifest {path}: cannot read it ({first_line(e, 120)})", "check the path and that it is UTF-8 text") from None
    rows = reader(text, path.name)
    if not rows:
        raise UsageError(f"--manifest {path}: no rows", "list at least one model")
    return rows
