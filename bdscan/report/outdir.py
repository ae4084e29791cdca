"""Writing a scan's output folder: ``scan.json``, ``triggers.npz`` and one PNG per label and image kind.

Every file is written atomically (temp file + rename); ``scan.json`` is written last, so a folder with a
``scan.json`` is always complete, and an interrupted scan leaves at most some PNGs behind, never a
half-written report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from bdscan.detect.scan import ScanFindings
from bdscan.io.atomic import atomic_write_bytes, atomic_write_text
from bdscan.report.images import png_bytes
from bdscan.report.json_report import label_trigger


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(path, dumps(doc))


def triggers_npz(findings: ScanFindings) -> bytes:
    """All labels' masks and patterns at full precision: ``<mode>_mask`` (K, H, W), ``<mode>_pattern`` (K, C, H, W),
    ``<mode>_labels`` (K,), ``<mode>_norm`` (K,) (NaN where the inversion never succeeded)."""
    arrays: dict[str, np.ndarray] = {}
    for mode, m in findings.modes.items():
        arrays[f"{mode}_labels"] = np.array([r.label for r in m.labels], dtype=np.int64)
        arrays[f"{mode}_mask"] = np.stack([r.mask.numpy() for r in m.labels]).astype(np.float32)
        arrays[f"{mode}_pattern"] = np.stack([r.pattern.numpy() for r in m.labels]).astype(np.float32)
        arrays[f"{mode}_norm"] = np.array([np.nan if r.norm is None else r.norm for r in m.labels], dtype=np.float64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_scan_dir(out: Path, doc: dict[str, Any], findings: ScanFindings, example: Any | None) -> None:
    """Writes the scan folder (see module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "triggers.npz", triggers_npz(findings))
    for mode, m in findings.modes.items():
        d = out / "triggers" / mode
        d.mkdir(parents=True, exist_ok=True)
        for r in m.labels:
            t = label_trigger(r, mode)
            atomic_write_bytes(d / f"label{r.label:03d}_mask.png", png_bytes(t.mask))
            atomic_write_bytes(d / f"label{r.label:03d}_pattern.png", png_bytes(t.pattern))
            if example is not None:
                atomic_write_bytes(d / f"label{r.label:03d}_stamped.png", png_bytes(t.stamp(example.unsqueeze(0))[0]))
    write_json(out / "scan.json", doc)


def load_npz_triggers(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
