"""Fixtures of the hardening tests: the loader tests' tiny checkpoints of every format, rebuilt for this folder,
a small clean data set fitting them, and the loader tests' hostile pickle corpus (all generated, nothing committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.io.helpers import Checkpoints, Corpus, payloads, write_checkpoints


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """4-class checkpoints: a CNN as safetensors and state dicts, a patch net as TorchScript, .pt2 and ONNX."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return write_checkpoints(tmp_path_factory.mktemp("hardening_ckpts"))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def npz4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 clean-looking 16×16 images of the 4 classes of :func:`ckpts`' models (resized to 32×32 by the loader)."""
    g = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("npz4") / "clean4.npz"
    np.savez(p, x=g.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=np.arange(8) % 4)
    return p


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    marker = tmp_path / "PWNED"
    return Corpus(tmp_path, marker, payloads(tmp_path, marker))
