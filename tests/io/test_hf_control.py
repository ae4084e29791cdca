"""Positive controls in the Hugging Face layout (bdscan.lab.hf): the scan flags the backdoored folder with its target
and passes the clean one; `bdscan repair` on the folder writes a folder transformers loads (issue #26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.io import load_model
from bdscan.lab.attacks import AttackConfig
from tests.conftest import save_npz
from tests.synth import synthetic

transformers = pytest.importorskip("transformers")
runner = CliRunner()
CLASSES, SIZE, TARGET = 10, 16, 2  # 10 classes: the calibrated test has little power with fewer
SCAN = ["--budget", "smoke", "--steps", "20", "--levels", "pixel", "--no-activations", "--fail-on", "never"]


@pytest.fixture(scope="module")
def controls(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from bdscan.lab.hf import train_hf_control

    d = tmp_path_factory.mktemp("hf_controls")
    train = synthetic(40 * CLASSES, CLASSES, SIZE, seed=0)
    attack = AttackConfig("badnets", TARGET, {"size": 3, "position": "bottom-right", "margin": 1})
    bd = train_hf_control(train, d / "hf_bd", attack, epochs=8)
    clean = train_hf_control(train, d / "hf_clean", None, epochs=8)
    held = synthetic(20 * CLASSES, CLASSES, SIZE, seed=1)
    return bd, clean, save_npz(d / "clean.npz", held.x, held.y)


def _scan(folder: Path, data: Path, tmp: Path) -> dict:  # type: ignore[type-arg]
    js = tmp / f"{folder.name}.json"
    r = runner.invoke(app, ["scan", str(folder), "--data", str(data), "--json", str(js), *SCAN])
    assert r.exit_code == 0, r.output
    return json.loads(js.read_text())


def test_backdoored_folder_is_flagged_and_clean_one_passes(controls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bd, clean, data = controls
    assert (bd.folder / "config.json").is_file() and (bd.folder / "preprocessor_config.json").is_file()
    assert load_model(bd.folder).original_trigger is not None
    v = _scan(bd.folder, data, tmp_path)["verdict"]
    assert v["status"] == "backdoor" and v["target"] == TARGET
    assert _scan(clean.folder, data, tmp_path)["verdict"]["status"] != "backdoor"


def test_repair_round_trip_writes_a_folder_transformers_loads(controls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bd, _, data = controls
    out = tmp_path / "repaired"
    r = runner.invoke(app, ["repair", str(bd.folder), "--data", str(data), "--trigger", "original", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "preprocessor_config.json", "model.safetensors", "bdscan.json"):
        assert (out / name).is_file(), name
    model = transformers.AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True)
    assert model.config.num_labels == CLASSES
    lm = load_model(out)
    assert lm.format == "hf-folder" and lm.wrapper.token_grid is not None
    assert "provenance" in json.loads((out / "bdscan.json").read_text())["extra"]
