"""Where the trigger comes from: a real scan folder, an in-memory scan, a trigger file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bdscan.errors import LoadError, UsageError
from bdscan.repair import reversed_trigger_from_findings, reversed_trigger_from_scan, trigger_from_file
from tests.conftest import TARGET


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_reversed_trigger_from_a_scan_folder(smoke_scan) -> None:  # type: ignore[no-untyped-def]
    v = smoke_scan.findings.verdict
    assert v.status == "backdoor" and v.target == TARGET  # the smoke scan finds the planted backdoor
    t = reversed_trigger_from_scan(smoke_scan.out, expected_sha256=smoke_scan.lm.sha256)
    r = smoke_scan.findings.modes["pixel"].label(TARGET)
    assert t.target == TARGET and t.kind == "reversed-pixel" and t.params["mode"] == "pixel"
    assert torch.equal(t.mask, r.mask) and torch.equal(t.pattern, r.pattern)  # full precision
    same = reversed_trigger_from_findings(smoke_scan.findings)
    assert torch.equal(same.mask, t.mask) and same.target == TARGET
    assert torch.equal(reversed_trigger_from_scan(smoke_scan.out / "scan.json").mask, t.mask)


def test_scan_of_another_model_is_refused(smoke_scan) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="not of the model being repaired"):
        reversed_trigger_from_scan(smoke_scan.out, expected_sha256="0" * 64)


def test_no_suspect_missing_files_and_unscanned_mode(smoke_scan, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(smoke_scan.out, tmp_path / "scan")
    doc = json.loads((d / "scan.json").read_text())
    doc["verdict"].update(status="clean", target=None)
    (d / "scan.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="no backdoor suspect"):
        reversed_trigger_from_scan(d)
    assert reversed_trigger_from_scan(d, label=5).target == 5  # a named label still works
    with pytest.raises(UsageError, match="no patch triggers"):
        reversed_trigger_from_scan(d, "patch", label=5)
    (d / "triggers.npz").unlink()
    with pytest.raises(LoadError, match=r"triggers\.npz"):
        reversed_trigger_from_scan(d, label=5)
    with pytest.raises(LoadError, match="no such scan folder"):
        reversed_trigger_from_scan(tmp_path / "nowhere")


def test_trigger_file(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), np.float32)
    mask[2:5, 2:5] = 1
    pattern = np.ones((3, 16, 16), np.float32)
    np.savez(tmp_path / "t.npz", mask=mask, pattern=pattern, target=np.int64(3))
    t = trigger_from_file(tmp_path / "t.npz")
    assert t.target == 3 and t.kind == "file" and t.l1() == 9.0 and t.pattern.shape == (3, 16, 16)
    assert trigger_from_file(tmp_path / "t.npz", target=1).target == 1
    np.savez(tmp_path / "bad.npz", mask=mask * 2, pattern=pattern)
    with pytest.raises(LoadError, match="outside"):
        trigger_from_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "half.npz", mask=mask)
    with pytest.raises(LoadError, match="'pattern'"):
        trigger_from_file(tmp_path / "half.npz")
    with pytest.raises(UsageError, match="npz"):
        trigger_from_file(tmp_path / "mask.png")


def test_the_combined_verdicts_class_picks_neural_cleanses_trigger(smoke_scan) -> None:  # type: ignore[no-untyped-def]
    """A backdoor that another detector found (neural cleanse alone clean, or naming another class) is repaired with
    Neural Cleanse's reversed trigger for the combined verdict's class; without a suspect there is none."""
    from types import SimpleNamespace

    from bdscan.detect.base import CombinedVerdict
    from bdscan.errors import NoSuspectError
    from bdscan.repair import reversed_trigger_from_detection

    nc = SimpleNamespace(findings=smoke_scan.findings)
    other = (TARGET + 2) % 10
    det = SimpleNamespace(results={"neural-cleanse": nc}, verdict=CombinedVerdict("backdoor", other, None, ()))
    t = reversed_trigger_from_detection(det)  # type: ignore[arg-type]
    assert t.target == other and torch.equal(t.mask, smoke_scan.findings.modes["pixel"].label(other).mask)
    assert reversed_trigger_from_detection(det, label=TARGET).target == TARGET  # type: ignore[arg-type]  # --label wins
    clean = SimpleNamespace(results={"neural-cleanse": nc}, verdict=CombinedVerdict("clean", None, None, ()))
    with pytest.raises(NoSuspectError):
        reversed_trigger_from_detection(clean)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no Neural Cleanse"):
        reversed_trigger_from_detection(SimpleNamespace(results={}, verdict=det.verdict))  # type: ignore[arg-type]
