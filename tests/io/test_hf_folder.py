"""Hugging Face and timm model folders, torchvision weights by name (issue #26): tiny configs built here, no hub."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.errors import ModelLoadError, UnsafeModelError, UsageError
from bdscan.io import load_model

transformers = pytest.importorskip("transformers")
runner = CliRunner()

SIZE = 32
PRE = {"do_resize": True, "size": {"height": SIZE, "width": SIZE}, "do_rescale": True, "rescale_factor": 1 / 255,
       "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
#: model_type -> (config class, tiny config kwargs, expected grid (rows, stride) or None)
TINY = {
    "vit": ("ViTConfig", {"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 64}, (4, 8)),
    "deit": ("DeiTConfig", {"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64}, (4, 8)),
    "beit": ("BeitConfig", {"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "use_mean_pooling": True}, (4, 8)),
    "swin": ("SwinConfig", {"image_size": SIZE, "patch_size": 4, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2],
                            "window_size": 4}, (8, 4)),
    "convnext": ("ConvNextConfig", {"image_size": SIZE, "patch_size": 4, "hidden_sizes": [8, 16], "depths": [1, 1],
                                    "num_stages": 2}, (8, 4)),
    "resnet": ("ResNetConfig", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}, None),
}


def save_hf(kind: str, folder: Path, classes: int = 3, **save: object) -> torch.nn.Module:
    cls_name, kw, _ = TINY[kind]
    cfg = getattr(transformers, cls_name)(num_labels=classes, id2label={i: f"c{i}" for i in range(classes)},
                                          label2id={f"c{i}": i for i in range(classes)}, **kw)
    torch.manual_seed(0)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    name = names[kind] if isinstance(names[kind], str) else names[kind][0]
    model = getattr(transformers, name)(cfg).eval()
    model.save_pretrained(str(folder), **save)
    (folder / "preprocessor_config.json").write_text(json.dumps(PRE))
    return model


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=(x - 0.5) / 0.25).logits


@pytest.mark.parametrize("kind", sorted(TINY))
def test_each_architecture_loads_with_its_grid_and_logits(kind: str, tmp_path: Path) -> None:
    model = save_hf(kind, tmp_path / kind)
    lm = load_model(tmp_path / kind)
    info = lm.wrapper.info
    assert lm.format == "hf-folder" and info.arch.startswith("hf:") and info.num_classes == 3
    assert info.input_size == (3, SIZE, SIZE) and info.class_names == ("c0", "c1", "c2")
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3
    expected = TINY[kind][2]
    if expected is None:
        assert info.token_grid is None
    else:
        assert (info.token_grid.grid[0], info.token_grid.stride) == expected
        assert "Hugging Face config" in info.token_grid.source
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(lm.wrapper(x), reference(model, x), atol=1e-5)


def test_sharded_safetensors_and_bin_load(tmp_path: Path) -> None:
    model = save_hf("vit", tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "sharded").wrapper(x), reference(model, x), atol=1e-5)
    binf = tmp_path / "bin"
    save_hf("vit", binf)
    from safetensors.torch import load_file

    torch.save(load_file(str(binf / "model.safetensors")), binf / "pytorch_model.bin")
    (binf / "model.safetensors").unlink()
    lm = load_model(binf)
    assert lm.pickle_scan is not None and not lm.pickle_scan.dangerous


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (__import__("os").system, ("touch /tmp/bdscan-hf-pwned",))


def test_hostile_bin_is_refused_without_running(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    save_hf("vit", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Evil()}, protocol=4))
    marker = Path("/tmp/bdscan-hf-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError):
        load_model(folder)
    r = runner.invoke(app, ["scan", str(folder), "--data", str(folder)])
    assert r.exit_code == 1 and not marker.exists()


def test_remote_code_config_is_refused_without_running(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    save_hf("vit", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("open('/tmp/bdscan-hf-remote', 'w').write('x')\n")
    Path("/tmp/bdscan-hf-remote").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="never runs code"):
        load_model(folder)
    r = runner.invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 3 and not Path("/tmp/bdscan-hf-remote").exists()
    assert len([ln for ln in r.output.strip().splitlines() if ln.strip()]) == 1


def test_missing_transformers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf("vit", tmp_path / "m")
    import bdscan.io.hf_folder as hf

    real = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(UsageError) as e:
        load_model(tmp_path / "m")
    assert "pip install 'bdscan[hf]'" in str(e.value)


def test_inspect_shows_the_grid_and_its_source(tmp_path: Path) -> None:
    save_hf("swin", tmp_path / "swin")
    r = runner.invoke(app, ["inspect", str(tmp_path / "swin"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    grid = d["token_grid"] if "token_grid" in d else d["model"]["token_grid"]
    assert grid["grid"] == [8, 8] and "windows" in grid["source"]


def test_timm_folder_loads(tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8, depth=1).eval()
    save_for_hf(net, str(tmp_path / "t"), safe_serialization=True, model_args={"img_size": 32, "patch_size": 8, "depth": 1})
    lm = load_model(tmp_path / "t")
    assert lm.format == "timm-folder" and lm.wrapper.info.input_size == (3, 32, 32)
    assert lm.wrapper.token_grid.grid == (4, 4)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(lm.wrapper.info.mean).view(1, 3, 1, 1), torch.tensor(lm.wrapper.info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(lm.wrapper(x), net((x - mean) / std), atol=1e-5)


def test_torchvision_by_name(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    from bdscan.io import LoadOptions

    net = resnet18(num_classes=5).eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    lm = load_model(tmp_path / "w.pth", LoadOptions(arch="torchvision:resnet18", input_size=(3, 64, 64)))
    assert lm.wrapper.info.num_classes == 5 and lm.wrapper.info.mean == (0.485, 0.456, 0.406)
    with pytest.raises(UsageError, match="torchvision"):
        load_model(tmp_path / "w.pth", LoadOptions(arch="torchvision:nope"))
