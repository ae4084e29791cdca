"""`bdscan guard` and `bdscan guard-check` end to end on the tiny planted CNN and ViT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.data import CleanData
from bdscan.io import load_model
from tests.conftest import TARGET

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def _npz(path: Path, x: torch.Tensor, y: torch.Tensor | None = None) -> Path:
    arrays = {"x": (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)}
    if y is not None:
        arrays["y"] = y.numpy()
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def cnn_guard(tiny_bd, clean300_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``bdscan guard --trigger original`` on the tiny CNN: (guard.onnx, guard.json, guard.html)."""
    d = tmp_path_factory.mktemp("cnn_guard")
    g, js, html = d / "guard.onnx", d / "guard.json", d / "guard.html"
    code, output = run("guard", tiny_bd.model, "--data", clean300_npz, "--trigger", "original", "--out", g, "--json", js, "--report", html)
    assert code == 0, output
    return g, js, html


def test_guard_writes_a_checked_guard_and_its_reports(tiny_bd, cnn_guard: tuple[Path, Path, Path]) -> None:
    g, js, html = cnn_guard
    doc = json.loads(js.read_text())
    assert doc["schema"] == "bdscan.guard/1" and doc["model"]["sha256"] == load_model(tiny_bd.model).sha256
    gd = doc["guard"]
    assert gd["reached"] and gd["fpr_requested"] == 0.05 and gd["trigger"]["kind"] == "badnets"
    assert gd["test"]["stamped"]["rate"] >= 0.9 and gd["test"]["stamped_original"]["rate"] >= 0.9
    assert gd["test"]["clean"]["rate"] <= 0.15
    assert doc["export"]["file"] == "guard.onnx" and doc["export"]["max_logit_difference"] <= 1e-4
    page = html.read_text()
    assert "<svg" in page and "threshold" in page and "<script" not in page and "http://" not in page.replace("http://www.w3.org", "")
    assert [o.name for o in ort.InferenceSession(g.read_bytes(), providers=["CPUExecutionProvider"]).get_outputs()] == [
        "logits", "suspicion", "flagged"]


def test_guard_check_exit_codes_and_report(tiny_bd, cnn_guard: tuple[Path, Path, Path], clean300: CleanData, tmp_path: Path) -> None:
    g, js, _ = cnn_guard
    x = clean300.x[:20]
    trig = tiny_bd.tiny.trigger
    stamped = _npz(tmp_path / "stamped.npz", trig.stamp(x[clean300.y[:20] != TARGET]))
    code, output = run("guard-check", g, stamped, "--json", tmp_path / "check.json")
    assert code == 1, output
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["flagged"] >= 0.9 * doc["images"] and "flagged: #0" in output
    # clean inputs below the threshold pass with exit 0
    threshold = json.loads(js.read_text())["guard"]["threshold"]
    clean = _npz(tmp_path / "clean.npz", x)
    code, _ = run("guard-check", g, clean, "--json", tmp_path / "c.json", "-q")
    rows = json.loads((tmp_path / "c.json").read_text())["inputs"]
    assert code == (1 if any(r["suspicion"] > threshold for r in rows) else 0)
    calm = [i for i, r in enumerate(rows) if r["suspicion"] < threshold - 1e-3]
    code, output = run("guard-check", g, _npz(tmp_path / "calm.npz", x[calm]))
    assert code == 0 and f"0 of {len(calm)} inputs flagged" in output


def test_guard_check_on_a_folder_and_with_the_original_trigger(tiny_bd, cnn_guard: tuple[Path, Path, Path],
                                                               clean300: CleanData, tmp_path: Path) -> None:
    g = cnn_guard[0]
    folder = tmp_path / "imgs"
    folder.mkdir()
    trig = tiny_bd.tiny.trigger
    for i, img in enumerate(trig.stamp(clean300.x[:4])):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    code, output = run("guard-check", g, folder)
    assert code == 1 and "img0.png" in output
    labelled = _npz(tmp_path / "lab.npz", clean300.x[:40], clean300.y[:40])
    code, output = run("guard-check", g, labelled, "--trigger", "original", "--model", tiny_bd.model, "--json", tmp_path / "o.json")
    assert code in (0, 1), output
    st = json.loads((tmp_path / "o.json").read_text())["stamped"]
    assert st["images"] == int((clean300.y[:40] != TARGET).sum()) and st["rate"] >= 0.9 and "original" not in output.split("stamped")[0]


def test_guard_check_refusals(tiny_bd, tiny_clean, cnn_guard: tuple[Path, Path, Path], tmp_path: Path) -> None:
    g = cnn_guard[0]
    code, output = run("guard-check", g, tiny_bd.data, "--trigger", "original")
    assert code == 2 and "--model" in output
    code, output = run("guard-check", g, tiny_bd.data, "--trigger", "original", "--model", tiny_clean.model)
    assert code == 2 and "guards another model" in output
    code, output = run("guard-check", tiny_bd.model, tiny_bd.data)
    assert code == 2 and "Traceback" not in output
    code, output = run("guard-check", g, tmp_path / "missing.npz")
    assert code == 3
    before = g.read_bytes()
    code, output = run("guard-check", g, tiny_bd.data, "--json", g)
    assert code == 2 and g.read_bytes() == before


def test_guard_refusals_are_one_line_and_leave_nothing(tiny_bd, clean300_npz: Path, tmp_path: Path) -> None:
    before = tiny_bd.model.read_bytes()
    base = ["guard", tiny_bd.model, "--data", clean300_npz, "--trigger", "original"]
    code, output = run(*base, "--out", tiny_bd.model)
    assert code == 2 and "Traceback" not in output and tiny_bd.model.read_bytes() == before
    code, output = run(*base, "--out", tmp_path / "g.safetensors")
    assert code == 2 and ".onnx or .pt" in output
    code, output = run(*base, "--out", tmp_path / "g.onnx", "--json", tmp_path / "g.onnx")
    assert code == 2 and "same file" in output
    code, output = run(*base, "--out", tmp_path / "g.onnx", "--fpr", "2")
    assert code == 2 and "--fpr" in output
    code, output = run(*base, "--out", tmp_path / "g.onnx", "--layer", "tokens")
    assert code == 2 and "no token sequence" in output
    assert list(tmp_path.iterdir()) == []


def test_a_guard_that_cannot_reach_its_rate_exits_2_with_its_report(tiny_bd, clean300_npz: Path, tmp_path: Path) -> None:
    g, js = tmp_path / "g.onnx", tmp_path / "g.json"
    code, output = run("guard", tiny_bd.model, "--data", clean300_npz, "--trigger", "original", "--fpr", "0.002",
                       "--out", g, "--json", js)
    assert code == 2 and "calibration images" in output and "--fpr" in output
    assert not g.exists() and json.loads(js.read_text())["guard"]["reached"] is False


def test_guard_from_a_scan_folder_and_from_a_scan_it_runs(tiny_bd, cnn_scan, clean300_npz: Path, tmp_path: Path) -> None:
    code, output = run("guard", tiny_bd.model, "--data", clean300_npz, "--scan", cnn_scan.out, "--out", tmp_path / "a.pt",
                       "--json", tmp_path / "a.json", "-q")
    assert code == 0, output
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["guard"]["trigger"]["kind"] == "reversed-pixel" and doc["guard"]["trigger"]["target"] == TARGET
    assert doc["guard"]["test"]["stamped_original"]["rate"] is not None
    code, output = run("guard", tiny_bd.model, "--data", clean300_npz, "--budget", "smoke", "--levels", "pixel",
                       "--out", tmp_path / "b.onnx", "--json", tmp_path / "b.json", "-q")
    assert code == 0, output
    src = json.loads((tmp_path / "b.json").read_text())["source"]
    assert src["scan_verdict"] == "backdoor" and src["scan_target"] == TARGET


def test_guard_on_a_tiny_vit(tiny_vit, clean300: CleanData, clean300_npz: Path, tmp_path: Path) -> None:
    g = tmp_path / "vit.onnx"
    code, output = run("guard", tiny_vit.model, "--data", clean300_npz, "--trigger", "original", "--out", g, "--json", tmp_path / "v.json")
    assert code == 0, output
    gd = json.loads((tmp_path / "v.json").read_text())["guard"]
    assert gd["layer"]["kind"] == "penultimate" and gd["test"]["stamped"]["rate"] >= 0.9
    trig = tiny_vit.tiny.trigger
    keep = clean300.y[:30] != TARGET
    code, output = run("guard-check", g, _npz(tmp_path / "s.npz", trig.stamp(clean300.x[:30][keep])))
    assert code == 1
    code, output = run("guard", tiny_vit.model, "--data", clean300_npz, "--trigger", "original", "--layer", "tokens",
                       "--out", tmp_path / "tok.pt", "--json", tmp_path / "t.json", "-q")
    assert code == 0, output
    assert json.loads((tmp_path / "t.json").read_text())["guard"]["layer"] == {"kind": "tokens", "modules": ["norm"], "width": 32,
                                                                              "reduce": "tokens"}


def test_a_scan_without_suspect_needs_a_label(tiny_bd, cnn_scan, clean300_npz: Path, tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    shutil.copytree(cnn_scan.out, scan)
    doc = json.loads((scan / "scan.json").read_text())
    doc["verdict"]["status"] = "clean"
    (scan / "scan.json").write_text(json.dumps(doc))
    base = ["guard", tiny_bd.model, "--data", clean300_npz, "--scan", scan, "-q"]
    code, output = run(*base, "--out", tmp_path / "g.onnx")
    assert code == 2 and "no backdoor suspect" in output and "--label" in output and not (tmp_path / "g.onnx").exists()
    code, output = run(*base, "--label", str(TARGET), "--out", tmp_path / "g.onnx")
    assert code == 0, output


def test_a_torchscript_model_cannot_be_guarded(tiny_bd, clean300_npz: Path, tmp_path: Path) -> None:
    from bdscan.io import writer_for

    ts = tmp_path / "model.pt"
    writer_for(ts).write(tiny_bd.tiny.wrapper, ts)
    trig = tiny_bd.tiny.trigger
    np.savez(tmp_path / "trigger.npz", mask=trig.mask.numpy(), pattern=trig.pattern.numpy(), target=np.int64(TARGET))
    code, output = run("guard", ts, "--data", clean300_npz, "--trigger", tmp_path / "trigger.npz", "--out", tmp_path / "g.onnx")
    assert code == 2 and "TorchScript" in output and not (tmp_path / "g.onnx").exists()
