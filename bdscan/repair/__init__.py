"""Removing a backdoor: unlearning (fine-tuning with the trigger stamped on images that keep their true labels)
or pruning (zeroing the penultimate neurons the trigger excites), as in Neural Cleanse (Wang et al. 2019,
section VI), then exporting the repaired model with a provenance record.

Typical use (what ``bdscan repair`` does)::

    lm = load_model(path)
    trigger = reversed_trigger_from_scan(scan_dir, expected_sha256=lm.sha256)
    result = repair(lm.wrapper, data, trigger, RepairConfig(), original=lm.original_trigger)
    export_repaired(result, out, lm.path, lm.sha256, {"scan": str(scan_dir)})
    doc["repair"] = result.to_dict()
"""

from bdscan.repair.export import SUFFIXES, ExportError, OutOfToleranceError, export_repaired, provenance
from bdscan.repair.prune import find_classifier, prune_neurons
from bdscan.repair.triggers import reversed_trigger_from_findings, reversed_trigger_from_scan, trigger_from_file
from bdscan.repair.unlearn import (
    METHODS,
    RepairConfig,
    RepairProgress,
    RepairResult,
    measure,
    repair,
    split_data,
    trigger_summary,
    unlearn,
)

__all__ = [
    "METHODS",
    "SUFFIXES",
    "ExportError",
    "OutOfToleranceError",
    "RepairConfig",
    "RepairProgress",
    "RepairResult",
    "export_repaired",
    "find_classifier",
    "measure",
    "provenance",
    "prune_neurons",
    "repair",
    "reversed_trigger_from_findings",
    "reversed_trigger_from_scan",
    "split_data",
    "trigger_from_file",
    "trigger_summary",
    "unlearn",
]
