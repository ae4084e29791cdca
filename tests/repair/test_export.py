"""Exporting a repaired model: parity of every format after reloading, provenance, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from bdscan.errors import UsageError
from bdscan.io import load_model
from bdscan.io.base import sha256_file
from bdscan.io.safetensors_io import read_metadata
from bdscan.repair import OutOfToleranceError, export_repaired
from tests.conftest import TARGET


def _export(result, tiny_bd, out: Path, **kw) -> Path:  # type: ignore[no-untyped-def]
    return export_repaired(result, out, tiny_bd.model, sha256_file(tiny_bd.model), {"scan": "scan-dir"}, **kw)


def _logits(w, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return w.eval()(x)


def test_safetensors_reloads_with_the_same_logits_and_provenance(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = _export(unlearned, tiny_bd, tmp_path / "fixed.safetensors")
    lm = load_model(out)
    x = tiny_bd.tiny.data.x
    assert torch.allclose(_logits(lm.wrapper, x), _logits(unlearned.wrapper, x), atol=1e-6)
    prov = read_metadata(out)["extra"]["provenance"]
    assert prov["repaired_from"] == {"file": "bd.safetensors", "sha256": sha256_file(tiny_bd.model)}
    assert set(lm.wrapper.info.metadata) == {"provenance"} and prov["input_metadata"] == {}
    assert prov["method"] == "unlearn" and prov["scan"] == "scan-dir" and prov["after"] == unlearned.to_dict()["after"]
    assert lm.original_trigger is not None and lm.original_trigger.target == TARGET  # a lab model keeps its ground truth
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.safetensors"]  # no temp files left


def test_onnx_reloads_within_1e_4(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = _export(unlearned, tiny_bd, tmp_path / "fixed.onnx")
    lm = load_model(out)
    x = tiny_bd.tiny.data.x
    assert (_logits(lm.wrapper, x) - _logits(unlearned.wrapper, x)).abs().max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["bdscan.provenance"])["method"] == "unlearn"


def test_torchscript_reloads_within_1e_4(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = _export(unlearned, tiny_bd, tmp_path / "fixed.pt")
    lm = load_model(out)
    assert lm.format == "torchscript" and lm.wrapper.info.mean == (0.5, 0.5, 0.5)
    x = tiny_bd.tiny.data.x
    assert (_logits(lm.wrapper, x) - _logits(unlearned.wrapper, x)).abs().max() < 1e-4


def test_the_input_is_never_overwritten(unlearned, tiny_bd) -> None:  # type: ignore[no-untyped-def]
    before = sha256_file(tiny_bd.model)
    with pytest.raises(UsageError, match="input"):
        _export(unlearned, tiny_bd, tiny_bd.model)
    assert sha256_file(tiny_bd.model) == before


def test_out_of_tolerance_needs_force(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = replace(unlearned, acc_drop=0.125, within_tolerance=False)
    out = tmp_path / "fixed.safetensors"
    with pytest.raises(OutOfToleranceError) as e:
        _export(bad, tiny_bd, out)
    assert "12.5 points" in str(e.value) and "3.0 points" in str(e.value) and "--force" in str(e.value)
    assert isinstance(e.value, UsageError) and not out.exists() and e.value.failed == ("clean accuracy",)
    assert _export(bad, tiny_bd, out, force=True) == out and out.exists()
    prov = read_metadata(out)["extra"]["provenance"]
    assert prov["forced"] is True and prov["passed"] is False  # a forced export says so in the file itself


def test_a_backdoor_that_still_works_needs_force(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = replace(unlearned, backdoor_removed=False, after={**unlearned.after, "asr_original": 0.98})
    out = tmp_path / "fixed.safetensors"
    with pytest.raises(OutOfToleranceError) as e:
        _export(bad, tiny_bd, out)
    assert e.value.failed == ("attack success",) and "98.0 %" in str(e.value) and "--force" in str(e.value)
    assert not out.exists()


def test_a_passed_export_is_not_forced_and_follows_the_umask(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat

    old = os.umask(0o027)
    try:
        for suffix in (".safetensors", ".onnx", ".pt"):
            out = _export(unlearned, tiny_bd, tmp_path / f"fixed{suffix}")
            assert stat.S_IMODE(out.stat().st_mode) == 0o640, suffix  # 0666 less the umask, not mkstemp's 0600
    finally:
        os.umask(old)
    assert read_metadata(tmp_path / "fixed.safetensors")["extra"]["provenance"]["forced"] is False


def test_unknown_suffix_lists_the_supported_ones(unlearned, tiny_bd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=r"\.h5") as e:
        _export(unlearned, tiny_bd, tmp_path / "fixed.h5")
    listed = str(e.value).rsplit("one of:", 1)[-1]
    assert all(s in listed for s in (".safetensors", ".onnx", ".pt"))  # listed in the format registry's order
    assert not list(tmp_path.iterdir())


def test_a_writer_failure_names_the_other_formats_and_leaves_nothing(unlearned, tiny_bd, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from bdscan.errors import BdscanError, ModelLoadError
    from bdscan.io import writers
    from bdscan.repair import ExportError

    ts = writers()["torchscript"]

    def broken_write(*a: object, **k: object) -> None:
        raise BdscanError("cannot export it as TorchScript: no")

    monkeypatch.setattr(ts, "write", broken_write)
    with pytest.raises(ExportError, match=r"no \(export \.safetensors or \.onnx instead\)"):
        _export(unlearned, tiny_bd, tmp_path / "fixed.pt")
    monkeypatch.undo()

    def broken_read(*a: object, **k: object) -> None:
        raise ModelLoadError("the written TorchScript file does not load back: no")

    monkeypatch.setattr(ts, "read_back", broken_read)
    with pytest.raises(ExportError, match=r"^fixed\.pt: the written TorchScript file does not load back"):
        _export(unlearned, tiny_bd, tmp_path / "fixed.pt")
    assert not list(tmp_path.iterdir())
