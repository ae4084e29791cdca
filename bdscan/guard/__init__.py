"""An input guard: Neural Cleanse's first mitigation (Wang et al., S&P 2019, section VI-A), exported with the model.

When a backdoored model cannot be retrained today (a vendor model, a frozen release), keep serving it but catch
triggered inputs: the neurons the (reversed) trigger drives most are watched, and an input whose activation of
them is unusually high is flagged, at a threshold set for a chosen false-positive rate on held-out clean images.

* :mod:`~bdscan.guard.features`: which layer is watched (the classifier's input, or a transformer's
  token-averaged features) and reading it with hooks;
* :mod:`~bdscan.guard.core`: the split, the neurons, the score, the threshold and the measurements
  (:func:`build_guard`, :class:`GuardResult`);
* :mod:`~bdscan.guard.export`: the model and its guard as one ONNX or TorchScript file with the outputs
  ``logits``, ``suspicion`` and ``flagged``, checked with its own runtime before it is kept;
* :mod:`~bdscan.guard.check`: loading a guard file safely and running it over inputs (``guard-check``);
* :mod:`~bdscan.guard.report`: the guard's JSON document and HTML page.

Typical use (what ``bdscan guard`` does)::

    lm = load_model(path)
    trigger = reversed_trigger_from_scan(scan_dir, expected_sha256=lm.sha256)
    result = build_guard(lm.wrapper, data, trigger, GuardConfig(fpr=0.05), original=lm.original_trigger)
    export_guard(result, Path("guard.onnx"), lm.path, lm.sha256)
"""

from bdscan.guard.core import (
    MIN_NEURONS,
    GuardConfig,
    GuardRateError,
    GuardResult,
    Rate,
    Scorer,
    build_guard,
    conformal_threshold,
    min_calibration_images,
    select_neurons,
    split_guard_data,
)
from bdscan.guard.export import OUTPUTS, SUFFIXES, GuardExportError, GuardNet, export_guard
from bdscan.guard.features import LAYERS, FeatureLayer, features, resolve_layer

__all__ = [
    "LAYERS",
    "MIN_NEURONS",
    "OUTPUTS",
    "SUFFIXES",
    "FeatureLayer",
    "GuardConfig",
    "GuardExportError",
    "GuardNet",
    "GuardRateError",
    "GuardResult",
    "Rate",
    "Scorer",
    "build_guard",
    "conformal_threshold",
    "export_guard",
    "features",
    "min_calibration_images",
    "resolve_layer",
    "select_neurons",
    "split_guard_data",
]
