"""Writing a repaired model, chosen by the output's suffix, and proving the written file computes what the
repaired model computes.

=================  ==========================================================================================
``.safetensors``   weights + bdscan metadata (:func:`~bdscan.io.safetensors_io.save_safetensors`);
                   ``bdscan.extra`` holds the ``provenance`` record, with the input's own metadata moved
                   to ``provenance.input_metadata`` (a lab model's accuracy and attack success describe
                   the model before repair); a known original trigger is kept. Reloaded with
                   :func:`~bdscan.io.load_model`; logits must match within :data:`PARITY_TOL`.
``.onnx``          the raw network (normalised input, :func:`~bdscan.io.onnx_io.export_onnx`), provenance as
                   ``bdscan.provenance`` metadata; onnxruntime's logits on the held-out images (normalised
                   as the model expects) must match the torch network's within :data:`PARITY_TOL`.
``.pt``            TorchScript of the raw network (``torch.jit.trace``, or saved as is when it is already
                   TorchScript) with bdscan's metadata in ``extra/bdscan.json`` (the convention the TorchScript
                   loader reads) plus ``provenance``; reloaded with ``torch.jit.load`` and checked like ONNX.
=================  ==========================================================================================

Safety: the output may not be the input (``refuse_input_overwrite``); the file is written to a temporary path
next to the output, checked there, and only renamed into place when the check passes, so a failed export
leaves nothing behind. A repair whose clean-accuracy drop exceeds its tolerance is refused unless ``force``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import bdscan
from bdscan.errors import BdscanError, UsageError
from bdscan.io.atomic import atomic_path, refuse_input_overwrite
from bdscan.io.torchscript import META_FILE, bdscan_meta
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair.unlearn import RepairResult

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".onnx", ".pt")
#: max |logit difference| between the written file and the repaired model on the held-out images
PARITY_TOL = 1e-4
#: held-out images used for the parity check
PARITY_IMAGES = 64


class OutOfToleranceError(UsageError):
    """The repair cost more clean accuracy than its tolerance; exporting needs ``force``.

    Attributes:
        acc_drop: the measured drop (fraction).
        tolerance: the tolerance (fraction).
    """

    def __init__(self, message: str, acc_drop: float, tolerance: float, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.acc_drop = acc_drop
        self.tolerance = tolerance


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
        out: the output file (``.safetensors``, ``.onnx`` or ``.pt``).
        input_path: the repaired model's source file (never overwritten; named in the provenance).
        input_sha256: its sha256 (named in the provenance).
        extra_provenance: merged into the provenance record (e.g. the scan the trigger came from).
        force: export even when the accuracy drop exceeds the tolerance.

    Returns:
        ``out``.

    Raises:
        UsageError: unknown suffix, ``out`` is the input, or a safetensors export of a model without a registry
            architecture (loaded from ONNX/TorchScript).
        OutOfToleranceError: the accuracy drop exceeds the tolerance and ``force`` is False.
        ExportError: the written file does not reproduce the repaired model's logits.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"cannot write a repaired model as {out.suffix or 'a file without suffix'!r}",
                         f"name the output with one of: {', '.join(SUFFIXES)}")
    refuse_input_overwrite(out, [Path(input_path)])
    if not result.within_tolerance and not force:
        raise OutOfToleranceError(
            f"the repair lowered clean accuracy by {result.acc_drop * 100:.1f} points, more than the tolerance of "
            f"{result.tolerance * 100:.1f} points; the repaired model was not written",
            result.acc_drop, result.tolerance,
            "--force overrides (writes it anyway); or raise the tolerance, lower --lr or --epochs, or give more clean data",
        )
    prov = provenance(result, input_path, input_sha256, extra_provenance)
    x = _parity_images(result)
    writer = {".safetensors": _write_safetensors, ".onnx": _write_onnx, ".pt": _write_torchscript}[suffix]
    with atomic_path(out) as tmp:
        diff = writer(result, tmp, prov, x, out.name)
    log.info("wrote %s (max |logit difference| to the repaired model %.2g)", out, diff)
    return out


def _parity_images(result: RepairResult) -> torch.Tensor:
    if result.holdout is not None and len(result.holdout):
        return result.holdout.x[:PARITY_IMAGES].float().cpu()
    g = torch.Generator().manual_seed(0)
    return torch.rand((8, *result.wrapper.input_size), generator=g)


@torch.no_grad()
def _net_logits(wrapper: ModelWrapper, x: torch.Tensor) -> np.ndarray:
    """The raw network's output on ``x`` (pixels in [0, 1]), as the exported graph computes it."""
    wrapper.eval()
    out = wrapper.net(wrapper.normalise(x))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().cpu().double().numpy()


def _check(got: np.ndarray, ref: np.ndarray, fmt: str, name: str) -> float:
    if got.shape != ref.shape:
        raise ExportError(f"{name}: the exported {fmt} model returns {got.shape}, the repaired model {ref.shape}",
                          "export another format (.safetensors, .onnx or .pt)")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    if not np.isfinite(diff) or diff > PARITY_TOL:
        raise ExportError(
            f"{name}: the exported {fmt} model differs from the repaired model by {diff:.3g} "
            f"(max |logit difference| on {ref.shape[0]} held-out images, tolerance {PARITY_TOL:g}); nothing was written",
            "export another format (.safetensors, .onnx or .pt)",
        )
    return diff


def _write_safetensors(result: RepairResult, tmp: Path, prov: dict[str, Any], x: torch.Tensor, name: str) -> float:
    from bdscan.io import load_model
    from bdscan.io.safetensors_io import save_safetensors

    w = result.wrapper
    if not timm.is_model(w.info.arch):
        raise UsageError(
            f"this model was loaded from {w.info.arch} and has no registry architecture, so it cannot be saved as safetensors",
            "write the repaired model as .onnx or .pt instead",
        )
    # The input's metadata (a lab model's accuracy and attack success, its own provenance) describes the model
    # before repair: it moves under provenance.input_metadata instead of staying beside the new weights.
    old = json.loads(json.dumps(w.info.metadata, default=str))
    to_save = ModelWrapper(w.net, w.info.with_(metadata={}))
    save_safetensors(to_save, tmp, extra={"provenance": {**prov, "input_metadata": old}}, trigger=result.original)
    try:
        reloaded = load_model(tmp, fmt="safetensors").wrapper
    except BdscanError as e:
        raise ExportError(f"{name}: the written safetensors file does not load back: {e.message}",
                          "export .onnx or .pt instead") from e
    with torch.no_grad():
        got = reloaded.eval()(x).double().numpy()
        ref = w.eval()(x).double().numpy()
    return _check(got, ref, "safetensors", name)


def _ort_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    from bdscan.io.onnx_io import ort_session

    sess = ort_session(model_bytes)
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: x})[0])


def _write_onnx(result: RepairResult, tmp: Path, prov: dict[str, Any], x: torch.Tensor, name: str) -> float:
    import onnx

    from bdscan.io.onnx_io import META_PREFIX, export_onnx

    w = result.wrapper
    export_onnx(w, tmp)
    model = onnx.load(str(tmp))
    prop = model.metadata_props.add()
    prop.key = META_PREFIX + "provenance"
    prop.value = json.dumps(prov)
    data = model.SerializeToString()
    tmp.write_bytes(data)
    with torch.no_grad():
        xn = w.normalise(x).float().cpu().numpy()
    try:
        got = _ort_logits(data, xn)
    except Exception as e:
        raise ExportError(f"{name}: onnxruntime cannot run the exported model: {str(e).strip()[:200]}",
                          "export .safetensors or .pt instead") from e
    return _check(got, _net_logits(w, x), "ONNX", name)


def _write_torchscript(result: RepairResult, tmp: Path, prov: dict[str, Any], x: torch.Tensor, name: str) -> float:
    w = result.wrapper
    net = w.net.eval()
    meta = bdscan_meta(w)
    meta["input"] = "normalised"
    meta["provenance"] = prov
    files = {META_FILE: json.dumps(meta)}
    with torch.no_grad():
        example = w.normalise(x[:2])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            is_script = isinstance(net, torch.jit.ScriptModule)
            scripted = net if is_script else torch.jit.trace(net, example, check_trace=False, strict=False)
            torch.jit.save(scripted, str(tmp), _extra_files=files)
            loaded = torch.jit.load(str(tmp), map_location="cpu")
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot export {w.info.arch} as TorchScript: {msg}", "export .safetensors or .onnx instead") from e
    try:
        with torch.no_grad():
            out = loaded(w.normalise(x))
    except Exception as e:  # a trace that baked in its example's batch size
        msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{name}: the traced TorchScript model does not run on {len(x)} images: {msg}",
                          "export .safetensors or .onnx instead") from e
    if isinstance(out, (tuple, list)):
        out = out[0]
    return _check(out.double().numpy(), _net_logits(w, x), "TorchScript", name)
