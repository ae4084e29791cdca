"""The detector plug-in point: a detector defined in one place and registered shows up in `bdscan detectors`,
runs through the pipeline beside Neural Cleanse, and its section reaches the JSON, SARIF and HTML from what it
returns; the combined verdict follows the documented rule."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from bdscan.detect import DETECTORS, Detector, Evidence, ScanSettings, combine, register_detector
from bdscan.pipeline import Outputs, ScanRequest, run_scan


@dataclass(frozen=True)
class MeanScoreConfig:
    suspect: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MeanScoreResult:
    evidence: Evidence
    config: MeanScoreConfig
    scores: list[float]
    seconds: float = 0.0

    def section(self, class_names: list[str], example: torch.Tensor | None, original: Any | None) -> dict[str, Any]:
        return {"scores": [{"label": k, "score": s} for k, s in enumerate(self.scores)]}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean_score": np.array(self.scores, dtype=np.float32)}

    def images(self, example: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield "mean-score/bar.png", torch.linspace(0, 1, 16).repeat(4, 1)


class MeanScore(Detector):
    """A toy detector: the class with the highest mean softmax over clean images is 'suspected' (tests only)."""

    name = "mean-score"
    title = "Mean score (test)"
    summary = "the class with the highest mean softmax on clean images (a test plug-in)"
    json_key = "mean_score"
    sarif_rule: ClassVar[dict[str, Any]] = {"id": "BDS901", "name": "mean-score", "shortDescription": {"text": "test rule"},
                                            "defaultConfiguration": {"level": "error"}}

    def configure(self, settings: ScanSettings) -> MeanScoreConfig:
        return MeanScoreConfig()

    def detect(self, model, data, config, progress=None) -> MeanScoreResult:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            p = torch.softmax(model(data.x), dim=1).mean(0)
        k = int(p.argmax())
        status = "backdoor" if config.suspect else "clean"
        return MeanScoreResult(Evidence(self.name, status, k, float(p[k]), 0.5, f"Class {k} has the highest mean score."),
                               config, [float(v) for v in p])


@pytest.fixture
def plugin() -> Iterator[MeanScore]:
    register_detector(MeanScore)
    try:
        yield DETECTORS["mean-score"]  # type: ignore[misc]
    finally:
        DETECTORS.pop("mean-score", None)


def _scan(tiny_bd, tmp_path: Path, detectors: tuple[str, ...]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    out = Outputs(folder=tmp_path / "scan", sarif=tmp_path / "scan.sarif", html=tmp_path / "report.html")
    req = ScanRequest(model=tiny_bd.model, data=tiny_bd.data, detectors=detectors, activations=False, outputs=out,
                      settings=ScanSettings(budget="smoke", steps=2, levels=("pixel",)))
    return run_scan(req).doc


def test_a_registered_detector_reaches_every_output(plugin, tiny_bd, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bdscan.cli import app

    listed = CliRunner().invoke(app, ["detectors"]).output
    assert "mean-score (weight 1): the class with the highest mean softmax" in listed

    doc = _scan(tiny_bd, tmp_path, ("mean-score", "neural-cleanse"))
    sec = doc["mean_score"]
    assert sec["config"] == {"suspect": True} and sec["evidence"]["status"] == "backdoor"
    assert len(sec["scores"]) == doc["model"]["num_classes"] and "modes" in doc  # Neural Cleanse's section beside it
    # the verdict rests on the first detector (in --detectors order) that suspects a backdoor
    assert doc["verdict"]["detector"] == "mean-score" and doc["verdict"]["target"] == sec["evidence"]["target"]
    saved = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert saved["mean_score"] == sec
    with np.load(tmp_path / "scan" / "triggers.npz") as z:
        assert "mean_score" in z.files and "pixel_mask" in z.files
    assert (tmp_path / "scan" / "mean-score" / "bar.png").is_file()
    sarif = json.loads((tmp_path / "scan.sarif").read_text())["runs"][0]
    rules = [r["id"] for r in sarif["tool"]["driver"]["rules"]]
    assert rules[0] == "BDS001" and {"BDS901", "BDS002", "BDS003"} <= set(rules)
    mine = [r for r in sarif["results"] if r["ruleId"] == "BDS901"]
    assert len(mine) == 1 and mine[0]["ruleIndex"] == rules.index("BDS901")
    html = (tmp_path / "report.html").read_text()
    assert 'id="detectors"' in html and "Mean score (test)" in html and "has the highest mean score" in html


def test_the_document_of_neural_cleanse_alone_names_no_detector(tiny_bd, tmp_path: Path) -> None:
    doc = _scan(tiny_bd, tmp_path, ("neural-cleanse",))
    assert "detector" not in doc["verdict"] and "mean_score" not in doc
    html = (tmp_path / "report.html").read_text()
    assert 'id="detectors"' not in html


def _ev(name: str, status: str, target: int | None = None) -> Evidence:
    return Evidence(name, status, target, 1.0, 2.0, f"{name} says {status}")


def test_combine_rule() -> None:
    v = combine([_ev("a", "clean"), _ev("b", "backdoor", 3), _ev("c", "backdoor", 5)])
    assert (v.status, v.target, v.decided_by.detector) == ("backdoor", 3, "b")
    v = combine([_ev("a", "inconclusive"), _ev("b", "clean")])
    assert (v.status, v.target, v.decided_by.detector) == ("clean", None, "b")
    v = combine([_ev("a", "inconclusive")])
    assert v.status == "inconclusive" and v.decided_by.detector == "a"
    assert combine([]).status == "inconclusive"
    with pytest.raises(ValueError):
        _ev("a", "maybe")
