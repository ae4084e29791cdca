"""Removing a backdoor: unlearning (fine-tuning with the trigger stamped on images that keep their true labels)
or pruning (zeroing the penultimate neurons the trigger excites), as in Neural Cleanse (Wang et al. 2019,
section VI), then exporting the repaired model with a provenance record.

:mod:`bdscan.repair.config` holds the configuration and the method table, :mod:`bdscan.repair.core` what every
method shares; each method is one module that
registers itself (:mod:`~bdscan.repair.unlearn`, :mod:`~bdscan.repair.prune`) and is named in
:data:`bdscan.repair.config.BUILTIN_METHODS`. The package's names are imported on first use (PEP 562), so that
:mod:`bdscan.repair.config` can be read without importing torch.

Typical use (what ``bdscan repair`` does)::

    lm = load_model(path)
    trigger = reversed_trigger_from_scan(scan_dir, expected_sha256=lm.sha256)
    result = repair(lm.wrapper, data, trigger, RepairConfig(), original=lm.original_trigger)
    export_repaired(result, out, lm.path, lm.sha256, {"scan": str(scan_dir)})
    doc["repair"] = result.to_dict()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bdscan.repair.checks import Check, measure
    from bdscan.repair.config import RepairConfig, RepairMethod, RepairProgress, get_method, register_method, repair_methods
    from bdscan.repair.core import RepairResult, repair, split_data, trigger_summary
    from bdscan.repair.export import SUFFIXES, ExportError, OutOfToleranceError, export_repaired, provenance
    from bdscan.repair.prune import find_classifier, prune_neurons
    from bdscan.repair.triggers import (
        reversed_trigger_from_detection,
        reversed_trigger_from_findings,
        reversed_trigger_from_scan,
        trigger_from_file,
    )
    from bdscan.repair.unlearn import unlearn

#: where each public name lives
_WHERE = {
    "Check": "checks", "measure": "checks",
    "RepairConfig": "config", "RepairMethod": "config", "RepairProgress": "config", "get_method": "config",
    "register_method": "config", "repair_methods": "config",
    "RepairResult": "core", "repair": "core", "split_data": "core", "trigger_summary": "core",
    "SUFFIXES": "export", "ExportError": "export", "OutOfToleranceError": "export", "export_repaired": "export",
    "provenance": "export",
    "find_classifier": "prune", "prune_neurons": "prune",
    "reversed_trigger_from_detection": "triggers", "reversed_trigger_from_findings": "triggers",
    "reversed_trigger_from_scan": "triggers",
    "trigger_from_file": "triggers",
    "unlearn": "unlearn",
}

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
    "reversed_trigger_from_detection",
    "reversed_trigger_from_findings",
    "reversed_trigger_from_scan",
    "split_data",
    "trigger_from_file",
    "trigger_summary",
    "unlearn",
]


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered repair methods' names
        from bdscan.repair.config import repair_methods

        return tuple(repair_methods())
    if name in _WHERE:
        return getattr(importlib.import_module(f"bdscan.repair.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'bdscan.repair' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
