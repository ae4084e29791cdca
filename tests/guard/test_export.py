"""Exporting a guard: one file with the model's input and the outputs logits / suspicion / flagged, checked against
the original model before it is kept, and loaded back safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bdscan.data import CleanData
from bdscan.errors import UnsafeModelError, UsageError
from bdscan.guard import OUTPUTS, GuardConfig, GuardExportError, GuardRateError, build_guard, export_guard
from bdscan.guard import export as export_mod
from bdscan.guard.check import check_inputs, load_guard, load_inputs
from bdscan.io import export_onnx
from tests.io.helpers import call, glob, proto2, rewrite_zip, s


@pytest.fixture(scope="module")
def guards(tiny_bd, tiny_vit, clean300: CleanData) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for name, files in (("cnn", tiny_bd), ("vit", tiny_vit)):
        t = files.tiny
        out[name] = (files, build_guard(t.wrapper, clean300, t.trigger, GuardConfig(layer="penultimate"), original=t.trigger))
    return out


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_onnx_guard_has_the_models_input_three_named_outputs_and_its_logits(which: str, guards: dict, tmp_path: Path) -> None:
    files, r = guards[which]
    out = tmp_path / "guard.onnx"
    fig = export_guard(r, out, files.model, "f" * 64, {"scan": "somewhere"})
    assert fig["format"] == "onnx" and fig["max_logit_difference"] <= 1e-4
    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUTS)
    (inp,) = sess.get_inputs()
    assert inp.shape[1:] == list(r.wrapper.input_size)  # the model's own input, any batch size
    w = r.wrapper
    x = r.holdout.x[:7]
    logits, suspicion, flagged = sess.run(None, {inp.name: w.normalise(x).numpy()})
    with torch.no_grad():
        ref = w(x).numpy()
    assert np.abs(logits - ref).max() <= 1e-4 and flagged.dtype == np.bool_ and suspicion.shape == (7,)
    assert (flagged == (suspicion > r.threshold)).all()
    stamped = sess.run(None, {inp.name: w.normalise(r.trigger.stamp(x)).numpy()})[2]
    assert stamped.mean() >= 0.8
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    g = json.loads(meta["bdscan.guard"])
    assert g["threshold"] == pytest.approx(r.threshold, abs=1e-6) and g["fpr_requested"] == 0.05
    assert g["guarded_from"] == {"file": files.model.name, "sha256": "f" * 64} and g["scan"] == "somewhere"
    assert g["outputs"] == list(OUTPUTS) and json.loads(meta["bdscan.input"]) == "normalised"


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_torchscript_guard_returns_named_outputs(which: str, guards: dict, tmp_path: Path) -> None:
    files, r = guards[which]
    out = tmp_path / "guard.pt"
    assert export_guard(r, out, files.model, "a" * 64)["format"] == "torchscript"
    g = load_guard(out)
    assert g.format == "torchscript" and g.threshold == pytest.approx(r.threshold, abs=1e-6)
    res = g.run(r.holdout.x[:5])
    with torch.no_grad():
        ref = r.wrapper(r.holdout.x[:5]).numpy()
    assert np.abs(res["logits"] - ref).max() <= 1e-4 and res["flagged"].dtype == np.bool_


def test_a_failed_check_or_a_bad_path_leaves_nothing(guards: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, r = guards["cnn"]
    out = tmp_path / "guard.onnx"
    monkeypatch.setattr(export_mod, "PARITY_TOL", -1.0)  # every difference is too large
    with pytest.raises(GuardExportError, match="nothing was written"):
        export_guard(r, out, files.model, "a" * 64)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(UsageError, match=r"\.onnx or \.pt"):
        export_guard(r, tmp_path / "guard.safetensors", files.model, "a" * 64)
    other = tmp_path / "in"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"the input")
    with pytest.raises(UsageError, match="it is an input"):
        export_guard(r, other / "model.onnx", other / "model.onnx", "a" * 64)
    assert (other / "model.onnx").read_bytes() == b"the input" and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_guard_that_missed_its_rate_is_not_exported(tiny_bd, clean300: CleanData, tmp_path: Path) -> None:
    t = tiny_bd.tiny
    r = build_guard(t.wrapper, clean300, t.trigger, GuardConfig(fpr=0.001))
    with pytest.raises(GuardRateError):
        export_guard(r, tmp_path / "g.onnx", tiny_bd.model, "a" * 64)
    assert not (tmp_path / "g.onnx").exists()


def test_guard_check_flags_stamped_inputs(guards: dict, tmp_path: Path) -> None:
    files, r = guards["cnn"]
    out = tmp_path / "guard.onnx"
    export_guard(r, out, files.model, "a" * 64)
    g = load_guard(out)
    x = r.holdout.x[:10]
    np.savez(tmp_path / "in.npz", x=(torch.cat([x, r.trigger.stamp(x)]).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    inp = load_inputs(tmp_path / "in.npz", g.input_size, 10)
    assert inp.y is None and inp.names[0] == "#0"
    doc = check_inputs(g, inp, r.trigger)
    flags = [row["flagged"] for row in doc["inputs"]]
    assert sum(flags[10:]) >= 8 and doc["flagged"] == sum(flags)
    assert doc["stamped"]["images"] == 20 and doc["stamped"]["rate"] >= 0.8


def test_load_guard_refuses_what_is_not_a_safe_guard(guards: dict, tmp_path: Path) -> None:
    files, r = guards["cnn"]
    plain = tmp_path / "plain.onnx"
    export_onnx(r.wrapper, plain)
    with pytest.raises(UsageError, match="not a bdscan guard"):
        load_guard(plain)
    with pytest.raises(UsageError, match=r"\.onnx or \.pt"):
        load_guard(files.model)
    good = tmp_path / "guard.pt"
    export_guard(r, good, files.model, "a" * 64)
    marker = tmp_path / "pwned"
    hostile = rewrite_zip(good, tmp_path / "hostile.pt", {"data.pkl": proto2(call(glob("os", "system"), s(f"touch {marker}")))})
    with pytest.raises(UnsafeModelError):
        load_guard(hostile)
    assert not marker.exists()
