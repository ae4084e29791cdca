"""Telling zip-based checkpoints apart by their member names, without reading any member.

``torch.save``, ``torch.jit.save`` and ``torch.export.save`` all write zip archives; which one wrote a file is
told by its layout (:func:`torch_zip_kind`). Archives are opened with picklescan's ``RelaxedZipFile``, which,
like torch's own reader, ignores CRCs and flag bits, so a file is sniffed the way torch will read it.
"""

from __future__ import annotations

from pathlib import Path

from picklescan.relaxed_zipfile import RelaxedZipFile

ZIP_MAGIC = b"PK\x03\x04"


def zip_names(path: Path) -> list[str] | None:
    """Member names of a zip archive that starts with the zip magic, None otherwise (never raises)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                return None
            f.seek(0)
            with RelaxedZipFile(f, "r") as z:
                return z.namelist()
    except Exception:
        return None


def torch_zip_kind(names: list[str]) -> str | None:
    """Which torch serialiser wrote an archive: "torchscript", "torch-export", "state-dict" or None.

    TorchScript archives hold ``<root>/code/`` or ``<root>/constants.pkl``; ``torch.export`` archives hold
    ``<root>/archive_format``, ``<root>/models/*.json`` or (older torch) ``serialized_exported_program.json``;
    ``torch.save`` archives hold ``<root>/data.pkl``. The first two also hold pickles, so they are tested first.
    """
    for n in names:
        parts = n.split("/")
        if (len(parts) >= 3 and parts[1] == "code") or (len(parts) == 2 and parts[1] == "constants.pkl"):
            return "torchscript"
    for n in names:
        parts = n.split("/")
        if (len(parts) == 2 and parts[1] == "archive_format") or n == "serialized_exported_program.json":
            return "torch-export"
        if len(parts) >= 3 and parts[1] == "models" and n.endswith(".json"):
            return "torch-export"
    for n in names:
        if n.endswith("data.pkl"):
            return "state-dict"
    return None
