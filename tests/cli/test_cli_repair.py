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


def test_prune_that_leaves_the_backdoor_fails_unless_forced(tiny_bd, tmp_path: Path) -> None:
    """Issue #27 item 6: pruning against a trigger that does nothing prunes nothing; the original trigger still works,
    so the repair fails, exits 2 and writes no model; with --force it writes one, marked as forced."""
    import numpy as np

    mask = np.zeros((16, 16), np.float32)
    mask[0, 0] = 1.0  # one pixel: sends no image anywhere, so pruning stops at once
    np.savez(tmp_path / "nothing.npz", mask=mask, pattern=np.full((3, 16, 16), 0.5, np.float32), target=np.int64(TARGET))
    out, js, page = tmp_path / "pruned.safetensors", tmp_path / "repair.json", tmp_path / "repair.html"
    args = ["repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", tmp_path / "nothing.npz", "--method", "prune",
            "--out", out, "--json", js, "--report", page]
    code, output = run(*args)
    assert code == 2 and not out.exists(), output
    assert "the repair failed" in output and "still sends 100.0 %" in output and "--force" in output
    rep = json.loads(js.read_text())["repair"]  # the measurements are kept even though the model is not
    assert rep["passed"] is False and rep["backdoor_removed"] is False and rep["after"]["asr_original"] == 1.0
    assert rep["export"] == {"file": str(out), "written": False, "forced": False, "refused": True}
    assert "FAILED" in page.read_text() and "was not written" in page.read_text()
    code, output = run(*args, "--force")
    assert code == 0 and out.exists(), output
    assert "--force" in output and "mark it as forced" in output.replace("\n", " ")
    rep = json.loads(js.read_text())["repair"]
    assert rep["export"]["forced"] is True and rep["export"]["written"] is True
    html = page.read_text()
    assert "FORCED EXPORT" in html and "do not treat it as repaired" in html
    assert load_model(out).wrapper.info.metadata["provenance"]["forced"] is True


def test_repair_reports_intervals_and_checks_on_the_console(tiny_bd, tmp_path: Path) -> None:
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--out", tmp_path / "f.safetensors")
    assert code == 0, output
    assert "95 % intervals" in output and "✓ clean accuracy: Passes" in output and "✓ attack success: Passes" in output
    assert "PASSED" in output and f"wrote {tmp_path / 'f.safetensors'}" in output
    code, output = run("repair", tiny_bd.model, "--data", tiny_bd.data, "--trigger", "original", "--max-asr", "101",
                       "--out", tmp_path / "g.safetensors")
    assert code == 2 and "--max-asr 101" in output
