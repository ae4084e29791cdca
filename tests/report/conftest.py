"""Fixtures of the report tests: real scan documents of the session's tiny models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import TARGET
from tests.report.scans import Scanned, as_flagged, scanned


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flagged(tiny_bd) -> Scanned:  # type: ignore[no-untyped-def]
    """The backdoored tiny CNN, scanned at both levels with activation statistics."""
    return scanned(tiny_bd.model, tiny_bd.tiny.data)


@pytest.fixture(scope="session")
def flagged_doc(flagged: Scanned) -> dict[str, Any]:
    """Its document, with a backdoor verdict naming the planted target (edited in if the smoke scan missed it)."""
    return as_flagged(flagged.doc, TARGET)


@pytest.fixture(scope="session")
def pixel_only_doc(tiny_clean) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The clean tiny CNN, scanned at the pixel level only, without activation statistics (no original trigger)."""
    return scanned(tiny_clean.model, tiny_clean.tiny.data, ("pixel",), activations=False).doc
