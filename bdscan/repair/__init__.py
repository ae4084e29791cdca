"""Removing a backdoor: unlearning (fine-tuning with the trigger stamped on images that keep their true labels)
or pruning (zeroing the penultimate neurons the trigger excites), as in Neural Cleanse (Wang et al. 2019,
section VI), then exporting the repaired model with a provenance record.

:mod:`bdscan.repair.core` holds what every method shares and the method table; each method is one module that
registers itself (:mod:`~bdscan.repair.unlearn`, :mod:`~bdscan.repair.prune`); a new method is one new module
plus its import below.

Typical use (what ``bdscan repair`` does)::

    lm = load_model(path)
    trigger = reversed_trigger_from_scan(scan_dir, expected_sha256=lm.sha256)
    result = repair(lm.wrapper, data, trigger, RepairConfig(), original=lm.original_trigger)
    export_repaired(result, out, lm.path, lm.sha256, {"scan": str(scan_dir)})
    doc["repair"] = result.to_dict()
"""

# isort: off
# Importing a method module registers it; registration order = the order the methods are listed in.
from bdscan.repair.unlearn import unlearn
from bdscan.repair.prune import find_classifier, prune_neurons

# isort: on
from bdscan.repair.checks import Check, measure
from bdscan.repair.core import (
    RepairConfig,
    RepairMethod,
    RepairProgress,
    RepairResult,
    get_method,
    register_method,
    repair,
    repair_methods,
    split_data,
    trigger_summary,
)
from bdscan.repair.export import SUFFIXES, ExportError, OutOfToleranceError, export_repaired, provenance
from bdscan.repair.triggers import reversed_trigger_from_findings, reversed_trigger_from_scan, trigger_from_file

#: the registered repair methods' names
METHODS = tuple(repair_methods())

__all__ = [
    "METHODS",
    "SUFFIXES",
    "Check",
    "ExportError",
    "OutOfToleranceError",
    "RepairConfig",
    "RepairMethod",
    "RepairProgress",
    "RepairResult",
    "export_repaired",
    "find_classifier",
    "get_method",
    "measure",
    "provenance",
    "prune_neurons",
    "register_method",
    "repair",
    "repair_methods",
    "reversed_trigger_from_findings",
    "reversed_trigger_from_scan",
    "split_data",
    "trigger_from_file",
    "trigger_summary",
    "unlearn",
]
