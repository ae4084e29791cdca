"""The scan folder (``bdscan scan --out DIR``), written and read here only.

Layout: ``scan.json`` (the scan document), ``triggers.npz`` (every detector's full-precision arrays, e.g.
Neural Cleanse's ``<level>_mask`` (K, H, W) and ``<level>_pattern`` (K, C, H, W)) and the PNGs detectors
return (``triggers/<level>/labelNNN_{mask,pattern,stamped}.png``). ``scan.json`` is written last, so a folder
with a ``scan.json`` is complete.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdscan.errors import LoadError, first_line
from bdscan.report.images import png_bytes

SCAN_JSON = "scan.json"
TRIGGERS_NPZ = "triggers.npz"
_HINT = "give the folder written by `bdscan scan MODEL --out DIR` (or its scan.json)"


def dumps(doc: dict[str, Any]) -> str:
    """The document as the JSON bdscan writes (indented, key order kept, UTF-8)."""
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def folder_files(doc: dict[str, Any], arrays: dict[str, np.ndarray] | None,
                 images: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, bytes]]:
    """The scan folder's files as ``(relative path, bytes)``, ``scan.json`` last."""
    files: list[tuple[str, bytes]] = []
    if arrays:
        files.append((TRIGGERS_NPZ, npz_bytes(arrays)))
    files += [(rel, png_bytes(img)) for rel, img in images]
    files.append((SCAN_JSON, dumps(doc).encode("utf-8")))
    return files


def scan_paths(path: Path) -> tuple[Path, Path]:
    """``(scan.json, triggers.npz)`` of a scan folder, or of a scan.json file (the npz beside it)."""
    p = Path(path)
    js = p / SCAN_JSON if p.is_dir() else p
    if not js.is_file():
        raise LoadError(f"{p}: no such scan folder or scan.json", _HINT)
    return js, js.parent / TRIGGERS_NPZ


def read_document(path: Path) -> dict[str, Any]:
    """The scan document of a scan folder or scan JSON file; raises :class:`LoadError` when it is not one."""
    js, _ = scan_paths(path)
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadError(f"{js}: not a readable scan JSON", _HINT) from e
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("bdscan.scan/"):
        raise LoadError(f"{js}: not a bdscan scan document", _HINT)
    bad = [k for k in ("model", "verdict") if not isinstance(doc.get(k), dict)]
    if bad:
        raise LoadError(f"{js}: the scan document is incomplete or malformed (no {' or '.join(bad)} object)",
                        "re-run `bdscan scan --out` to get a complete document")
    return doc


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The full-precision arrays of a scan folder (``triggers.npz``); raises :class:`LoadError` when missing."""
    return read_npz(scan_paths(path)[1])


def read_npz(npz: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickles); raises :class:`LoadError` when it is missing or unreadable."""
    try:
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise LoadError(f"{npz}: missing; the scan folder is incomplete",
                        "give the folder written by `bdscan scan MODEL --out DIR`, or scan the model again") from e
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise LoadError(f"{npz}: cannot read it ({type(e).__name__}: {first_line(e, 120)})", "scan the model again") from e
