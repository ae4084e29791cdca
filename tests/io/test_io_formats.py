"""Round trips, sniffing, model-information inference and the error paths of every loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bdscan.errors import BdscanError, ModelLoadError, UsageError
from bdscan.io import LoadOptions, export_onnx, load_model, loaders
from bdscan.io import onnx_io as onnx_io_mod
from bdscan.io.base import pick_loader
from bdscan.io.build import create_net
from bdscan.io.torch_export import validate_program
from bdscan.models import BDSCAN_ARCHS
from tests.io.helpers import MEAN, NORM, STD, Checkpoints, PatchNet, wrap

X = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _logits(w: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return w(X)


def one_line(err: BaseException) -> bool:
    return "\n" not in str(err) and "\r" not in str(err)


def test_onnx_is_imported_only_for_onnx_files() -> None:
    # importing onnx costs about 0.8 s: a scan of a safetensors file must not pay it (bdscan/io/onnx_io.py)
    code = "import sys, bdscan.cli, bdscan.io; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_has_every_format() -> None:
    assert set(loaders()) >= {"safetensors", "state-dict", "torchscript", "torch-export", "onnx", "pickle"}


@pytest.mark.parametrize(
    ("key", "fmt", "tol"),
    [
        ("safetensors", "safetensors", 0.0),
        ("state-dict", "state-dict", 0.0),
        ("nested", "state-dict", 0.0),
        ("legacy", "state-dict", 0.0),
        ("torchscript", "torchscript", 1e-6),
        ("torch-export", "torch-export", 1e-6),
        ("onnx", "onnx", 1e-4),
    ],
)
def test_round_trip(ckpts: Checkpoints, key: str, fmt: str, tol: float) -> None:
    lm = load_model(ckpts.files[key], ckpts.options[key])
    assert lm.format == fmt
    ref = ckpts.cnn if key in ("safetensors", "state-dict", "nested", "legacy") else ckpts.patch
    assert torch.allclose(_logits(lm.wrapper), _logits(ref), atol=tol, rtol=0), key
    assert lm.wrapper.info.mean == MEAN and lm.wrapper.info.std == STD
    assert lm.wrapper.num_classes == 4 and lm.wrapper.input_size == (3, 32, 32)
    assert len(lm.sha256) == 64
    if fmt in ("state-dict", "torchscript", "torch-export"):
        assert lm.pickle_scan is not None and not lm.pickle_scan.dangerous
    if ref is ckpts.patch:
        grid = lm.wrapper.token_grid
        assert grid is not None and grid.grid == (8, 8) and grid.stride == 4 and grid.footprint == 4


def test_sniffing_is_by_content(ckpts: Checkpoints, tmp_path: Path) -> None:
    cases = {
        "torchscript": "ts_saved_as.pth",
        "torch-export": "exported_saved_as.pt",
        "state-dict": "weights.bin",
        "onnx": "model.weights",
        "legacy": "legacy.ckpt",
    }
    for key, name in cases.items():
        dst = tmp_path / name
        shutil.copy(ckpts.files[key], dst)
        expected = "state-dict" if key == "legacy" else key
        assert pick_loader(dst).name == expected, (key, name)
        assert load_model(dst, ckpts.options[key]).format == expected


def test_state_dict_needs_arch(ckpts: Checkpoints) -> None:
    with pytest.raises(UsageError, match="--arch") as e:
        load_model(ckpts.files["state-dict"])
    assert one_line(e.value)


def test_state_dict_wrong_arch(ckpts: Checkpoints) -> None:
    with pytest.raises(ModelLoadError):
        load_model(ckpts.files["state-dict"], LoadOptions(arch="bdscan_resnet18", num_classes=4))


def test_nested_keys_and_prefixes(ckpts: Checkpoints, tmp_path: Path) -> None:
    sd = ckpts.cnn.net.state_dict()
    for i, obj in enumerate([{"model": sd}, {"net": sd}, {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
                             {"model": {"state_dict": sd}, "optimizer": {"lr": 0.1}}]):
        p = tmp_path / f"c{i}.pt"
        torch.save(obj, p)
        lm = load_model(p, ckpts.options["state-dict"])
        assert torch.equal(_logits(lm.wrapper), _logits(ckpts.cnn))


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    p = tmp_path / "empty.pt"
    torch.save({"epoch": 1, "lr": 0.1}, p)
    with pytest.raises(ModelLoadError, match="no tensors"):
        load_model(p, LoadOptions(arch="bdscan_cnn6", num_classes=4))


def test_full_pickle_needs_trust(tmp_path: Path) -> None:
    net = PatchNet().eval()
    p = tmp_path / "full.pt"
    torch.save(net, p)
    with pytest.raises(UsageError, match="--trust-pickle") as e:
        load_model(p)
    assert "safetensors" in str(e.value) and one_line(e.value)
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_model(p, fmt="pickle")
    lm = load_model(p, LoadOptions(trust_pickle=True, **NORM))
    assert lm.format == "pickle" and lm.pickle_scan is not None and not lm.pickle_scan.dangerous
    ref = wrap(net, "patchnet")
    assert torch.allclose(_logits(lm.wrapper), _logits(ref), atol=1e-6)
    assert lm.wrapper.token_grid is not None and lm.wrapper.token_grid.grid == (8, 8)


def test_checkpoint_with_python_objects_and_trust(ckpts: Checkpoints, tmp_path: Path) -> None:
    import argparse

    p = tmp_path / "with_args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": ckpts.cnn.net.state_dict()}, p)
    with pytest.raises(UsageError, match=r"argparse\.Namespace"):
        load_model(p, ckpts.options["state-dict"])
    opts = LoadOptions(arch="bdscan_cnn6", num_classes=4, trust_pickle=True, **NORM)
    lm = load_model(p, opts)
    assert torch.equal(_logits(lm.wrapper), _logits(ckpts.cnn))


def test_torchscript_without_metadata_uses_options(tmp_path: Path) -> None:
    net = PatchNet().eval()
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    lm = load_model(p, LoadOptions(**NORM))
    assert lm.wrapper.info.arch == "torchscript"
    assert torch.allclose(_logits(lm.wrapper), _logits(wrap(net, "p")), atol=1e-6)
    grid = lm.wrapper.token_grid
    assert grid is not None and grid.grid == (8, 8) and "TorchScript" in grid.source
    with pytest.raises(UsageError, match="--num-classes"):
        load_model(p, LoadOptions(num_classes=7))
    bare = load_model(p)
    assert bare.wrapper.info.mean == (0.0, 0.0, 0.0) and bare.wrapper.info.std == (1.0, 1.0, 1.0)


def test_torchscript_token_grid_traced_vit_and_scripted_cct(tmp_path: Path) -> None:
    vit = create_net("bdscan_vit", 4, (3, 32, 32)).eval()
    p = tmp_path / "vit.pt"
    torch.jit.save(torch.jit.trace(vit, torch.rand(1, 3, 32, 32)), str(p))
    g = load_model(p).wrapper.token_grid
    assert g is not None and (g.grid, g.stride, g.footprint) == ((8, 8), 4, 4)
    cct = create_net("bdscan_cct", 4, (3, 32, 32)).eval()
    p = tmp_path / "cct.pt"
    torch.jit.save(torch.jit.script(cct), str(p))
    g = load_model(p).wrapper.token_grid
    assert g is not None and g.grid == (8, 8) and g.overlapping  # CCT's tokenizer survives scripting


def test_patch_size_option_overrides(ckpts: Checkpoints) -> None:
    g = load_model(ckpts.files["torchscript"], LoadOptions(patch_size=8)).wrapper.token_grid
    assert g is not None and g.grid == (4, 4) and g.source == "--patch-size 8"


def test_static_batch_exports(tmp_path: Path) -> None:
    net = PatchNet().eval()
    ref = _logits(wrap(net, "p"))
    ep = torch.export.export(net, (torch.rand(1, 3, 32, 32),))
    torch.export.save(ep, str(tmp_path / "static.pt2"))
    lm = load_model(tmp_path / "static.pt2", LoadOptions(**NORM))
    assert any("fixed batch size of 1" in n for n in lm.notes)
    assert torch.allclose(_logits(lm.wrapper), ref, atol=1e-6)
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(tmp_path / "static.onnx"), dynamo=False, opset_version=17)
    lm = load_model(tmp_path / "static.onnx", LoadOptions(**NORM))
    assert any("fixed batch size of 2" in n for n in lm.notes)
    assert torch.allclose(_logits(lm.wrapper), ref, atol=1e-4)
    with pytest.raises(UsageError, match="--input-size"):
        load_model(tmp_path / "static.onnx", LoadOptions(input_size=(3, 64, 64)))


def test_exported_module_gradients(ckpts: Checkpoints) -> None:
    for key in ("torchscript", "torch-export", "onnx"):
        w = load_model(ckpts.files[key]).wrapper
        x = X[:2].clone().requires_grad_(True)
        w(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, key


@pytest.mark.parametrize("arch", list(BDSCAN_ARCHS))
def test_onnx_export_of_every_architecture(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = wrap(create_net(arch, 4, (3, 32, 32)), arch)
    export_onnx(w, tmp_path / f"{arch}.onnx")
    lm = load_model(tmp_path / f"{arch}.onnx")
    assert lm.format == "onnx" and lm.wrapper.info.metadata.get("source_arch") == arch
    assert (_logits(lm.wrapper) - _logits(w)).abs().max().item() < 1e-4
    assert lm.wrapper.token_grid == w.token_grid  # carried in metadata_props
    # the graph takes normalised input, like the original network
    m = onnx.load(str(tmp_path / f"{arch}.onnx"))
    assert json.loads({p.key: p.value for p in m.metadata_props}["bdscan.input"]) == "normalised"


def _gap_model(path: Path, extra_nodes: list | None = None, external: bool = False) -> Path:
    """A 3-class ONNX 'classifier': GlobalAveragePool -> Flatten -> MatMul(W)."""
    vals = torch.tensor([1.0, 0.5, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0]).numpy().tobytes()
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 3], vals, raw=True)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["logits" if not extra_nodes else "z"]),
        *(extra_nodes or []),
    ]
    graph = helper.make_graph(
        nodes, "gap", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def test_onnx_external_data_inside_folder_loads(tmp_path: Path) -> None:
    p = _gap_model(tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "w.bin").exists()
    assert load_model(p).wrapper.num_classes == 3


def external_data_outside(tmp_path: Path, location: str) -> Path:
    """An ONNX model in ``tmp_path/model`` whose external weights point at ``location`` (outside its folder;
    ``link.bin`` is a symlink leading out)."""
    d = tmp_path / "model"
    d.mkdir()
    p = _gap_model(d / "ext.onnx", external=True)
    shutil.copy(d / "w.bin", tmp_path / "w.bin")
    if location == "link.bin":
        (d / "link.bin").symlink_to(tmp_path / "w.bin")
    m = onnx.load(str(p), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    onnx.save(m, str(p))
    return p


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../../w.bin", "link.bin"])
def test_onnx_external_data_outside_folder_refused(tmp_path: Path, location: str) -> None:
    p = external_data_outside(tmp_path, location)
    with pytest.raises(ModelLoadError, match="outside the model's folder") as e:
        load_model(p)
    assert one_line(e.value)


def test_onnx_unsupported_operator_listed(tmp_path: Path) -> None:
    p = _gap_model(tmp_path / "hardmax.onnx", extra_nodes=[helper.make_node("Hardmax", ["z"], ["logits"])])
    with pytest.raises(ModelLoadError, match="Hardmax") as e:
        load_model(p)
    assert one_line(e.value)


def test_onnx_parity_failure_is_reported(ckpts: Checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_io_mod, "PARITY_TOL", -1.0)
    with pytest.raises(ModelLoadError, match="differs from onnxruntime by"):
        load_model(ckpts.files["onnx"])


def test_onnx_wrong_input_count_or_type(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 32, 32])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 32, 32])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 3, 32, 32])
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["o"])], "two", [a, b], [out])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "two.onnx"))
    with pytest.raises(ModelLoadError, match="2 inputs"):
        load_model(tmp_path / "two.onnx")


def test_validate_program_rejects_code() -> None:
    ok = {"graph_module": {"graph": {"nodes": [{"target": "torch.ops.aten.relu.default", "inputs": [], "name": "relu"}]}},
          "guards_code": ["L['x'].size()[0] == 2"], "range_constraints": {"s0": {}}}
    assert validate_program(ok) == []
    bad_cases = [
        {"graph_module": {"graph": {"nodes": [{"target": "torch.os.system", "inputs": []}]}}},
        {"graph_module": {"graph": {"nodes": [{"target": "torch.ops.aten.from_file.default", "inputs": []}]}}},
        {"guards_code": ["__import__('os').system('id') == 0"]},
        {"guards_code": ["L['x'].size()[0] == 2, 'x')\nimport os\n#"]},
        {"x": {"expr_str": "__import__('os').system('id')"}},
        {"x": {"expr_str": "Symbol('s0').__class__"}},
        {"x": {"name": "a = __import__('os')"}},
        {"x": {"parameter_name": "__class__.__init__"}},
        {"metadata": {"custom": "a\rimport os"}},
    ]
    for case in bad_cases:
        assert validate_program(case), case


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "junk.xyz").write_bytes(b"\x01\x02\x03junk")
    with pytest.raises(BdscanError):
        load_model(tmp_path / "junk.xyz")


def test_onnx_conversion_failure_is_one_line(tmp_path: Path) -> None:
    """A Conv whose weight is computed (not an initializer) is valid ONNX that onnx2torch cannot convert."""
    vals = torch.ones(2, 3, 4, 4).numpy().tobytes()
    w = helper.make_tensor("W", TensorProto.FLOAT, [2, 3, 4, 4], vals, raw=True)
    nodes = [
        helper.make_node("Add", ["W", "W"], ["W2"]),
        helper.make_node("Conv", ["input", "W2"], ["c"], strides=[4, 4]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "conv.onnx"))
    with pytest.raises(ModelLoadError, match="onnx2torch cannot convert") as e:
        load_model(tmp_path / "conv.onnx")
    assert one_line(e.value)


@pytest.mark.parametrize("key", ["torchscript", "torch-export", "onnx"])
def test_bf16_inversion_runs_on_every_executable_format(ckpts: Checkpoints, key: str) -> None:
    """--precision bf16 autocasts and holds weights channels-last: both must work on scripted, exported and
    ONNX-converted modules, and leave the model computing what it computed before."""
    from bdscan.data import CleanData
    from bdscan.detect.config import BUDGETS
    from bdscan.detect.inversion import invert
    from bdscan.detect.params import PixelTrigger

    w = load_model(ckpts.files[key]).wrapper
    before = _logits(w)
    data = CleanData(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.arange(16) % 4)
    cfg = BUDGETS["smoke"].with_(steps=2, samples=16, batch_size=8, precision="bf16")
    res = invert(w, data, PixelTrigger(32, 32), [0, 1], cfg)
    assert res.config.precision == "bf16" and len(res.labels) == 2
    assert all(torch.isfinite(r.mask).all() for r in res.labels)
    assert torch.equal(_logits(w), before), key
