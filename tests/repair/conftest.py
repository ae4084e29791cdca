"""Fixtures of the repair tests: one smoke scan of the planted tiny CNN (written as a real scan folder) and one
unlearning result, shared by the tests of this folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bdscan.detect import ScanSettings
from bdscan.detect.scan import ScanFindings
from bdscan.io import load_model
from bdscan.io.base import LoadedModel
from bdscan.pipeline import Outputs, scan_loaded, write_scan_outputs
from bdscan.repair import RepairConfig, RepairResult, repair


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@dataclass
class Scanned:
    lm: LoadedModel
    findings: ScanFindings
    out: Path


@pytest.fixture(scope="session")
def smoke_scan(tiny_bd, tmp_path_factory: pytest.TempPathFactory) -> Scanned:  # type: ignore[no-untyped-def]
    """The backdoored tiny CNN loaded from its file, scanned at the pixel level with a smoke budget, written to a
    scan folder exactly as ``bdscan scan --out DIR`` writes it."""
    torch.set_num_threads(1)
    lm = load_model(tiny_bd.model)
    data = tiny_bd.tiny.data
    doc, det = scan_loaded(lm, data, Path("data"), ScanSettings(budget="smoke", levels=("pixel",), steps=20), activations=False)
    out = tmp_path_factory.mktemp("scan")
    write_scan_outputs(doc, det, data, Outputs(folder=out), str(tiny_bd.model))
    return Scanned(lm, det.results["neural-cleanse"].findings, out)


@pytest.fixture(scope="session")
def unlearned(tiny_bd) -> RepairResult:  # type: ignore[no-untyped-def]
    """The tiny CNN unlearned with its original trigger (default configuration)."""
    torch.set_num_threads(1)
    t = tiny_bd.tiny
    return repair(t.wrapper, t.data, t.trigger, RepairConfig(), original=t.trigger)
