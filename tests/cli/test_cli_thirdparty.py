"""A third-party model as an auditor gets it: TorchScript, its own 0-255 input scaling, a softmax at its end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.io import LoadOptions, load_model
from tests.conftest import SIZE, TARGET

runner = CliRunner()


class ThirdParty(nn.Module):
    """Takes raw 0-255 pixels, normalises itself, returns probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((x / 255.0 - 0.5) / 0.25), dim=1)


def export(tiny_bd, tmp_path: Path) -> Path:
    m = ThirdParty(tiny_bd.tiny.wrapper.net).eval()
    path = tmp_path / "vendor_model.pt"
    torch.jit.trace(m, torch.rand(2, 3, SIZE, SIZE) * 255).save(str(path))
    return path


def test_softmax_output_detected_and_scaled_input(tiny_bd, tmp_path: Path) -> None:
    path = export(tiny_bd, tmp_path)
    lm = load_model(path, LoadOptions(input_size=(3, SIZE, SIZE), scale=255.0))
    assert lm.format == "torchscript" and lm.wrapper.info.output == "probs"
    assert any("softmax" in n for n in lm.notes)
    x = tiny_bd.tiny.data.x[:8]
    # the wrapper feeds [0, 1] images as 0-255 and returns log-probabilities: same argmax as the original
    assert torch.equal(lm.wrapper(x).argmax(1), tiny_bd.tiny.wrapper(x).argmax(1))


def test_scan_third_party_model_finds_backdoor(tiny_bd, tmp_path: Path) -> None:
    path, js = export(tiny_bd, tmp_path), tmp_path / "scan.json"
    r = runner.invoke(app, ["scan", str(path), "--data", str(tiny_bd.data), "--input-size", f"3,{SIZE},{SIZE}", "--scale", "255",
                            "--budget", "smoke", "--steps", "20", "--levels", "pixel", "--json", str(js), "-q"])
    assert r.exit_code == 1, r.output
    doc = json.loads(js.read_text())
    assert doc["model"]["format"] == "torchscript" and doc["model"]["output"] == "probs"
    assert doc["verdict"]["target"] == TARGET
