"""Shared fixtures: tiny models trained inside the test session on synthetic data (no files, no network)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bdscan.io import save_safetensors
from tests.synth import Tiny, square_trigger, synthetic, train_tiny

# One thread: training results of the tiny models (and so the tests) must not depend on the core count.
torch.set_num_threads(1)

CLASSES = 10
SIZE = 16
TARGET = 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test on one thread (a test that changes it gets it restored)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class TinyFiles:
    tiny: Tiny
    model: Path
    data: Path


def save_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    np.savez(path, x=(x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), y=y.numpy())
    return path


@pytest.fixture(scope="session")
def tiny_bd(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """A tiny 10-class CNN with a planted 3×3 white-square backdoor to class 3, saved as safetensors."""
    d = tmp_path_factory.mktemp("tiny_bd")
    t = train_tiny("bdscan_cnn6", CLASSES, SIZE, square_trigger(SIZE, TARGET), epochs=8, n=40 * CLASSES)
    save_safetensors(t.wrapper, d / "bd.safetensors", trigger=t.trigger)
    return TinyFiles(t, d / "bd.safetensors", save_npz(d / "clean.npz", t.data.x, t.data.y))


@pytest.fixture(scope="session")
def tiny_clean(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """The clean twin of :func:`tiny_bd`."""
    d = tmp_path_factory.mktemp("tiny_clean")
    t = train_tiny("bdscan_cnn6", CLASSES, SIZE, None, epochs=8, n=40 * CLASSES)
    save_safetensors(t.wrapper, d / "clean.safetensors")
    return TinyFiles(t, d / "clean.safetensors", save_npz(d / "clean.npz", t.data.x, t.data.y))


@pytest.fixture(scope="session")
def synthetic_data() -> tuple[torch.Tensor, torch.Tensor]:
    d = synthetic(100, CLASSES, SIZE, 7)
    return d.x, d.y
