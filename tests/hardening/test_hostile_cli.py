"""Hostile checkpoints through the command line: ``inspect``, ``scan`` and ``repair`` refuse them as a finding.

The payloads are the loader tests' generated corpus (:mod:`tests.io.helpers`, proved live there by
``test_corpus_is_live``); each would create a marker file. For every case: exit 1 (unsafe serialization is a
finding, README "Exit codes"), one line on stderr naming the dangerous import, no traceback, the marker never
created, ``--trust-pickle`` changes nothing, and ``scan`` still writes its ``--json``/``--sarif``/``--out``
outputs carrying the finding (the SARIF valid against the OASIS 2.1.0 schema).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from tests.hardening.clirun import TINY_SCAN, bdscan, bdscan_process, lines, one_line
from tests.io import helpers as h
from tests.io.helpers import Checkpoints, Corpus

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "sarif-schema-2.1.0.json"

#: payload name in the corpus -> the import bdscan must name
PAYLOADS = {
    "os.system (reduce)": "posix.system",
    "subprocess.Popen": "Popen",  # torch.save pickles it as commands.Popen (Python 2 name)
    "builtins.eval": "eval",  # __builtin__.eval at protocol 2
    "builtins.exec": "exec",  # builtins.exec, or __builtin__.exec at protocol 2
    "builtins.getattr(__import__('os'), 'system')": "builtins.getattr",
    "dotted STACK_GLOBAL torch -> os.system": "torch.os.system",  # a gadget reached through an allowed module
    "torch.hub._load_local (local hubconf.py)": "torch.hub._load_local",
    "copyreg.add_extension + EXT1": "copyreg.add_extension",
    "pathlib.Path.write_text (file write)": "pathlib.Path.write_text",
}


def _raw(c: Corpus, ck: Checkpoints, name: str) -> Path:
    f = c.dir / "model.pt"
    f.write_bytes(c.get(name).data)
    return f


def _zip(c: Corpus, ck: Checkpoints, name: str) -> Path:
    """A real ``torch.save`` archive whose data.pkl is the payload."""
    return h.rewrite_zip(h.state_dict_zip(c.dir), c.dir / "weights.pth", {"data.pkl": c.get(name).data})


def _claims_state_dict(c: Corpus, ck: Checkpoints, name: str, legacy: bool = False) -> Path:
    """A .pt that looks like a state dict: tensors, then a payload's ``__reduce__`` nested in a list and a dict."""
    f = c.dir / "state_dict.pt"
    obj = {"state_dict": {"conv.weight": torch.zeros(2, 2), "extra": [torch.ones(1), {"deep": c.get(name).reducible}]}}
    torch.save(obj, f, _use_new_zipfile_serialization=not legacy)
    return f


def _torchscript(c: Corpus, ck: Checkpoints, name: str) -> Path:
    return h.rewrite_zip(ck.files["torchscript"], c.dir / "scripted.pt", {"constants.pkl": c.get(name).data})


def _pt2(c: Corpus, ck: Checkpoints, name: str) -> Path:
    return h.pt2_target_injection(ck.files["torch-export"], c.dir / "program.pt2")


Builder = Callable[[Corpus, Checkpoints, str], Path]
CASES: list[tuple[str, Builder, str]] = (
    [("raw pickle", _raw, n) for n in PAYLOADS]
    + [("torch zip data.pkl", _zip, n) for n in ("os.system (reduce)", "builtins.exec", "dotted STACK_GLOBAL torch -> os.system",
                                                  "copyreg.add_extension + EXT1")]
    + [("claims state dict", _claims_state_dict, n) for n in ("os.system (reduce)", "subprocess.Popen", "builtins.eval", "builtins.exec")]
    + [("legacy state dict", lambda c, k, n: _claims_state_dict(c, k, n, legacy=True), "subprocess.Popen"),
       ("TorchScript constants.pkl", _torchscript, "builtins.eval"),
       ("torch.export node target", _pt2, "")]
)
EXPECTED_FORMAT = {"claims state dict": "state-dict", "legacy state dict": "state-dict",
                   "TorchScript constants.pkl": "torchscript", "torch.export node target": "torch-export"}
IDS = [f"{kind}: {name}" if name else kind for kind, _, name in CASES]


def expected_ref(name: str) -> str:
    return PAYLOADS[name] if name else "torch.os.system"


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert jsonschema.validators.validator_for(schema) is jsonschema.Draft4Validator
    return jsonschema.Draft4Validator(schema)


def check_sarif(validator: jsonschema.Draft4Validator, path: Path, ref: str) -> None:
    log = json.loads(path.read_text(encoding="utf-8"))
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:3]]
    results = log["runs"][0]["results"]
    unsafe = [r for r in results if r["ruleId"] == "BDS002"]
    assert unsafe and all(r["level"] == "error" for r in unsafe), results
    assert any(ref in r["message"]["text"] for r in unsafe), [r["message"]["text"] for r in unsafe]
    assert not [r for r in results if r["ruleId"] == "BDS001"]


def check_doc(doc: dict[str, Any], model: Path, ref: str) -> None:
    assert doc["verdict"]["status"] == "unsafe"
    assert doc["model"]["file"] == model.name and len(doc["model"]["sha256"]) == 64
    assert doc["model"]["pickle_scan"]["dangerous"] is True
    assert any(ref in f["ref"] for f in doc["model"]["pickle_scan"]["findings"]), doc["model"]["pickle_scan"]
    assert doc["modes"] == {}


@pytest.mark.parametrize(("kind", "build", "name"), CASES, ids=IDS)
def test_inspect_and_scan_refuse(ckpts: Checkpoints, corpus: Corpus, npz4: Path, sarif_validator, kind: str,
                                 build: Builder, name: str) -> None:
    model = build(corpus, ckpts, name)
    before = model.read_bytes()
    ref = expected_ref(name)
    weights = ["--arch", "bdscan_cnn6", "--num-classes", "4"]  # what a user would add for a state dict
    for trust in ([], ["--trust-pickle"]):
        line = one_line(bdscan("inspect", model, *weights, *trust), 1, "finding")
        assert ref in line, line
        assert not corpus.marker.exists(), "the payload ran"
        line = one_line(bdscan("inspect", model, "--json", *trust), 1, "finding")
        assert ref in line

        out = corpus.dir / f"out{len(trust)}"
        js, sarif, scan_dir = out / "scan.json", out / "scan.sarif", out / "dir"
        r = bdscan("scan", model, *weights, "--data", npz4, *TINY_SCAN, "--json", js, "--sarif", sarif, "--out", scan_dir, *trust)
        line = one_line(r, 1, "finding")
        assert ref in line, line
        assert not corpus.marker.exists(), "the payload ran"
        doc = json.loads(js.read_text(encoding="utf-8"))
        check_doc(doc, model, ref)
        # the document names the loader that refused the file and the scanner that found the problem
        assert doc["model"]["format"] == EXPECTED_FORMAT.get(kind, doc["model"]["format"])
        assert doc["model"]["format"] in {"state-dict", "torchscript", "torch-export", "pickle"}, doc["model"]["format"]
        assert doc["model"]["pickle_scan"]["scanner"].startswith(("picklescan", "bdscan")), doc["model"]["pickle_scan"]
        assert json.loads((scan_dir / "scan.json").read_text(encoding="utf-8")) == doc
        check_sarif(sarif_validator, sarif, ref)
    if kind == "raw pickle":
        # naming the full-pickle loader changes nothing; --fail-on never does not cover a file that was never scanned
        one_line(bdscan("inspect", model, "--format", "pickle", "--trust-pickle"), 1, "finding")
        one_line(bdscan("scan", model, "--data", npz4, *TINY_SCAN, "--fail-on", "never"), 1, "finding")
    assert model.read_bytes() == before
    assert not corpus.marker.exists()


def _has_repair() -> bool:
    r = bdscan("--help")
    return any(ln.strip().startswith("repair ") for ln in r.out.splitlines())


@pytest.mark.parametrize(("kind", "build", "name"), [c for c in CASES if c[0] != "raw pickle"] + [CASES[0]],
                         ids=[i for c, i in zip(CASES, IDS, strict=True) if c[0] != "raw pickle"] + [IDS[0]])
def test_repair_refuses(ckpts: Checkpoints, corpus: Corpus, npz4: Path, kind: str, build: Builder, name: str) -> None:
    if not _has_repair():
        pytest.skip("`bdscan repair` is not in `bdscan --help` yet")
    model = build(corpus, ckpts, name)
    ref = expected_ref(name)
    for trust in ([], ["--trust-pickle"]):
        fixed, js = corpus.dir / "repaired.safetensors", corpus.dir / "repair.json"
        r = bdscan("repair", model, "--arch", "bdscan_cnn6", "--num-classes", "4", "--data", npz4, "--out", fixed,
                   "--json", js, "--budget", "smoke", "--levels", "pixel", "--epochs", "1", *trust)
        line = one_line(r, 1, "finding")
        assert ref in line, line
        assert not fixed.exists() and not js.exists()
        assert not corpus.marker.exists(), "the payload ran"


def test_console_script_prints_one_line(corpus: Corpus, npz4: Path, sarif_validator) -> None:
    """The real ``bdscan`` process: exit 1, one line on stderr, nothing on stdout, outputs written, payload inert."""
    model = _raw(corpus, None, "os.system (reduce)")  # type: ignore[arg-type]
    js, sarif = corpus.dir / "scan.json", corpus.dir / "scan.sarif"
    r = bdscan_process("scan", model, "--data", npz4, *TINY_SCAN, "--json", js, "--sarif", sarif, "--trust-pickle")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and not r.out.strip(), r.err
    errs = lines(r.err)
    assert len(errs) == 1 and errs[0].startswith("bdscan finding:") and "posix.system" in errs[0], r.err
    assert not corpus.marker.exists(), "the payload ran"
    check_doc(json.loads(js.read_text(encoding="utf-8")), model, "posix.system")
    check_sarif(sarif_validator, sarif, "posix.system")
