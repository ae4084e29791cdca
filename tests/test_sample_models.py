"""Real bundled sample models, scanned as a user would (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
runner = CliRunner()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_scan_flags_bundled_backdoored_vit(tmp_path: Path) -> None:
    model = SAMPLES / "cifar10_vit_badnets.safetensors"
    if not model.exists():
        pytest.skip("sample model not built")
    js = tmp_path / "scan.json"
    r = runner.invoke(app, ["scan", str(model), "--json", str(js), "--no-activations", "-q"])
    assert r.exit_code == 1, r.output
    doc = json.loads(js.read_text())
    assert doc["verdict"]["status"] == "backdoor"
    assert doc["verdict"]["target"] == doc["verdict"]["true_target"] == 3
    assert doc["model"]["token_grid"]["grid"] == [8, 8]
    assert doc["modes"]["patch"]["anomaly"]["min_label"] == 3
