"""`bdscan repair` end to end on the tiny planted model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.io import load_model
from tests.conftest import TARGET
from tests.synth import accuracy

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_repair_with_original_trigger_removes_backdoor(tiny_bd, tmp_path: Path) -> None:
    out, js = tmp_path / "fixed.safetensors", tmp_path / "repair.json"
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--out", out, "--json", js)
    assert code == 0, output
    rep = json.loads(js.read_text())["repair"]
    assert rep["before"]["asr_original"] > 0.9
    assert rep["after"]["asr_original"] < 0.1
    assert rep["within_tolerance"]
    fixed = load_model(out)
    acc, asr = accuracy(fixed.wrapper, tiny_bd.tiny.data, tiny_bd.tiny.trigger)
    assert asr < 0.2 and acc > 0.8
    assert fixed.wrapper.info.metadata["provenance"]["repaired_from"]["sha256"] == load_model(tiny_bd.model).sha256


def test_repair_runs_scan_and_uses_reversed_trigger(tiny_bd, tmp_path: Path) -> None:
    out, js = tmp_path / "fixed.onnx", tmp_path / "repair.json"
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--budget", "smoke", "--levels", "pixel",
                       "--out", out, "--json", js, "-q")
    assert code == 0, output
    doc = json.loads(js.read_text())
    assert doc["verdict"]["target"] == TARGET and doc["repair"]["trigger"]["target"] == TARGET
    assert doc["repair"]["after"]["asr_original"] < doc["repair"]["before"]["asr_original"]
    assert out.exists()


def test_repair_refusals(tiny_bd, tmp_path: Path) -> None:
    before = tiny_bd.model.read_bytes()
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--out", tiny_bd.model)
    assert code == 2 and "Traceback" not in output and tiny_bd.model.read_bytes() == before
    wrecked = tmp_path / "wrecked.safetensors"
    args = ["repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--lr", "1.0", "--epochs", "3",
            "--tolerance", "0", "--out", wrecked]
    code, output = run(*args)
    assert code == 2 and "--force" in output and not wrecked.exists()
    code, output = run(*args, "--force")
    assert code == 0 and wrecked.exists()
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--out", tmp_path / "m.h5")
    assert code == 2 and not (tmp_path / "m.h5").exists()
