"""Fixtures of the guard tests: the tiny planted CNN (``tiny_bd`` from tests/conftest.py), a tiny planted ViT, a
held-out clean set larger than the training fixtures' (the guard splits its clean images three ways), and one
smoke scan of the CNN written as a real scan folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bdscan.data import CleanData
from bdscan.detect import ScanSettings
from bdscan.io import load_model, save_safetensors
from bdscan.pipeline import Outputs, scan_loaded, write_scan_outputs
from tests.conftest import CLASSES, SIZE, TARGET, TinyFiles, save_npz
from tests.synth import square_trigger, synthetic, train_tiny


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def clean300() -> CleanData:
    """300 clean synthetic images (30 per class) that no tiny model was trained on."""
    return synthetic(300, CLASSES, SIZE, 11)


@pytest.fixture(scope="session")
def clean300_npz(clean300: CleanData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("clean300") / "clean300.npz", clean300.x, clean300.y)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """A tiny 10-class ViT (4×4 patches on 16×16 images: a 4×4 token grid) with a planted patch-aligned 4×4
    white square to class 3, saved as safetensors (as tests/detect trains its tiny ViT)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny_vit")
    t = train_tiny("bdscan_vit", CLASSES, SIZE, square_trigger(SIZE, TARGET, box=4, row=12, col=12), epochs=8, n=40 * CLASSES)
    save_safetensors(t.wrapper, d / "vit.safetensors", trigger=t.trigger)
    return TinyFiles(t, d / "vit.safetensors", save_npz(d / "clean.npz", t.data.x, t.data.y))


@dataclass
class Scanned:
    model: Path
    out: Path


@pytest.fixture(scope="session")
def cnn_scan(tiny_bd, tmp_path_factory: pytest.TempPathFactory) -> Scanned:  # type: ignore[no-untyped-def]
    """A pixel-level smoke scan of the tiny CNN, written as ``bdscan scan --out DIR`` writes it."""
    torch.set_num_threads(1)
    lm = load_model(tiny_bd.model)
    data = tiny_bd.tiny.data
    doc, det = scan_loaded(lm, data, Path("data"), ScanSettings(budget="smoke", levels=("pixel",), steps=20), activations=False)
    out = tmp_path_factory.mktemp("scan")
    write_scan_outputs(doc, det, data, Outputs(folder=out), str(tiny_bd.model))
    return Scanned(tiny_bd.model, out)
