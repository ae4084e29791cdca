"""The evaluation zoo's Hugging Face folder rows (issues #23, #26): a timm ViT base converted to transformers'
ViT (same logits), fine-tuned and written as a ``save_pretrained`` folder that transformers and bdscan both load,
deterministically (same sha256 when rebuilt), measured, skipped when built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

from bdscan.errors import UsageError
from bdscan.io import load_model, save_safetensors
from bdscan.io.base import sha256_file
from bdscan.lab.evalzoo import Paths, build, read_rows, write_rows
from bdscan.lab.evalzoo_finetune import FinetuneRecipe
from bdscan.lab.evalzoo_plan import make_row
from bdscan.models.wrapper import ModelInfo, ModelWrapper

transformers = pytest.importorskip("transformers")
from bdscan.lab.hf import convert, timm_vit_to_hf  # noqa: E402  (needs transformers)

KW = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY = FinetuneRecipe(steps=30, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0.0, warmup_steps=2)


def _vit(seed: int = 0) -> ModelWrapper:
    torch.manual_seed(seed)
    net = timm.create_model("bdscan_vit", num_classes=4, img_size=16, **KW).eval()
    info = ModelInfo("bdscan_vit", 4, (3, 16, 16), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 1.0,
                     ("stop", "yield", "left", "right"), arch_kwargs=dict(KW))
    return ModelWrapper(net, info)


def test_conversion_keeps_the_logits_names_and_scaling() -> None:
    w = _vit()
    h = timm_vit_to_hf(w).eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(w(x), h(x), atol=1e-5)
    assert h.info.arch == "hf:ViTForImageClassification" and h.info.class_names == w.info.class_names
    assert h.info.mean == w.info.mean and h.info.std == w.info.std
    assert h.info.token_grid is not None and h.info.token_grid.grid == (4, 4) and h.info.token_grid.stride == 4
    cfg = h.net.model.config
    assert cfg.id2label[2] == "left" and cfg.layer_norm_eps == pytest.approx(1e-6)
    # the converter is found by name, as a manifest row names it
    with torch.no_grad():
        assert torch.allclose(convert("timm-vit-to-hf", w)(x), w(x), atol=1e-5)


def test_conversion_refuses_what_is_not_a_plain_vit() -> None:
    deit = timm.create_model("bdscan_deit", num_classes=4, img_size=16, **KW)
    with pytest.raises(UsageError, match="plain timm ViT"):
        timm_vit_to_hf(ModelWrapper(deit, ModelInfo("bdscan_deit", 4, (3, 16, 16))))
    with pytest.raises(UsageError, match="unknown model converter"):
        convert("onnx-to-keras", _vit())


def _rows() -> list[dict]:
    common = {"cell": "synth_hfvit", "format": "hf-folder", "base": "bases/synth_vit_base.safetensors", "convert": "timm-vit-to-hf"}
    return [
        make_row("synth_hfvit_clean1", "hf_vit", "synth", None, None, None, None, 21, "calibration", TINY, **common),
        make_row("synth_hfvit_badnets_grid", "hf_vit", "synth", "badnets_small", 2,
                 {"name": "badnets", "params": {"size": 4, "position": [8, 8]}}, "synth_hfvit_clean1", 22, "evaluation",
                 FinetuneRecipe(**{**TINY.to_dict(), "poison_rate": 0.3, "steps": 120}), **common),
    ]


@pytest.fixture(scope="module")
def folder_zoo(lab_npz: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hfzoo")
    (root / "bases").mkdir()
    (root / "data").mkdir()
    save_safetensors(_vit(), root / "bases" / "synth_vit_base.safetensors")
    shutil.copy(lab_npz, root / "data" / "synth_32.npz")
    write_rows(root / "manifest.json", _rows())
    paths = Paths(root / "manifest.json", data=root / "data")
    torch.set_num_threads(1)
    return root, paths, build(read_rows(paths.manifest), paths, threads=1)


def test_folder_rows_are_built_as_folders_transformers_loads(folder_zoo) -> None:  # type: ignore[no-untyped-def]
    root, paths, outcomes = folder_zoo
    assert [o.status for o in outcomes] == ["built", "built"]
    rows = {r["name"]: r for r in read_rows(paths.manifest)}
    for name, r in rows.items():
        folder = root / r["file"]
        assert folder.is_dir() and {"config.json", "model.safetensors", "preprocessor_config.json", "bdscan.json"} <= {
            p.name for p in folder.iterdir()}
        assert r["sha256"] == sha256_file(folder) and 0 <= r["clean_acc"] <= 1
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())  # readable, as any written model
        assert not [p for p in root.joinpath("models").iterdir() if p.name.startswith(".")]  # no temporary left
        lm = load_model(folder)
        assert lm.wrapper.info.arch.startswith("hf:") and lm.wrapper.info.class_names == ("stop", "yield", "left", "right")
        assert lm.wrapper.info.metadata["zoo_name"] == name and lm.wrapper.info.metadata["clean_acc"] == r["clean_acc"]
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        mean, std = (torch.tensor(pre[k]).view(1, -1, 1, 1) for k in ("image_mean", "image_std"))
        with torch.no_grad():
            assert torch.allclose(model(pixel_values=(x - mean) / std).logits, lm.wrapper.eval()(x), atol=1e-4)
        if r["attack"]:
            assert lm.original_trigger is not None and lm.original_trigger.target == 2 and r["asr"] is not None
        else:
            assert r["asr"] is None and lm.original_trigger is None
    # the backdoor was learnt through the converted model (the poisoned images reached the transformers ViT)
    assert rows["synth_hfvit_badnets_grid"]["asr"] >= 0.5


def test_folder_rows_rebuild_to_the_same_bytes_and_skip_when_built(folder_zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, paths, _ = folder_zoo
    assert [o.status for o in build(read_rows(paths.manifest), paths, threads=1)] == ["skipped", "skipped"]
    other = Paths(paths.manifest, data=paths.data, out=tmp_path / "again")
    again = build([r for r in read_rows(paths.manifest) if r["name"] == "synth_hfvit_clean1"], other, threads=1)
    assert [o.status for o in again] == ["reproduced"]
