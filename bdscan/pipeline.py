"""The scan pipeline: one function that runs a scan for any caller (the CLI, repair, the study, a batch task).

:func:`run_scan` takes a :class:`ScanRequest` (model file, clean data, detectors and their settings, outputs),
loads the model safely, runs the chosen detectors, combines their evidence into one verdict, builds the scan
document and writes the requested outputs. It reports what it does through a :class:`ScanEvents` object and
never prints: the CLI turns events into console lines and progress bars (modelscan's orchestrator, separate
from its CLI). Errors are :class:`bdscan.errors.BdscanError` subclasses; only the CLI maps them to exit codes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdscan.data import CleanData, load_clean_data
from bdscan.detect import DEFAULT_DETECTORS, CombinedVerdict, DetectorResult, ScanSettings, combine, get_detector
from bdscan.detect.inversion import bf16_emulated, resolve_precision
from bdscan.errors import UnsafeModelError, UsageError
from bdscan.events import ScanEvents as ScanEvents  # re-exported: callers subclass it from here
from bdscan.events import ScanPlan as ScanPlan
from bdscan.io import LoadedModel, LoadOptions, load_model
from bdscan.io.base import sha256_file
from bdscan.models.cost import estimate_seconds
from bdscan.report.json_report import example_image, invocation_section, scan_document, unsafe_document
from bdscan.report.outputs import RenderContext, check_targets, write_outputs

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Outputs:
    """Where a scan writes (None = not written); see :data:`bdscan.report.outputs.RENDERERS`.

    Attributes:
        folder: the scan folder (scan.json, triggers.npz, PNGs).
        json: the scan document.
        sarif: SARIF 2.1.0.
        html: the HTML report.
        sarif_uri: how SARIF names the model (default: the model path as given).
    """

    folder: Path | None = None
    json: Path | None = None
    sarif: Path | None = None
    html: Path | None = None
    sarif_uri: str | None = None

    def targets(self) -> dict[str, Path | None]:
        return {"folder": self.folder, "json": self.json, "sarif": self.sarif, "html": self.html}


@dataclass(frozen=True)
class ScanRequest:
    """Everything a scan needs.

    Attributes:
        model: the model file (or a model folder a loader accepts).
        data: clean images (folder or .npz); None = the samples bundled with a sample model.
        load: how to load weight-only files (architecture, input scaling, ...).
        fmt: force a loader by name.
        settings: budget, levels, threshold, seed, device, workers and overrides (every detector's options).
        detectors: registered detector names, in the order they run.
        samples_per_class: read at most this many clean images per class.
        activations: add the activation analysis (Neural Cleanse's first mitigation's evidence) to the document.
        outputs: where to write.
    """

    model: Path
    data: Path | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    fmt: str | None = None
    settings: ScanSettings = field(default_factory=ScanSettings)
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    samples_per_class: int | None = None
    activations: bool = True
    outputs: Outputs = field(default_factory=Outputs)


@dataclass
class Detection:
    """The detectors' results and the combined verdict (no document, no files)."""

    results: dict[str, DetectorResult]
    verdict: CombinedVerdict
    configs: dict[str, Any]
    seconds: float


@dataclass
class ScanOutcome:
    """A finished scan: the document, what it was computed from, and the files written."""

    doc: dict[str, Any]
    model: LoadedModel
    data: CleanData
    detection: Detection
    written: list[Path]

    @property
    def status(self) -> str:
        return str(self.doc["verdict"]["status"])


def check_device(device: str) -> None:
    """Raises :class:`UsageError` for an unknown device or a missing GPU."""
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}", "use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is available", "use --device cpu")


def resolve_data(data: Path | None, lm: LoadedModel) -> Path:
    """``data``, or the clean samples bundled with a sample model (metadata key ``samples``)."""
    if data is not None:
        return data
    rel = lm.wrapper.info.metadata.get("samples")
    if rel:
        # relative to the current directory when the model path was relative: reports keep the user's relative paths
        p = Path(os.path.normpath(lm.path.parent / str(rel)))
        if p.exists():
            return p
    raise UsageError(f"no clean data given for {lm.path.name}",
                     "pass --data with a folder (one sub-folder per class) or an .npz of clean images")


def load_data(lm: LoadedModel, data: Path | None, samples_per_class: int | None, seed: int) -> tuple[Path, CleanData]:
    """The clean data for ``lm``: its path and images resized to the model's input."""
    info = lm.wrapper.info
    path = resolve_data(data, lm)
    return path, load_clean_data(path, info.input_size, info.num_classes, info.class_names, samples_per_class, seed)


def configure(settings: ScanSettings, detectors: Sequence[str]) -> dict[str, Any]:
    """Each detector's frozen configuration for ``settings`` (validated before any work)."""
    return {name: get_detector(name).configure(settings) for name in detectors}


def detect(lm: LoadedModel, data: CleanData, settings: ScanSettings, detectors: Sequence[str] = DEFAULT_DETECTORS,
           events: ScanEvents | None = None, configs: Mapping[str, Any] | None = None) -> Detection:
    """Runs ``detectors`` on a loaded model and combines their evidence (no files are read or written).

    Raises:
        UnsafeModelError: the model's static pickle scan found dangerous imports (loaders refuse these already).
    """
    ev = events or ScanEvents()
    if lm.pickle_scan is not None and lm.pickle_scan.dangerous:
        raise UnsafeModelError(f"{lm.path.name}: dangerous pickle imports", [f.ref for f in lm.pickle_scan.findings],
                               fmt=lm.format, scanner=lm.pickle_scan.scanner)
    configs = dict(configs or configure(settings, detectors))
    t0 = time.perf_counter()
    results: dict[str, DetectorResult] = {}
    for name in detectors:
        results[name] = get_detector(name).detect(lm.wrapper, data, configs[name], ev.progress)
        log.info("%s: %s", name, results[name].evidence.reason)
    verdict = combine((r.evidence for r in results.values()), settings.alpha)
    return Detection(results, verdict, configs, time.perf_counter() - t0)


def scan_loaded(lm: LoadedModel, data: CleanData, data_path: Path, settings: ScanSettings,
                detectors: Sequence[str] = DEFAULT_DETECTORS, activations: bool = True,
                events: ScanEvents | None = None) -> tuple[dict[str, Any], Detection]:
    """Detection plus the scan document, for a model and data already loaded (repair runs a scan this way)."""
    ev = events or ScanEvents()
    t0 = time.perf_counter()
    configs = configure(settings, detectors)
    precision = resolve_precision(settings.precision or _budget_precision(settings), lm.wrapper, settings.device)
    if bf16_emulated(settings.precision or _budget_precision(settings), settings.device):
        ev.warning("this CPU has no native bf16 instructions (AVX512-BF16 or AMX), so --precision bf16 runs emulated, "
                   "about 10× slower than fp32; use --precision auto")
    nc_config = configs.get("neural-cleanse")
    others = sum(get_detector(d).passes(lm.wrapper, len(data), configs[d]) for d in detectors)
    estimate = estimate_seconds(lm.wrapper, nc_config, other_passes=others) if settings.device == "cpu" else None
    ev.planned(ScanPlan(lm, data, data_path, settings, tuple(detectors), configs, precision, estimate))
    det = detect(lm, data, settings, detectors, ev, configs)
    doc = scan_document(lm, data, det.results, det.verdict, settings.seed, example_image(data, det.verdict.target),
                        time.perf_counter() - t0)
    nc = det.results.get("neural-cleanse")
    if activations and nc is not None:
        doc["activations"] = _activations(lm, data, nc)
    return doc, det


def run_scan(request: ScanRequest, events: ScanEvents | None = None) -> ScanOutcome:
    """Runs a whole scan: checks the outputs, loads model and data, detects, documents, writes.

    Output paths are checked before any work, so an unwritable output fails in a second, not after the scan.
    A model refused as unsafe still gets its outputs (a document with status "unsafe") before the error is
    raised again.

    Raises:
        UsageError: a bad option, missing data or an output that cannot be written.
        LoadError: the model or the data cannot be loaded.
        UnsafeModelError: the file's static pickle scan found dangerous imports.
    """
    t0 = time.perf_counter()
    req = request
    check_targets(req.outputs.targets(), [req.model, req.data])
    check_device(req.settings.device)
    if req.samples_per_class is not None and req.samples_per_class < 1:
        raise UsageError(f"--samples-per-class {req.samples_per_class} is not positive", "leave it out to read every image")
    configure(req.settings, req.detectors)  # option errors before loading anything
    torch.manual_seed(req.settings.seed)
    try:
        lm = load_model(req.model, req.load, req.fmt)
    except UnsafeModelError as e:
        doc = unsafe_document(req.model.name, sha256_file(req.model), e.fmt, e.scanner, list(e.findings), req.settings.seed,
                              e.message)
        write_outputs(doc, req.outputs.targets(), RenderContext(req.outputs.sarif_uri or str(req.model)))
        raise
    data_path, data = load_data(lm, req.data, req.samples_per_class, req.settings.seed)
    doc, det = scan_loaded(lm, data, data_path, req.settings, req.detectors, req.activations, events)
    doc["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    doc["invocation"] = invocation_section(req.model, data_path, req.outputs.folder, req.load, req.fmt)
    written = write_scan_outputs(doc, det, data, req.outputs, str(req.model))
    return ScanOutcome(doc, lm, data, det, written)


def write_scan_outputs(doc: dict[str, Any], det: Detection, data: CleanData, outputs: Outputs, model_uri: str) -> list[Path]:
    """Writes a scan's outputs: the document in each requested format, the detectors' arrays and images in the folder."""
    example = example_image(data, det.verdict.target)
    arrays: dict[str, Any] = {}
    for r in det.results.values():
        arrays.update(r.arrays())
    ctx = RenderContext(outputs.sarif_uri or model_uri, arrays, [img for r in det.results.values() for img in r.images(example)])
    return write_outputs(doc, outputs.targets(), ctx)


def _budget_precision(settings: ScanSettings) -> str:
    from bdscan.detect.config import budget

    return budget(settings.budget).precision


def _activations(lm: LoadedModel, data: CleanData, nc: Any) -> dict[str, Any] | None:
    try:
        from bdscan.analysis.activations import activations_section
    except ImportError:  # the analysis plug-in is optional
        return None
    return activations_section(lm.wrapper, data, nc.findings, lm.original_trigger)
