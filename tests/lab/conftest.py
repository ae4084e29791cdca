"""Fixtures of the lab's tests (synthetic data, a tiny trained cnn6); no files, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.lab.helpers import make_synthetic


@pytest.fixture(scope="session")
def lab_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data") / "synth_16.npz", groups=True)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lab_tiny(lab_npz: Path):  # type: ignore[no-untyped-def]
    """A small cnn6 trained for a few steps on the synthetic data, and the data."""
    from bdscan.lab.labdata import load_lab_data
    from bdscan.lab.train import TrainConfig, train_clean

    torch.set_num_threads(1)
    res = train_clean("bdscan_cnn6", lab_npz, TrainConfig(epochs=3, batch_size=32, lr=3e-3, test_subsample=None))
    return res.wrapper, load_lab_data(lab_npz)
