"""Backdoor detectors behind one protocol (:mod:`bdscan.detect.base`) and a registry.

The package's names are imported on first use (PEP 562), and the registry imports the built-in detectors the
first time it is read (:data:`bdscan.detect.base.BUILTIN_DETECTORS`): so ``bdscan.detect.config`` (budgets,
levels, the default alpha) can be read, by the command line's help for one, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bdscan.detect.base import (
        DEFAULT_DETECTORS,
        DETECTORS,
        CombinedVerdict,
        Detector,
        DetectorResult,
        Evidence,
        ScanSettings,
        combine,
        detectors_in,
        get_detector,
        parse_detectors,
        register_detector,
    )

__all__ = ["DEFAULT_DETECTORS", "DETECTORS", "CombinedVerdict", "Detector", "DetectorResult", "Evidence", "ScanSettings",
           "combine", "detectors_in", "get_detector", "parse_detectors", "register_detector"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("bdscan.detect.base"), name)
    raise AttributeError(f"module 'bdscan.detect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
