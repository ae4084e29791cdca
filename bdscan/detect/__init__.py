"""Backdoor detectors behind one protocol (:mod:`bdscan.detect.base`) and a registry.

Importing this package registers the built-in detectors; a new detector module is imported here.
"""

from bdscan.detect import neural_cleanse  # noqa: F401  (registers "neural-cleanse")
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

from bdscan.detect import mmbd  # noqa: F401  (registers "mm-bd" after Neural Cleanse, so that BDS001 stays first)
