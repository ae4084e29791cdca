"""SARIF 2.1.0 output: valid against the OASIS schema, one result per finding, none for a clean model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bdscan.detect import DETECTORS
from bdscan.report.sarif import artifact_uri, to_sarif
from tests.conftest import TARGET
from tests.report.scans import as_clean, as_inconclusive, unsafe_doc

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "sarif-schema-2.1.0.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)  # the schema declares draft-04
    assert cls is jsonschema.Draft4Validator
    cls.check_schema(schema)
    return cls(schema)


def valid(validator: jsonschema.protocols.Validator, log: dict[str, Any]) -> dict[str, Any]:
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    json.dumps(log)  # plain JSON
    assert log["version"] == "2.1.0" and log["$schema"].startswith("https://")
    assert len(log["runs"]) == 1
    driver = log["runs"][0]["tool"]["driver"]
    assert driver["name"] == "bdscan"
    rules = {r["id"]: r for r in driver["rules"]}
    # one rule per registered detector, plus the two file-safety rules
    assert set(rules) == {d.sarif_rule["id"] for d in DETECTORS.values()} | {"BDS002", "BDS003"}
    assert {"BDS001", "BDS004"} <= set(rules)
    for r in rules.values():
        assert r["shortDescription"]["text"] and r["fullDescription"]["text"]
        assert r["help"]["text"] and r["help"]["markdown"]
    for res in log["runs"][0]["results"]:
        assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
    return log


def results(log: dict[str, Any], rule: str | None = None) -> list[dict[str, Any]]:
    return [r for r in log["runs"][0]["results"] if rule is None or r["ruleId"] == rule]


def test_flagged(validator, flagged_doc: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    log = valid(validator, to_sarif(flagged_doc, "models/bd.safetensors"))
    bds1 = results(log, "BDS001")
    assert bds1, "a suspected backdoor must give a BDS001 result"
    first = bds1[0]
    assert first["level"] == "error"
    assert f"class{TARGET}" in first["message"]["text"] and f"index {TARGET}" in first["message"]["text"]
    assert first["properties"]["targetClass"] == TARGET and first["properties"]["verdictTarget"] is True
    assert set(first["properties"]["anomalyIndices"]) == {"pixel", "patch"}
    loc = first["locations"][0]["physicalLocation"]["artifactLocation"]
    assert loc["uri"] == "models/bd.safetensors" and loc["uriBaseId"] == "%SRCROOT%"  # relative to the repository root
    assert log["runs"][0]["artifacts"][0]["location"] == {"uri": "models/bd.safetensors", "uriBaseId": "%SRCROOT%"}
    assert "uri" not in log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]  # no machine-specific absolute path
    assert not results(log, "BDS002") and not results(log, "BDS003")
    props = log["runs"][0]["properties"]
    assert props["verdict"] == "backdoor" and props["seed"] == 0 and props["sha256"] == flagged_doc["model"]["sha256"]
    assert log["runs"][0]["artifacts"][0]["hashes"]["sha-256"] == flagged_doc["model"]["sha256"]


def test_clean_has_no_results(validator, flagged_doc: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    log = valid(validator, to_sarif(as_clean(flagged_doc), "bd.safetensors"))
    assert results(log) == []
    assert log["runs"][0]["properties"]["verdict"] == "clean"
    assert len(log["runs"][0]["tool"]["driver"]["rules"]) == len(DETECTORS) + 2


def test_pixel_only_document(validator, pixel_only_doc: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    log = valid(validator, to_sarif(pixel_only_doc, "clean.safetensors"))
    status = pixel_only_doc["verdict"]["status"]
    assert bool(results(log, "BDS001")) == (status == "backdoor")


def test_inconclusive(validator, flagged_doc: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    log = valid(validator, to_sarif(as_inconclusive(flagged_doc), "bd.safetensors"))
    (r,) = results(log)
    assert r["ruleId"] == "BDS003" and r["level"] == "warning"


def test_dangerous_pickle(validator) -> None:  # type: ignore[no-untyped-def]
    log = valid(validator, to_sarif(unsafe_doc(), "file:///models/evil.pt"))
    bds2 = results(log, "BDS002")
    assert [r["properties"]["import"] for r in bds2] == ["os.system", "builtins.exec"]
    assert all(r["level"] == "error" for r in bds2)
    assert "os.system" in bds2[0]["message"]["text"]
    assert bds2[0]["locations"][0]["physicalLocation"]["artifactLocation"] == {"uri": "file:///models/evil.pt", "index": 0}
    assert "originalUriBaseIds" not in log["runs"][0]  # an absolute URI takes no base id (SARIF 3.4.4)
    assert not results(log, "BDS001") and not results(log, "BDS003")


def test_pickle_findings_next_to_a_backdoor(validator, flagged_doc: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(flagged_doc)
    doc["model"]["pickle_scan"] = {"scanner": "picklescan", "scanned_files": 1, "dangerous": True, "error": "truncated",
                                   "findings": [{"ref": "torch._utils._rebuild_tensor", "severity": "suspicious",
                                                 "location": "data.pkl"}]}
    log = valid(validator, to_sarif(doc, "bd.pt"))
    levels = [(r["ruleId"], r["level"]) for r in results(log)]
    assert ("BDS001", "error") in levels and ("BDS002", "warning") in levels and ("BDS002", "error") in levels


def test_empty_document(validator) -> None:  # type: ignore[no-untyped-def]
    assert results(valid(validator, to_sarif({}, "m.onnx"))) == []


@pytest.mark.parametrize("given,uri", [
    ("models/bd.safetensors", "models/bd.safetensors"),
    ("my models/bd #1.pt", "my%20models/bd%20%231.pt"),
    ("C:\\models\\bd.pt", "file:///C:/models/bd.pt"),
    ("file:///home/x/bd.pt", "file:///home/x/bd.pt"),
    ("/abs/bd.pt", "file:///abs/bd.pt"),
    ("./models/../models/bd.pt", "models/bd.pt"),
])
def test_artifact_uri(given: str, uri: str) -> None:
    assert artifact_uri(given) == uri
