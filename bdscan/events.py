"""What a running scan tells its caller: the plan before the long part starts, and callbacks while it runs.

Kept apart from :mod:`bdscan.pipeline` (which re-exports both) so that the command line's console can subclass
:class:`ScanEvents` without importing torch for ``bdscan --help``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bdscan.data import CleanData
    from bdscan.detect.base import ScanSettings
    from bdscan.io import LoadedModel
    from bdscan.models.cost import ScanEstimate


@dataclass(frozen=True)
class ScanPlan:
    """What a scan is about to do, for a caller to show before the long part starts."""

    model: LoadedModel
    data: CleanData
    data_path: Path
    settings: ScanSettings
    detectors: tuple[str, ...]
    configs: Mapping[str, Any]
    precision: str
    #: how long detection should take, from the model's FLOPs and a measured rate (None: short, or unknown)
    estimate: ScanEstimate | None = None


class ScanEvents:
    """Callbacks of a running scan; the default ignores them all. Callers override what they show.

    ``progress`` is called from the detectors' worker threads.
    """

    def planned(self, plan: ScanPlan) -> None:
        """The model and data are loaded and the detectors configured; detection starts next."""

    def progress(self, task: str, done: int, total: int, stats: dict[str, float]) -> None:
        """``task`` (e.g. a Neural Cleanse level) has done ``done`` of ``total`` units."""

    def warning(self, message: str) -> None:
        """Something the user should know (shown even in quiet mode)."""
