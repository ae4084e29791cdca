"""What a batch scans: model paths, folders walked recursively, and manifest rows, made into jobs.

A folder is walked recursively. Each file and each sub-folder is offered to the format registry exactly as
``bdscan scan`` would pick its loader (:func:`bdscan.io.base.pick_loader`: a file's first 64 bytes and, for a
zip, its member names; a folder's config, for the loaders that read model folders; nothing is unpickled or
parsed): a file or folder some loader accepts is a model (a model folder is not descended), any other file is
listed as skipped with the reason, any other folder is walked. Hidden folders (``.git``, ``.cache``) and
symbolic links that lead out of the walked folder are skipped. A model given by name is always scanned: if no
loader accepts it, its row says so (as ``bdscan scan`` would).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdscan.batch.manifest import read_manifest
from bdscan.batch.options import parse_row, request_of
from bdscan.errors import BdscanError, UsageError, first_line
from bdscan.io.base import pick_loader
from bdscan.pipeline import ScanRequest


@dataclass(frozen=True)
class Skipped:
    """A path a folder walk did not scan, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Job:
    """One model to scan.

    Attributes:
        index: its position in the batch (rows keep this order).
        path: the model path as shown in rows, SARIF and the index (relative to the working folder when inside it).
        slug: the name of its output folder under ``OUT/models/``.
        request: the scan (no outputs: the task chooses them).
        where: where it came from, for messages ("argument 2", "m.csv line 4", "registry/ (folder)").
    """

    index: int
    path: str
    slug: str
    request: ScanRequest
    where: str


@dataclass
class Plan:
    """The jobs of a batch and the paths its folder walks skipped."""

    jobs: list[Job]
    skipped: list[Skipped]
    inputs: list[Path]


def display(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it, else absolute (POSIX separators)."""
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.as_posix()


def accepts(path: Path) -> str | None:
    """None when a registered loader would read ``path``, else why not (one line)."""
    try:
        pick_loader(path)
    except BdscanError as e:
        return e.message.split(": ", 1)[-1]
    except OSError as e:
        return f"cannot read it ({e.strerror or first_line(e)})"
    return None


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that a loader reads as one model (a Hugging Face or timm folder)."""
    return path.is_dir() and accepts(path) is None


def walk(folder: Path, exclude: Sequence[Path] = ()) -> tuple[list[Path], list[Skipped]]:
    """The models under ``folder`` (files and model folders, sorted by path) and what was skipped, with the reason."""
    root = folder.resolve()
    ex = {p.resolve() for p in exclude}
    found: list[Path] = []
    skipped: list[Skipped] = []
    for here, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        here_p = Path(here)
        for d in list(dirs):
            p = here_p / d
            reason = None
            if p.resolve() in ex:
                reason = "bdscan's output folder"
            elif d.startswith("."):
                reason = "hidden folder"
            elif p.is_symlink():
                reason = "symbolic link to a folder (not followed)"
            if reason:
                dirs.remove(d)
                skipped.append(Skipped(display(p), reason))
            elif is_model_folder(p):
                dirs.remove(d)
                found.append(p)
        for f in sorted(files):
            p = here_p / f
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                skipped.append(Skipped(display(p), "symbolic link out of the folder"))
            elif not p.is_file():
                skipped.append(Skipped(display(p), "not a regular file"))
            elif (reason := accepts(p)) is not None:
                skipped.append(Skipped(display(p), reason))
            else:
                found.append(p)
    return sorted(found, key=lambda q: q.as_posix()), skipped


def slug_of(path: str, taken: set[str]) -> str:
    """A folder name for a model's outputs (from its path below the models' common folder), unique within
    ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", path.replace("../", "up_").replace("/", "__")).strip("._") or "model"
    base = base[:120]
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def plan_batch(models: Sequence[Path], manifest: Path | None, defaults: Mapping[str, Any], exclude: Sequence[Path] = ()) -> Plan:
    """The jobs for ``models`` (files and folders) and the rows of ``manifest``, each with ``defaults`` (the
    command line's options) under its own values.

    Raises:
        UsageError: a missing path, a malformed manifest row (naming it), or nothing to scan.
    """
    base = parse_row(defaults, "command line")
    entries: list[tuple[Path, str, dict[str, Any]]] = []
    skipped: list[Skipped] = []
    for i, m in enumerate(models, 1):
        if m.is_dir() and not is_model_folder(m):
            files, skip = walk(m, exclude)
            entries += [(f, f"{display(m)}/ (folder)", {}) for f in files]
            skipped += skip
        else:  # a file given by name is scanned even if no loader takes it (or it is missing): its row says why
            entries.append((m, f"argument {i}", {}))
    if manifest is not None:
        for row in read_manifest(manifest):
            values = parse_row(row.values, row.where, manifest.parent)
            if "model" not in values:
                raise UsageError(f"{row.where}: no model", "every row needs a model (its path, relative to the manifest)")
            entries.append((values.pop("model"), row.where, values))
    if not entries:
        raise UsageError("no model to scan" + (f" (skipped {len(skipped)} files that are not models)" if skipped else ""),
                         "give model files, folders that hold models, or --manifest FILE")
    taken: set[str] = set()
    jobs = []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p, _, _ in entries])
    for k, (path, where, own) in enumerate(entries):
        req = request_of({**base, **own, "model": path}, where)
        jobs.append(Job(k, display(path), slug_of(Path(os.path.relpath(os.path.abspath(path), root)).as_posix(), taken), req, where))
    inputs = [Path(m) for m in models] + ([manifest] if manifest is not None else [])
    return Plan(jobs, skipped, inputs)
