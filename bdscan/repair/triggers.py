"""Where the trigger to unlearn comes from: a scan's output folder, a scan in memory, or a file.

* :func:`reversed_trigger_from_scan` reads the folder ``bdscan scan --out DIR`` wrote: ``scan.json`` names the
  suspected target and the mode the verdict rests on, ``triggers.npz`` holds every label's reversed mask and
  pattern at full precision (``<mode>_labels`` (K,), ``<mode>_mask`` (K, H, W), ``<mode>_pattern``
  (K, C, H, W), ``<mode>_norm`` (K,)).
* :func:`reversed_trigger_from_findings` takes the same trigger from a :class:`~bdscan.detect.scan.ScanFindings`.
* :func:`trigger_from_file` reads a trigger file: an ``.npz`` with ``mask`` (H, W) and ``pattern`` (C, H, W),
  float in [0, 1] (or uint8 0-255), and optionally ``target`` (a scalar class index). Only ``.npz``: a
  mask/pattern pair of PNGs loses precision and needs two paths; ``np.savez(path, mask=m, pattern=p)`` writes one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bdscan.detect.scan import ScanFindings
from bdscan.errors import LoadError, NoSuspectError, UsageError
from bdscan.report.scandir import read_arrays, read_document, read_npz, scan_paths
from bdscan.trigger import Trigger

if TYPE_CHECKING:
    from bdscan.pipeline import Detection


def _pick(target: int | None, mode: str | None, basis: str | None, available: list[str], what: str) -> tuple[int, str]:
    if target is None:
        raise NoSuspectError(f"{what} found no backdoor suspect, so there is no reversed trigger to unlearn",
                         "repair with a trigger file (--trigger FILE) or name the label to unlearn (--label K)")
    chosen = mode or basis or ("pixel" if "pixel" in available else (available[0] if available else None))
    if chosen is None or chosen not in available:
        raise UsageError(f"{what} has no {chosen or 'reversed'} triggers",
                         f"choose one of the scanned modes: {', '.join(available) or 'none'}")
    return int(target), chosen


def reversed_trigger_from_scan(
    scan_dir_or_json: Path,
    mode: str | None = None,
    *,
    expected_sha256: str | None = None,
    label: int | None = None,
) -> Trigger:
    """The reversed trigger of a scan's suspected target, read from the scan's output folder.

    Args:
        scan_dir_or_json: the folder ``bdscan scan --out DIR`` wrote, or its ``scan.json`` (``triggers.npz``
            must sit next to it).
        mode: "pixel" or "patch"; default: the mode the verdict rests on.
        expected_sha256: the sha256 of the model being repaired; the scan must be of that very file.
        label: repair this label's reversed trigger instead of the verdict's target (e.g. after a clean verdict).

    Returns:
        a :class:`Trigger` of kind ``reversed-<mode>`` with ``target`` set and ``params`` naming the scan.

    Raises:
        LoadError: the folder, scan.json or triggers.npz is missing or unreadable, or lacks the label.
        UsageError: the scan found no suspect (and no ``label`` was given), the mode was not scanned, the
            label's inversion never succeeded, or the scan is of another model (sha256 mismatch).
    """
    js, npz = scan_paths(Path(scan_dir_or_json))
    doc = read_document(js)
    model = doc.get("model") or {}
    sha = model.get("sha256")
    if expected_sha256 is not None and sha != expected_sha256:
        raise UsageError(
            f"{js} is a scan of {model.get('file') or 'another model'} (sha256 {str(sha)[:12]}…), not of the model being "
            f"repaired (sha256 {expected_sha256[:12]}…)",
            "scan this model first (`bdscan scan MODEL --out DIR`) and repair with that scan",
        )
    verdict = doc.get("verdict") or {}
    arrays = read_arrays(js)
    available = [k[: -len("_labels")] for k in arrays if k.endswith("_labels")]
    target = label if label is not None else (verdict.get("target") if verdict.get("status") == "backdoor" else None)
    what = f"the scan in {js.parent}" + (f" (verdict: {verdict.get('status')})" if verdict.get("status") else "")
    target, chosen = _pick(target, mode, verdict.get("basis"), available, what)
    for key in ("labels", "mask", "pattern"):
        if f"{chosen}_{key}" not in arrays:
            raise LoadError(f"{npz}: no {chosen}_{key} array", "scan the model again")
    labels = arrays[f"{chosen}_labels"].astype(np.int64).tolist()
    if target not in labels:
        raise LoadError(f"{npz}: holds no {chosen} trigger of label {target}",
                        f"the scan inverted labels {', '.join(map(str, labels[:10]))}{'…' if len(labels) > 10 else ''}")
    i = labels.index(target)
    norms = arrays.get(f"{chosen}_norm")
    norm = float(norms[i]) if norms is not None else None
    if norm is not None and not math.isfinite(norm):
        raise UsageError(f"the {chosen} inversion of label {target} never reached its success threshold, so its trigger "
                         "does not flip the model", "name another label, or repair with a trigger file")
    mask = torch.from_numpy(np.asarray(arrays[f"{chosen}_mask"][i], dtype=np.float32))
    pattern = torch.from_numpy(np.asarray(arrays[f"{chosen}_pattern"][i], dtype=np.float32))
    params = {"source": "scan", "scan": js.name, "mode": chosen, "label": target, "norm": norm,
              "model_sha256": sha, "verdict": verdict.get("status"), "anomaly_index": verdict.get("anomaly_index")}
    return Trigger(mask, pattern, target, f"reversed-{chosen}", params)


def reversed_trigger_from_findings(findings: ScanFindings, mode: str | None = None, *, label: int | None = None) -> Trigger:
    """The reversed trigger of the suspected target of an in-memory scan (see :func:`reversed_trigger_from_scan`).

    Raises:
        UsageError: no suspect (and no ``label``), the mode was not scanned, or the label's inversion never succeeded.
    """
    v = findings.verdict
    target = label if label is not None else (v.target if v.status == "backdoor" else None)
    what = f"the scan (verdict: {v.status})"
    target, chosen = _pick(target, mode, v.basis, list(findings.modes), what)
    m = findings.modes[chosen]
    try:
        r = m.label(target)
    except StopIteration:
        raise UsageError(f"the {chosen} scan did not invert label {target}", "scan all labels, or name a scanned label") from None
    if r.norm is None:
        raise UsageError(f"the {chosen} inversion of label {target} never reached its success threshold, so its trigger "
                         "does not flip the model", "name another label, or repair with a trigger file")
    params = {"source": "scan", "mode": chosen, "label": target, "norm": r.norm, "param": r.param,
              "verdict": v.status, "anomaly_index": v.anomaly_index}
    return Trigger(r.mask.detach().float().cpu().clone(), r.pattern.detach().float().cpu().clone(), target,
                   f"reversed-{chosen}", params)


def reversed_trigger_from_detection(det: Detection, mode: str | None = None, *, label: int | None = None) -> Trigger:
    """Neural Cleanse's reversed trigger for the class the *combined* verdict suspects (another detector, e.g. neuron
    noise, may have decided it while Neural Cleanse alone found nothing), or for ``label`` when given.

    Raises:
        UsageError: the scan ran no Neural Cleanse (there is no reversed trigger), or as
            :func:`reversed_trigger_from_findings`.
        NoSuspectError: no detector suspects a class and no ``label`` was given.
    """
    nc = det.results.get("neural-cleanse")
    findings = getattr(nc, "findings", None)
    if findings is None:
        raise UsageError("the scan ran no Neural Cleanse, so there is no reversed trigger to unlearn",
                         "scan with Neural Cleanse among the detectors, or repair with a trigger file (--trigger FILE)")
    if label is None and (det.verdict.status != "backdoor" or det.verdict.target is None):
        # the combined verdict, not Neural Cleanse's own: its flag alone may not survive the other detectors' share of α
        _pick(None, mode, None, list(findings.modes), f"the scan (verdict: {det.verdict.status})")
    return reversed_trigger_from_findings(findings, mode, label=label if label is not None else det.verdict.target)


def trigger_from_file(path: Path, target: int | None = None) -> Trigger:
    """A trigger from an ``.npz`` with ``mask`` (H, W) and ``pattern`` (C, H, W) (see the module docstring).

    Args:
        path: the ``.npz``.
        target: the trigger's target class; overrides a ``target`` stored in the file. Without either, the
            repair takes the class the trigger sends most images to.

    Raises:
        LoadError: missing or unreadable file, missing arrays, values outside [0, 1].
        UsageError: not an ``.npz``.
    """
    p = Path(path)
    if p.suffix.lower() != ".npz":
        raise UsageError(f"{p.name}: trigger files are .npz archives with a 'mask' (H, W) and a 'pattern' (C, H, W)",
                         "write one with numpy: np.savez('trigger.npz', mask=mask, pattern=pattern, target=3)")
    if not p.is_file():
        raise LoadError(f"{p}: no such trigger file", "check the --trigger path")
    arrays = read_npz(p)
    missing = [k for k in ("mask", "pattern") if k not in arrays]
    if missing:
        raise LoadError(f"{p.name}: no {' or '.join(repr(k) for k in missing)} array",
                        "the .npz needs 'mask' (H, W) and 'pattern' (C, H, W)")
    mask, pattern = (_unit(arrays[k], p.name, k) for k in ("mask", "pattern"))
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or pattern.dim() != 3 or tuple(pattern.shape[1:]) != tuple(mask.shape):
        raise LoadError(f"{p.name}: mask {tuple(mask.shape)} and pattern {tuple(pattern.shape)} do not fit together",
                        "store mask (H, W) and pattern (C, H, W) of the same height and width")
    if target is None and "target" in arrays:
        t = arrays["target"]
        if t.size != 1 or not np.issubdtype(t.dtype, np.integer):
            raise LoadError(f"{p.name}: 'target' is not a single class index", "store target as an integer")
        target = int(t.reshape(()))
    return Trigger(mask, pattern, target, "file", {"source": "file", "file": p.name})


def _unit(a: np.ndarray, name: str, key: str) -> torch.Tensor:
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32) / 255.0)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise LoadError(f"{name}: {key!r} has dtype {a.dtype}, not numbers", f"store {key} as float in [0, 1]")
    t = torch.from_numpy(np.asarray(a, dtype=np.float32))
    if not torch.isfinite(t).all() or (t.numel() and (t.min() < 0 or t.max() > 1)):
        raise LoadError(f"{name}: {key!r} has values outside [0, 1]", f"store {key} as float in [0, 1] (or uint8 0-255)")
    return t
