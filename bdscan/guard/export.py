"""Exporting a guard: the model and its input filter in one file, checked before it is kept.

The exported graph takes exactly what the original network takes (``wrapper.net``'s input: images already
normalised the model's way, (N, C, H, W), any batch size), runs the network unchanged, and returns three
outputs:

* ``logits`` (N, classes) float: the network's own output (bit for bit the same computation);
* ``suspicion`` (N,) float: the guard's score (:class:`bdscan.guard.core.Scorer`) of the watched layer's
  features, which forward hooks read inside the traced graph (:mod:`bdscan.guard.features`);
* ``flagged`` (N,) bool: ``suspicion > threshold``.

Formats, by the output's suffix: ``.onnx`` (opset 17, torch's TorchScript-based exporter as
:func:`bdscan.io.export_onnx` uses; outputs named as above; metadata in ``metadata_props``) or ``.pt``
(TorchScript, traced; returns a dict with the three names; metadata in ``extra/bdscan.json``). The metadata
holds bdscan's usual model fields (normalisation, input size, class names: what ``guard-check`` needs to
feed [0, 1] images), ``bdscan.guard`` (threshold, requested and measured rates, layer, neurons, provenance:
the guarded file and its sha256, the trigger, the scan) and ``bdscan.input = "normalised"``.

Before the file is kept it is run back with its own runtime (onnxruntime for ONNX, ``torch.jit.load`` for
TorchScript) on the held-out test images: its logits must match the original model's within
:data:`PARITY_TOL` (relative to the largest logit, at least that much absolute), its suspicion the guard's
within :data:`SCORE_TOL`, and its flags the guard's wherever the score is not within that tolerance of the
threshold. Writing goes to a temporary file beside the output that is renamed into place only after the
check, so a failed export leaves nothing; the output may not be an input.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bdscan.atomic import atomic_path, refuse_input_overwrite
from bdscan.errors import BdscanError, UsageError, first_line
from bdscan.guard.core import GuardResult, Scorer
from bdscan.guard.features import FeatureLayer, FeatureTap
from bdscan.io.onnx_io import META_PREFIX, ort_session
from bdscan.io.selfdescribing import META_FILE, bdscan_meta

log = logging.getLogger(__name__)

#: the output names, in the order the ONNX graph returns them
OUTPUTS = ("logits", "suspicion", "flagged")
#: formats by suffix
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript"}
#: max |logit difference| to the original model, relative to max(1, largest |logit|)
PARITY_TOL = 1e-4
#: max |suspicion difference| to the guard computed in torch, relative to max(1, |suspicion|)
SCORE_TOL = 1e-3
#: test images the check runs on
PARITY_IMAGES = 64
OPSET = 17


class GuardExportError(BdscanError):
    """The guard cannot be written, or the written file does not compute what the model and guard compute."""


class GuardNet(nn.Module):
    """The network plus its guard, as one module (see the module docstring).

    Args:
        net: the original network (normalised input); shared, not copied.
        layer: the watched layer.
        scorer: the suspicion score.
        threshold: flag above this.
    """

    def __init__(self, net: nn.Module, layer: FeatureLayer, scorer: Scorer, threshold: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("idx", scorer.idx.clone().long())
        self.register_buffer("mu", scorer.mu.clone().float())
        self.register_buffer("sigma", scorer.sigma.clone().float())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.tap = FeatureTap(net, layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(x)
        if isinstance(out, (tuple, list)):  # as the model wrapper averages DeiT's two heads
            out = (out[0] + out[1]) / 2
        f = self.tap.take()
        z = (f.index_select(1, self.idx) - self.mu) / self.sigma
        suspicion = z.mean(dim=1)
        return out, suspicion, suspicion > self.threshold

    def close(self) -> None:
        self.tap.close()


class _Named(nn.Module):
    """TorchScript has no output names: return a dict with them."""

    def __init__(self, guard: GuardNet) -> None:
        super().__init__()
        self.guard = guard

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, suspicion, flagged = self.guard(x)
        return {"logits": logits, "suspicion": suspicion, "flagged": flagged}


def guard_metadata(result: GuardResult, input_path: Path, input_sha256: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata an exported guard carries (see the module docstring)."""
    meta = bdscan_meta(result.wrapper)
    meta["input"] = "normalised"
    g = result.metadata()
    g["guarded_from"] = {"file": Path(input_path).name, "sha256": input_sha256}
    g["outputs"] = list(OUTPUTS)
    g.update(extra or {})
    meta["guard"] = json.loads(json.dumps(g, default=str))
    return meta


def _write_onnx(guard: GuardNet, example: torch.Tensor, meta: dict[str, Any], tmp: Path) -> None:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            guard, (example,), buf, opset_version=OPSET, dynamo=False, input_names=["input"], output_names=list(OUTPUTS),
            dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}}, do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    for k, v in meta.items():
        prop = model.metadata_props.add()
        prop.key = META_PREFIX + k
        prop.value = json.dumps(v)
    tmp.write_bytes(model.SerializeToString())


def _write_torchscript(guard: GuardNet, example: torch.Tensor, meta: dict[str, Any], tmp: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_Named(guard), example, check_trace=False, strict=False)
        torch.jit.save(traced, str(tmp), _extra_files={META_FILE: json.dumps(meta)})


def _run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort_session(path.read_bytes())
    names = [o.name for o in sess.get_outputs()]
    if tuple(names) != OUTPUTS:
        raise GuardExportError(f"the exported graph's outputs are {names}, not {list(OUTPUTS)}")
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    return {n: np.asarray(v) for n, v in zip(names, got, strict=True)}


def _run_torchscript(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = loaded(torch.from_numpy(x))
    return {n: out[n].numpy() for n in OUTPUTS}


_WRITERS = {"onnx": (_write_onnx, _run_onnx, "ONNX"), "torchscript": (_write_torchscript, _run_torchscript, "TorchScript")}


def _check(got: dict[str, np.ndarray], logits: np.ndarray, suspicion: np.ndarray, threshold: float, name: str) -> dict[str, Any]:
    """Parity of the written file with the model and guard (see the module docstring); raises on a mismatch."""
    n = logits.shape[0]
    gl, gs, gf = got["logits"], got["suspicion"], got["flagged"]
    if gl.shape != logits.shape or gs.shape != (n,) or gf.shape != (n,):
        raise GuardExportError(f"{name}: the written guard returns shapes {gl.shape}, {gs.shape}, {gf.shape}; expected "
                               f"{logits.shape}, ({n},), ({n},)")
    if gf.dtype != np.bool_:
        raise GuardExportError(f"{name}: the written guard's 'flagged' output is {gf.dtype}, not bool")
    scale = max(1.0, float(np.abs(logits).max())) if logits.size else 1.0
    dl = float(np.abs(gl.astype(np.float64) - logits).max()) if logits.size else 0.0
    ds = float((np.abs(gs.astype(np.float64) - suspicion) / np.maximum(1.0, np.abs(suspicion))).max()) if n else 0.0
    if not np.isfinite(dl) or dl > PARITY_TOL * scale:
        raise GuardExportError(f"{name}: the written guard's logits differ from the model's by {dl:.3g} (tolerance "
                               f"{PARITY_TOL * scale:.3g}, {n} held-out images); nothing was written")
    if not np.isfinite(ds) or ds > SCORE_TOL:
        raise GuardExportError(f"{name}: the written guard's suspicion differs from the guard's by {ds:.3g} (relative tolerance "
                               f"{SCORE_TOL:g}); nothing was written")
    clear = np.abs(suspicion - threshold) > SCORE_TOL * np.maximum(1.0, np.abs(suspicion))
    if bool((gf[clear] != (suspicion[clear] > threshold)).any()):
        raise GuardExportError(f"{name}: the written guard flags other images than the guard does; nothing was written")
    return {"images": n, "max_logit_difference": dl, "max_suspicion_difference": ds}


def export_guard(
    result: GuardResult,
    out: Path,
    input_path: Path,
    input_sha256: str,
    extra_provenance: dict[str, Any] | None = None,
    inputs: list[Path | None] | None = None,
) -> dict[str, Any]:
    """Writes the guard of ``result`` to ``out`` (``.onnx`` or ``.pt``) after checking it (module docstring).

    Args:
        result: a guard that reached its rate (:meth:`GuardResult.check` is called).
        out: the output file.
        input_path: the guarded model's file (named in the metadata; never overwritten).
        input_sha256: its sha256.
        extra_provenance: merged into the metadata's ``guard`` record (e.g. the scan the trigger came from).
        inputs: other input paths ``out`` must not be.

    Returns:
        the check's figures: ``format``, ``images``, ``max_logit_difference``, ``max_suspicion_difference``.

    Raises:
        GuardRateError: the guard did not reach its rate.
        UsageError: an unknown suffix, or ``out`` is an input.
        GuardExportError: the model cannot be exported, or the written file does not match.
    """
    out = Path(out)
    fmt = SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"{out.name}: a guard is written as .onnx or .pt (TorchScript)", "e.g. --out guard.onnx")
    refuse_input_overwrite(out, [Path(input_path), *(inputs or [])])
    result.check()
    assert result.threshold is not None
    write, run, title = _WRITERS[fmt]
    w = result.wrapper.cpu().eval()
    meta = guard_metadata(result, input_path, input_sha256, extra_provenance)
    hold = result.holdout
    x = hold.x[:PARITY_IMAGES] if hold is not None and len(hold) else torch.rand((8, *w.input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        xn = w.normalise(x.float()).contiguous()
        ref = w.net(xn)  # the original network's own output, before any hook is attached
        if isinstance(ref, (tuple, list)):
            ref = (ref[0] + ref[1]) / 2
        ref_logits = ref.double().numpy()
    guard = GuardNet(w.net, result.layer, result.scorer, result.threshold).eval()
    try:
        with torch.no_grad():
            _, suspicion, _ = guard(xn)
        with atomic_path(out) as tmp:
            try:
                write(guard, xn[:2], meta, tmp)
            except Exception as e:
                raise GuardExportError(f"cannot export the guard of {w.info.arch} as {title}: {first_line(e)}",
                                       f"write it as {' or '.join(s for s in SUFFIXES if SUFFIXES[s] != fmt)} instead") from e
            try:
                got = run(tmp, xn.numpy())
            except GuardExportError:
                raise
            except Exception as e:
                raise GuardExportError(f"{out.name}: the written {title} guard does not run: {first_line(e)}; nothing was written") from e
            figures = _check(got, ref_logits, suspicion.double().numpy(), result.threshold, out.name)
    finally:
        guard.close()
    log.info("wrote %s (max |logit difference| %.2g)", out, figures["max_logit_difference"])
    return {"format": fmt, **figures}
