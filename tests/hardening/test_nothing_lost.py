"""Nothing is lost: outputs never overwrite inputs, writes are atomic (an interrupted write leaves the old file or
no file, and no temp file), Ctrl-C during a scan writes nothing, and a path that cannot be written is a usage
error found before the scan runs, not an internal error after it."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdscan.atomic import atomic_write_bytes, atomic_write_text, atomic_write_with
from tests.hardening.clirun import TINY_SCAN, Ran, bdscan, lines, no_crash, one_line

SCAN = [*TINY_SCAN, "--samples", "20", "-q"]


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def scan_dir(tiny_bd, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scan") / "scan"
    r = bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, "--out", d)
    assert r.code in (0, 1), r.text
    return d


# ----------------------------------------------------------------------------------------------------------
# outputs equal to (or inside) inputs


def test_report_refuses_to_overwrite_its_scan(scan_dir: Path, tmp_path: Path) -> None:
    src = scan_dir / "scan.json"
    before = src.read_bytes()
    for args in (["-o", src], ["-o", tmp_path / "r.html", "--sarif", src]):  # --sarif was not checked
        line = one_line(bdscan("report", scan_dir, *args), 2)
        assert "input" in line, line
        one_line(bdscan("report", src, *args), 2)
    assert src.read_bytes() == before
    assert not (tmp_path / "r.html").exists()


def test_lab_commands_refuse_to_overwrite_inputs(tiny_bd, tmp_path: Path) -> None:
    model_before, data_before = tiny_bd.model.read_bytes(), tiny_bd.data.read_bytes()
    cases = [
        ["lab", "train", "--arch", "bdscan_cnn6", "--data", tiny_bd.data, "--out", tiny_bd.data],
        ["lab", "train", "--arch", "bdscan_cnn6", "--data", tiny_bd.data, "--teacher", tiny_bd.model, "--out", tiny_bd.model],
        ["lab", "inject", "--model", tiny_bd.model, "--data", tiny_bd.data, "--attack", "badnets", "--target", "0",
         "--out", tiny_bd.model],
        ["lab", "inject", "--model", tiny_bd.model, "--data", tiny_bd.data, "--attack", "badnets", "--target", "0",
         "--out", tiny_bd.data],
    ]
    for args in cases:
        line = one_line(bdscan(*args), 2)
        assert "it is an input" in line, line
    assert tiny_bd.model.read_bytes() == model_before and tiny_bd.data.read_bytes() == data_before


def test_output_over_a_file_inside_the_data_folder_refused(tiny_bd, tmp_path: Path) -> None:
    """--data clean/ --json clean/3/img.png would have replaced a clean image."""
    d = tmp_path / "clean"
    x = np.load(tiny_bd.data)["x"]
    for k in range(10):
        (d / str(k)).mkdir(parents=True)
        Image.fromarray(x[k]).save(d / str(k) / "img.png")
    img = d / "3" / "img.png"
    before = img.read_bytes()
    for opt in ("--json", "--sarif", "--report", "--out"):
        line = one_line(bdscan("scan", tiny_bd.model, "--data", d, *SCAN, opt, img), 2)
        assert "input folder" in line or "it is a file" in line, line
    assert img.read_bytes() == before


def test_unwritable_outputs_are_usage_errors_before_the_scan(tiny_bd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bdscan.detect.scan as scan_mod

    def no_scan(*a: object, **k: object) -> None:
        raise AssertionError("the scan ran although its output cannot be written")

    monkeypatch.setattr(scan_mod, "invert_prepared", no_scan)
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("x")
    adir.mkdir()
    for opt, path in (("--json", afile / "x.json"), ("--json", adir), ("--out", afile), ("--sarif", afile / "a" / "b.sarif"),
                      ("--report", adir)):
        line = one_line(bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, opt, path), 2)
        assert "cannot write" in line, line
    assert afile.read_text() == "x" and not any(adir.iterdir())


def test_report_unwritable_output_and_malformed_documents(scan_dir: Path, tmp_path: Path) -> None:
    adir = tmp_path / "adir"
    adir.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (adir, afile / "x.html"):  # were FileExistsError/IsADirectoryError: exit 4
        line = one_line(bdscan("report", scan_dir, "-o", out), 2)
        assert "cannot write" in line, line
    doc = json.loads((scan_dir / "scan.json").read_text())
    broken = [{"schema": doc["schema"]}, {**doc, "model": []}, {**doc, "verdict": "backdoor"}, {**doc, "modes": {"pixel": 3}}]
    for i, bad in enumerate(broken):
        src = tmp_path / f"bad{i}.json"
        src.write_text(json.dumps(bad))
        html, sarif = tmp_path / f"r{i}.html", tmp_path / f"r{i}.sarif"
        line = one_line(bdscan("report", src, "-o", html, "--sarif", sarif), 3)  # was exit 4 (KeyError, AttributeError)
        assert "malformed" in line, line
        assert not html.exists() and not sarif.exists()


# ----------------------------------------------------------------------------------------------------------
# atomic writes


class Interrupt:
    """Patches ``Path.write_bytes``: writes to a path whose name starts with ``prefix`` stop halfway with Ctrl-C."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
        self.real = pathlib.Path.write_bytes
        self.prefix = prefix
        self.hits = 0
        monkeypatch.setattr(pathlib.Path, "write_bytes", self)

    def __get__(self, obj: Path, owner: type) -> object:
        return lambda data: self(obj, data)

    def __call__(self, path: Path, data: bytes) -> int:
        if path.name.startswith(self.prefix):
            self.hits += 1
            self.real(path, data[: len(data) // 2])
            raise KeyboardInterrupt
        return self.real(path, data)


@pytest.mark.parametrize("exists", [True, False])
def test_interrupted_write_leaves_old_file_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool) -> None:
    target = tmp_path / "out.json"
    if exists:
        target.write_text("OLD")
    cut = Interrupt(monkeypatch, ".out.json.")
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "NEW" * 1000)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"NEW" * 1000)

    def writer(tmp: Path) -> None:
        tmp.write_text("NE")  # half of it, then Ctrl-C (safetensors/ONNX/TorchScript writers go through this)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, writer)
    assert cut.hits == 2
    assert (target.read_text() == "OLD") if exists else not target.exists()
    assert not temp_files(tmp_path)
    monkeypatch.undo()
    atomic_write_text(target, "NEW" * 1000)  # and an uninterrupted write replaces it whole
    assert target.read_text() == "NEW" * 1000 and not temp_files(tmp_path)


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def test_outputs_get_ordinary_permissions(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 leaked into every output (a report a web server or a CI artifact step could not read)."""
    new = tmp_path / "new.json"
    atomic_write_text(new, "{}")
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    atomic_write_text(kept, "[]")
    assert kept.stat().st_mode & 0o777 == 0o640


def _interrupted(r: Ran) -> None:
    no_crash(r)
    assert r.code == 130, r.text
    errs = lines(r.err)
    assert len(errs) == 1 and errs[0].startswith("bdscan:") and "interrupted" in errs[0], r.err


def test_ctrl_c_while_writing_the_json_keeps_the_old_one(tiny_bd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    js, sarif = tmp_path / "scan.json", tmp_path / "scan.sarif"
    js.write_text("OLD")
    Interrupt(monkeypatch, ".scan.json.")
    _interrupted(bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, "--json", js, "--sarif", sarif))
    assert js.read_text() == "OLD" and not sarif.exists() and not temp_files(tmp_path)
    monkeypatch.undo()
    r = bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, "--json", js)
    assert r.code in (0, 1), r.text
    assert json.loads(js.read_text())["schema"].startswith("bdscan.scan/")  # replaced whole


def test_ctrl_c_during_the_scan_writes_nothing(tiny_bd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bdscan.detect.scan as scan_mod

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "invert_prepared", interrupted)
    old = tmp_path / "old.json"
    old.write_text("OLD")
    outs = {"--json": tmp_path / "scan.json", "--sarif": tmp_path / "scan.sarif", "--report": tmp_path / "r.html",
            "--out": tmp_path / "dir"}
    args = [a for kv in outs.items() for a in kv]
    _interrupted(bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, *args))
    _interrupted(bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, *SCAN, "--json", old))
    assert not any(p.exists() for p in outs.values())
    assert old.read_text() == "OLD" and not temp_files(tmp_path)
    fixed = tmp_path / "fixed.safetensors"  # repair scans first: Ctrl-C there exports nothing either
    _interrupted(bdscan("repair", tiny_bd.model, "--data", tiny_bd.data, "--out", fixed, "--budget", "smoke", "--levels", "pixel",
                          "-q"))
    assert not fixed.exists() and not temp_files(tmp_path)
