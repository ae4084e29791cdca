"""The scan document's verdict in schema bdscan.scan/3 (docs/scan-json.md, docs/verdict.md): each detector's
evidence beside the combined verdict, the rule, alpha, the corrected p-value and the deciding test; `bdscan report`
renders it, re-derives the same evidence from the JSON alone, and still reads schema-1 documents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.console import verdict_line
from bdscan.detect import DETECTORS, ScanSettings
from bdscan.detect.base import DEFAULT_ALPHA
from bdscan.pipeline import Outputs, ScanRequest, run_scan
from tests.conftest import TARGET

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden"


@pytest.fixture(scope="module")
def scanned(tiny_bd, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Any]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("verdict") / "scan"
    req = ScanRequest(model=tiny_bd.model, data=tiny_bd.data, activations=False, outputs=Outputs(folder=folder),
                      settings=ScanSettings(budget="smoke", seed=0))
    out = run_scan(req)
    return out.doc, folder, out.detection


def test_schema_3_verdict_keeps_each_detectors_evidence_beside_it(scanned) -> None:  # type: ignore[no-untyped-def]
    doc, _, det = scanned
    v = doc["verdict"]
    assert doc["schema"] == "bdscan.scan/3"
    assert v["rule"] == "weighted-bonferroni-min-p" and v["alpha"] == DEFAULT_ALPHA and v["alpha_provisional"] is False
    assert v["calibrated"] is True and v["tests"] == 1 and v["decided_by"]["detector"] == "neural-cleanse"
    assert v["decided_by"]["test"] == v["basis"] and v["p_value"] == v["decided_by"]["p_value"]
    # the default runs neuron noise too; on this CNN (no LayerNorm) it is "not applicable": shown, not a test
    assert [e["detector"] for e in v["evidence"]] == ["neural-cleanse", "neuron-noise"]
    assert v["evidence"][1]["status"] == "inconclusive" and v["evidence"][1]["p_value"] is None
    assert v["factors"] == {"neural-cleanse": 1.0}
    ev = v["evidence"][0]
    assert set(ev) >= {"status", "target", "score", "p_value", "reason"} and ev["p_value"] == v["p_value"]
    # the planted backdoor is found, and the p-value is what the verdict rests on
    assert (v["status"], v["target"]) == ("backdoor", TARGET) and v["p_value"] <= v["alpha"]
    levels = {m: s["anomaly"] for m, s in doc["modes"].items()}
    assert set(levels) == {"pixel", "patch"}
    assert v["p_value"] == pytest.approx(min(1.0, 2 * min(a["p_value"] for a in levels.values())), rel=1e-3)
    for a in levels.values():  # the anomaly index stays, for continuity; the test behind the p-value is recorded
        assert {"anomaly_index", "index_flagged", "p_value", "test"} <= set(a) and a["test"]["classes"] == 10
    assert TARGET in levels[v["basis"]]["flagged"]
    assert det.verdict.p_value == pytest.approx(v["p_value"], rel=1e-3)
    line = verdict_line(doc)
    assert ("p = " in line or "p < 0.0001" in line) and "α = 0.05" in line and "p = <" not in line


def test_the_evidence_is_re_derived_from_the_json_alone(scanned) -> None:  # type: ignore[no-untyped-def]
    _, folder, det = scanned
    saved = json.loads((folder / "scan.json").read_text(encoding="utf-8"))
    ev = DETECTORS["neural-cleanse"].evidence_from_doc(saved)
    live = det.results["neural-cleanse"].evidence
    assert ev is not None and (ev.status, ev.target, ev.details["basis"]) == (live.status, live.target, live.details["basis"])
    assert ev.p_value == pytest.approx(live.p_value, rel=1e-3)


def test_bdscan_report_renders_schema_3(scanned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, folder, _ = scanned
    res = CliRunner().invoke(app, ["report", str(folder), "-o", str(tmp_path / "r.html"), "--sarif", str(tmp_path / "r.sarif")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "p-value of the smallest trigger" in html and "weighted-bonferroni-min-p" in html and "provisional" not in html
    assert "the null distribution" in html and "bdscan.scan/3" in html
    # a document written before α was chosen on the calibration half still says that its α was provisional
    doc = json.loads((folder / "scan.json").read_text(encoding="utf-8"))
    doc["verdict"]["alpha_provisional"] = True
    (tmp_path / "old.json").write_text(json.dumps(doc), encoding="utf-8")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "old.json"), "-o", str(tmp_path / "old.html")])
    assert res.exit_code == 0, res.output
    assert "a provisional default" in (tmp_path / "old.html").read_text(encoding="utf-8")


def test_bdscan_report_still_reads_schema_1(tmp_path: Path) -> None:
    old = GOLDEN / "schema1_cifar10_cnn6_badnets.json"
    doc = json.loads(old.read_text(encoding="utf-8"))
    assert doc["schema"] == "bdscan.scan/1"
    shutil.copy(old, tmp_path / "scan.json")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "scan.json"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "schema-1 document" in html and "anomaly index" in html
    ev = DETECTORS["neural-cleanse"].evidence_from_doc(doc)
    assert ev is not None and ev.p_value is None and (ev.status, ev.target) == (doc["verdict"]["status"], doc["verdict"]["target"])
    assert "anomaly index" in verdict_line(doc)


def test_the_verdict_line_names_the_look_that_decided() -> None:
    v = {"status": "backdoor", "target": 9, "target_name": "truck", "p_value": 0.029, "alpha": 0.05, "basis": "pixel",
         "anomaly_index": 2.59, "looks": 1}
    cfg = {"second_look": {"first_steps": 30, "alpha_first": 0.02, "clean_above": 0.5}, "inversion": {"steps": 90}}
    assert "(pixel level, first look after 30 steps, anomaly index 2.59)" in verdict_line({"verdict": v, "config": cfg})
    clean = v | {"status": "clean", "p_value": 0.4, "looks": 2}
    assert "second look after 90 steps" in verdict_line({"verdict": clean, "config": cfg})
    assert "look" not in verdict_line({"verdict": v, "config": {"second_look": None}})  # one look: nothing to say
