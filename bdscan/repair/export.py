"""Writing a repaired model, in the format its output suffix names, and proving the written file computes what
the repaired model computes.

The format's writer comes from the format registry (:func:`bdscan.io.writer_for`: ``.safetensors``, ``.onnx``,
``.pt`` for TorchScript; see each writer for what it stores). The written file carries the repair's
``provenance`` record in its metadata; the input's own metadata (a lab model's accuracy and attack success)
describes the model *before* repair, so it moves to ``provenance.input_metadata`` instead of staying beside the
new weights; a known original trigger is kept where the format has room for it (safetensors). The writer then
runs the written file with the format's own runtime (safetensors: bdscan's loader, ONNX: onnxruntime,
TorchScript: ``torch.jit.load``) on the held-out images, and its outputs must match the repaired model's
within :data:`PARITY_TOL`.

Safety: the output may not be the input (``refuse_input_overwrite``); the file is written to a temporary path
next to the output, checked there, and only renamed into place when the check passes, so a failed export
leaves nothing behind. A repair that failed one of its checks (:mod:`bdscan.repair.checks`: clean accuracy
shown to drop beyond the tolerance, or a trigger that still works) is refused unless ``force``; a forced export
says so in its provenance (``forced: true`` and the failed checks).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bdscan
from bdscan.atomic import atomic_path, refuse_input_overwrite
from bdscan.errors import BdscanError, UsageError
from bdscan.io import output_suffixes, writer_for
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair.core import RepairResult

log = logging.getLogger(__name__)

#: the suffixes a repaired model can be written with (one per registered writer format)
SUFFIXES = output_suffixes()
#: max |logit difference| between the written file and the repaired model on the held-out images
PARITY_TOL = 1e-4
#: held-out images used for the parity check
PARITY_IMAGES = 64


class OutOfToleranceError(UsageError):
    """The repair failed one of its checks (accuracy beyond tolerance, or the backdoor still works); exporting
    needs ``force``.

    Attributes:
        acc_drop: the measured drop (fraction).
        tolerance: the tolerance (fraction).
        failed: the names of the failed checks ("clean accuracy", "attack success").
    """

    def __init__(self, message: str, acc_drop: float, tolerance: float, hint: str | None = None,
                 failed: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.acc_drop = acc_drop
        self.tolerance = tolerance
        self.failed = failed


def refusal(result: RepairResult) -> OutOfToleranceError | None:
    """Why the repaired model may not be exported without ``force`` (None when it passed both checks)."""
    if result.passed:
        return None
    parts, hints, failed = [], [], []
    if not result.within_tolerance:
        lo = (result.intervals.get("acc_drop") or (result.acc_drop, result.acc_drop))[0]
        parts.append(f"it lowered clean accuracy by {result.acc_drop * 100:.1f} points (95 % interval from {lo * 100:.1f}), "
                     f"beyond the tolerance of {result.tolerance * 100:.1f} points")
        hints.append("lower --lr or --epochs, or give more clean data")
        failed.append("clean accuracy")
    if not result.backdoor_removed:
        worst = max((v for k, v in result.after.items() if k.startswith("asr_") and v is not None), default=None)
        parts.append("the trigger still sends " + (f"{worst * 100:.1f} % " if worst is not None else "")
                      + f"of the held-out images of other classes to the target, above the limit of {result.config.max_asr * 100:.0f} %")
        hints.append("try a higher --lr (e.g. 0.001), more --epochs, more clean data, or the scan's other --level")
        failed.append("attack success")
    return OutOfToleranceError(
        "the repair failed: " + "; and ".join(parts) + "; the repaired model was not written",
        result.acc_drop, result.tolerance,
        "; ".join(hints) + "; --force writes it anyway, marked as forced in its provenance and the report",
        tuple(failed),
    )


class ExportError(BdscanError):
    """The written model does not compute what the repaired model computes (or cannot be written at all)."""


def provenance(result: RepairResult, input_path: Path, input_sha256: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record a repaired file carries: where it came from, how it was repaired, what that measured."""
    d = result.to_dict()
    rec: dict[str, Any] = {
        "repaired_from": {"file": Path(input_path).name, "sha256": input_sha256},
        "method": d["method"],
        "trigger": d["trigger"],
        "before": d["before"],
        "after": d["after"],
        "acc_drop": d["acc_drop"],
        "tolerance": d["tolerance"],
        "within_tolerance": d["within_tolerance"],
        "intervals": d["intervals"],
        "max_asr": d["max_asr"],
        "backdoor_removed": d["backdoor_removed"],
        "passed": d["passed"],
        "forced": not d["passed"],
        "checks": d["checks"],
        "config": d["config"],
        "holdout_images": d["holdout_images"],
        "repair_images": d["repair_images"],
        "details": d["details"],
        "bdscan": bdscan.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    rec.update(extra or {})
    return json.loads(json.dumps(rec, default=str))


def export_repaired(
    result: RepairResult,
    out: Path,
    input_path: Path,
    input_sha256: str,
    extra_provenance: dict[str, Any] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Writes the repaired model to ``out`` in the format its suffix names (see the module docstring).

    Args:
        result: the repair.
        out: the output file (one of :data:`SUFFIXES`).
        input_path: the repaired model's source file (never overwritten; named in the provenance).
        input_sha256: its sha256 (named in the provenance).
        extra_provenance: merged into the provenance record (e.g. the scan the trigger came from).
        force: export even when the repair failed one of its checks (the provenance records ``forced: true``).

    Returns:
        ``out``.

    Raises:
        UsageError: unknown suffix, ``out`` is the input, or a format that cannot hold the model (safetensors for a
            model without a registry architecture, loaded from ONNX/TorchScript).
        OutOfToleranceError: the repair failed one of its checks and ``force`` is False.
        ExportError: the model cannot be written in that format, or the written file does not reproduce the
            repaired model's logits.
    """
    out = Path(out)
    writer = writer_for(out)
    refuse_input_overwrite(out, [Path(input_path)])
    refused = refusal(result)
    if refused is not None and not force:
        raise refused
    prov = provenance(result, input_path, input_sha256, extra_provenance)
    w = result.wrapper
    input_metadata = json.loads(json.dumps(w.info.metadata, default=str))
    to_save = ModelWrapper(w.net, w.info.with_(metadata={}))
    extra = {"provenance": {**prov, "input_metadata": input_metadata}}
    x = _parity_images(result)
    others = " or ".join(output_suffixes(exclude=writer.name))
    with atomic_path(out) as tmp:
        try:
            writer.write(to_save, tmp, extra, result.original)
        except UsageError as e:
            raise UsageError(e.message, f"write the repaired model as {others} instead") from e
        except BdscanError as e:
            raise ExportError(e.message, f"export {others} instead") from e
        try:
            back = writer.read_back(tmp, w, x)
        except BdscanError as e:
            raise ExportError(f"{out.name}: {e.message}", f"export {others} instead") from e
        diff = _check(back.written, back.expected, writer.title, out.name, others)
        if tmp.is_file():  # a writer may create its file 0600 (a temp file of its own): give it the user's umask
            os.chmod(tmp, file_mode(out))
    log.info("wrote %s (max |logit difference| to the repaired model %.2g)", out, diff)
    return out


def file_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would give: an existing file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _parity_images(result: RepairResult) -> torch.Tensor:
    if result.holdout is not None and len(result.holdout):
        return result.holdout.x[:PARITY_IMAGES].float().cpu()
    g = torch.Generator().manual_seed(0)
    return torch.rand((8, *result.wrapper.input_size), generator=g)


def _check(got: np.ndarray, ref: np.ndarray, fmt: str, name: str, others: str) -> float:
    if got.shape != ref.shape:
        raise ExportError(f"{name}: the exported {fmt} model returns {got.shape}, the repaired model {ref.shape}",
                          f"export {others} instead")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    if not np.isfinite(diff) or diff > PARITY_TOL:
        raise ExportError(
            f"{name}: the exported {fmt} model differs from the repaired model by {diff:.3g} "
            f"(max |logit difference| on {ref.shape[0]} held-out images, tolerance {PARITY_TOL:g}); nothing was written",
            f"export {others} instead",
        )
    return diff
