"""The batch's result cache: a rerun skips the models it already scanned with the same inputs.

An entry lives in ``OUT/.cache/<key>.json``; its key is the SHA-256 of (the model file's SHA-256, the clean
data's SHA-256, the resolved configuration, bdscan's version). The resolved configuration is every detector's
frozen configuration (budget, steps, levels, precision as asked, seed, threshold, device...), the loading
options and the format, the detectors and their order, the samples per class and whether activations are
computed; ``workers`` and the torch thread count are left out (results do not depend on them). When no data is
given (a sample model's bundled images) the key says "bundled" and the entry records the file the scan used and
its SHA-256, checked again on every hit. Only finished scans are cached (backdoor, clean, inconclusive, unsafe);
an error is retried on the next run. An entry whose model folder is gone is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bdscan
from bdscan.atomic import atomic_write_text
from bdscan.io.base import sha256_file
from bdscan.pipeline import ScanRequest, configure

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"
#: statuses worth keeping: a finished scan (an error is retried)
CACHED = ("backdoor", "clean", "inconclusive", "unsafe")


def sha256_path(path: Path) -> str:
    """A file's SHA-256, or for a folder the SHA-256 of its files' relative paths and SHA-256s (sorted)."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def configuration(req: ScanRequest) -> dict[str, Any]:
    """The resolved configuration of a scan, as the cache key holds it (JSON-able)."""
    configs = {name: c.to_dict() if hasattr(c, "to_dict") else repr(c) for name, c in configure(req.settings, req.detectors).items()}
    for c in configs.values():
        if isinstance(c, dict):
            c.pop("workers", None)
    settings = asdict(req.settings)
    settings.pop("workers", None)
    return {"detectors": list(req.detectors), "configs": configs, "settings": settings, "load": asdict(req.load), "format": req.fmt,
            "samples_per_class": req.samples_per_class, "activations": req.activations}


class Cache:
    """The entries under ``OUT/.cache`` (``enabled=False``: lookups miss, results are still stored)."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.dir = out / CACHE_DIR
        self.out = out
        self.enabled = enabled
        self._data_sha: dict[Path, str] = {}

    def data_sha(self, path: Path) -> str:
        key = Path(path).resolve()
        if key not in self._data_sha:
            self._data_sha[key] = sha256_path(key)
        return self._data_sha[key]

    def key(self, req: ScanRequest, model_sha: str) -> str:
        """The entry's name for a scan of a model with SHA-256 ``model_sha`` (data hashed here)."""
        data = self.data_sha(req.data) if req.data is not None else "bundled"
        blob = json.dumps({"model": model_sha, "data": data, "config": configuration(req), "bdscan": bdscan.__version__},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached row for ``key``, or None (a miss, a stale entry, or the cache disabled)."""
        if not self.enabled:
            return None
        p = self.dir / f"{key}.json"
        try:
            entry = json.loads(p.read_text())
            row = entry["row"]
            folder = row.get("folder")
            if folder and not (self.out / folder / "scan.json").is_file():
                return None
            used = entry.get("data_path")
            if used and entry.get("data_sha256") and (not Path(used).exists() or self.data_sha(Path(used)) != entry["data_sha256"]):
                return None
            return dict(row)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable cache entry %s: %s", p, e)
            return None

    def put(self, key: str, row: dict[str, Any], data_path: str | None) -> None:
        """Stores a finished row (other statuses are not cached)."""
        if row.get("status") not in CACHED:
            return
        entry: dict[str, Any] = {"row": row, "data_path": data_path,
                                 "data_sha256": self.data_sha(Path(data_path)) if data_path and Path(data_path).exists() else None}
        atomic_write_text(self.dir / f"{key}.json", json.dumps(entry, indent=1, default=str))
