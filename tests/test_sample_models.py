"""The bundled demo and its clean twin, scanned as the README's first command scans them (slow: about a minute
each on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.lab.samples import DEMO, DEMO_TWIN

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
runner = CliRunner()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_scan_flags_the_bundled_demo_with_its_true_target(tmp_path: Path) -> None:
    js = tmp_path / "scan.json"
    r = runner.invoke(app, ["scan", str(SAMPLES / DEMO.file), "--json", str(js), "--no-activations", "-q"])
    assert r.exit_code == 1, r.output
    doc = json.loads(js.read_text())
    assert doc["verdict"]["status"] == "backdoor"
    assert doc["verdict"]["true_target"] is not None and doc["verdict"]["target"] == doc["verdict"]["true_target"]
    assert doc["model"]["token_grid"]["grid"] == [8, 8]  # a transformer: the patch level ran on its tokens
    assert doc["verdict"]["p_value"] <= doc["config"]["alpha"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_scan_passes_the_demo_s_clean_twin(tmp_path: Path) -> None:
    twin = DEMO_TWIN
    js = tmp_path / "scan.json"
    r = runner.invoke(app, ["scan", str(SAMPLES / twin.file), "--json", str(js), "--no-activations", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["verdict"]["status"] == "clean"
