"""Fixtures for the loader tests (helpers live in :mod:`tests.io.helpers`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.io.helpers import Checkpoints, Corpus, payloads, write_checkpoints


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    with torch.no_grad():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return write_checkpoints(tmp_path_factory.mktemp("ckpts"))
        finally:
            torch.set_num_threads(n)


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    marker = tmp_path / "PWNED"
    return Corpus(tmp_path, marker, payloads(tmp_path, marker))


