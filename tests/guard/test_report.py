"""The guard's JSON document and HTML page."""

from __future__ import annotations

import json

from bdscan.data import CleanData
from bdscan.guard import GuardConfig, build_guard
from bdscan.guard.report import guard_document, histogram, render_html
from bdscan.io import load_model


def test_document_and_page(tiny_bd, clean300: CleanData) -> None:
    lm = load_model(tiny_bd.model)
    r = build_guard(lm.wrapper, clean300, lm.original_trigger, GuardConfig(), original=lm.original_trigger)
    doc = guard_document(r, lm, clean300, {"trigger_source": "original"}, None)
    assert doc["schema"] == "bdscan.guard/1" and doc["export"] is None and doc["model"]["sha256"] == lm.sha256
    text = json.dumps(doc, allow_nan=False)  # strict JSON
    assert json.loads(text)["guard"]["threshold"] == doc["guard"]["threshold"]
    page = render_html(doc)
    assert page.count("<svg") == 1 and "threshold" in page and "No guard file was written" in page
    assert "<script" not in page and "<link" not in page


def test_page_of_a_partial_document_and_empty_scores() -> None:
    page = render_html({"schema": "bdscan.guard/1", "guard": {"reached": False, "reason": "too few images"}})
    assert "cannot reach" in page and "too few images" in page and "No scores were recorded" in page
    assert histogram({}, None) is None
    svg = histogram({"clean": [0.0, 0.0, 0.0], "stamped": [5.0]}, 1.0)
    assert svg is not None and "threshold 1" in svg
