"""The evaluation zoo's base training: recipes, the complete CIFAR-10 split, resumable and deterministic training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import bdscan.lab.zoo as zoo
import bdscan.machine
from bdscan.errors import UsageError
from bdscan.io import load_model
from bdscan.lab.base import autocast_dtype, load_base_data, train_base
from bdscan.lab.labdata import extra_train_files, load_lab_data
from bdscan.lab.recipes import Recipe, augment_batch_u8, base_recipe, get_recipe, list_recipes, register_recipe
from tests.lab.helpers import make_synthetic

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ARCHS = ("bdscan_cnn6", "bdscan_resnet18", "bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct")


def _tiny(**kw: object) -> Recipe:
    """A recipe small enough for a test: every augmentation and mixing path switched on."""
    base = dict(name="synth_cnn6", arch="bdscan_cnn6", dataset="synth", arch_kwargs={"width": 4}, epochs=2, batch_size=32,
                optimizer="adamw", lr=3e-3, warmup_epochs=0.5, crop_pad=2, hflip=True, auto_augment="trivialaugment",
                aug_group=4, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.5, monitor_test=40)
    base.update(kw)
    return Recipe(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("basedata")
    make_synthetic(d / "synth_32.npz", n_train=128, n_test=48)
    return d


# ------------------------------------------------------------------------------------------- recipes


def test_every_base_has_a_recipe_that_builds() -> None:
    for ds in ("gtsrb", "cifar10"):
        for arch in ARCHS:
            r = base_recipe(ds, arch)
            assert r.dataset == ds and r.arch == arch and r.name in list_recipes(ds)
            assert r.hflip is (ds == "cifar10")  # a mirrored traffic sign means something else
            assert r.use_extra_train and r.label_smoothing > 0 and r.crop_pad > 0
            if arch not in ("bdscan_cnn6", "bdscan_resnet18"):  # transformers need the strong augmentation
                assert r.auto_augment != "none" and r.mix_prob > 0 and r.optimizer == "adamw"
            assert r.teacher_arch == ("bdscan_resnet18" if arch == "bdscan_deit" else None)
            net = timm.create_model(arch, num_classes=43, img_size=32, **r.arch_kwargs)
            assert sum(p.numel() for p in net.parameters()) < 2_000_000  # sized for 2 CPU cores
    assert get_recipe("gtsrb_vit").arch_kwargs == get_recipe("gtsrb_deit").arch_kwargs  # compared at equal size
    with pytest.raises(UsageError):
        get_recipe("nope")


def test_recipe_digest_and_registry() -> None:
    r = _tiny()
    assert r.digest() == Recipe.from_dict(r.to_dict()).digest()
    assert r.with_overrides(notes="why").digest() == r.digest()  # notes do not change the weights
    assert r.with_overrides(epochs=3).digest() != r.digest() and r.with_overrides(epochs=None) is r
    register_recipe(r)
    register_recipe(r)  # the same recipe twice is fine
    with pytest.raises(UsageError):
        register_recipe(r.with_overrides(epochs=5))
    with pytest.raises(UsageError):
        _tiny(auto_augment="autoaugment")
    with pytest.raises(UsageError):
        _tiny(mixup_alpha=0.0, cutmix_alpha=0.0)


def test_batch_augmentation_is_seeded_and_keeps_shapes() -> None:
    x = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)

    def run() -> torch.Tensor:
        torch.manual_seed(1)
        return augment_batch_u8(x, _tiny(), torch.Generator().manual_seed(2))

    a, b = run(), run()
    assert a.dtype == torch.float32 and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, x.float() / 255)
    plain = augment_batch_u8(x, _tiny(crop_pad=0, hflip=False, auto_augment="none"), torch.Generator())
    assert torch.equal(plain, x.float() / 255)


# ------------------------------------------------------------------------------ the complete training split


def test_extra_training_archive_is_appended(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "cifar10_32.npz", n_train=40, n_test=12)
    make_synthetic(tmp_path / "part.npz", n_train=24, n_test=4, seed=1)
    with np.load(tmp_path / "part.npz") as d:  # an extra archive holds training images only
        np.savez_compressed(tmp_path / "cifar10_train_extra_32.npz", x_train=d["x_train"], y_train=d["y_train"])
    assert extra_train_files(tmp_path / "cifar10_32.npz") == [tmp_path / "cifar10_train_extra_32.npz"]
    assert extra_train_files(tmp_path / "part.npz") == []
    alone = load_lab_data(tmp_path / "cifar10_32.npz")
    both = load_base_data(base_recipe("cifar10", "bdscan_cnn6"), tmp_path)
    assert len(alone.y_train) == 40 and len(both.y_train) == 64 and len(both.y_test) == 12
    assert torch.equal(both.x_train[:40], alone.x_train) and both.name == "cifar10"
    assert [Path(f).name for f in both.train_files] == ["cifar10_32.npz", "cifar10_train_extra_32.npz"]
    only_first = load_base_data(base_recipe("cifar10", "bdscan_cnn6").with_overrides(use_extra_train=False), tmp_path)
    assert len(only_first.y_train) == 40


@pytest.mark.skipif(not (SHARED / "cifar10_train_extra_32.npz").exists(), reason="no shared/data here")
def test_real_cifar10_training_split_is_complete() -> None:
    extra = extra_train_files(SHARED / "cifar10_32.npz")
    assert [p.name for p in extra] == ["cifar10_train_extra_32.npz"]
    ys = [np.load(p, allow_pickle=False)["y_train"] for p in (SHARED / "cifar10_32.npz", *extra)]
    assert np.bincount(np.concatenate(ys)).tolist() == [5000] * 10


# ---------------------------------------------------------------------------------- resumable training


class _Stop(Exception):
    pass


def _stop_after_first(rec: dict) -> None:
    if rec["epoch"] == 1:
        raise _Stop


def test_interrupted_run_resumes_to_the_same_weights(synth_dir: Path, tmp_path: Path) -> None:
    recipe = _tiny()
    full = train_base(recipe, tmp_path / "a", data_dir=synth_dir)
    assert not full.skipped and len(full.history) == 2 and full.path.name == "synth_cnn6_base.safetensors"

    with pytest.raises(_Stop):
        train_base(recipe, tmp_path / "b", data_dir=synth_dir, on_epoch=_stop_after_first)
    ckpt = tmp_path / "b" / "synth_cnn6_base.ckpt.pt"
    assert ckpt.exists() and not (tmp_path / "b" / "synth_cnn6_base.safetensors").exists()
    with pytest.raises(UsageError):  # a checkpoint is never resumed under another recipe
        train_base(recipe.with_overrides(lr=1e-3), tmp_path / "b", data_dir=synth_dir)
    seen: list[int] = []
    resumed = train_base(recipe, tmp_path / "b", data_dir=synth_dir, on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [2] and not ckpt.exists()  # only epoch 2 ran; the finished model supersedes the checkpoint

    a, b = load_file(str(full.path)), load_file(str(resumed.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]

    other = load_file(str(train_base(recipe.with_overrides(seed=1), tmp_path / "c", data_dir=synth_dir).path))
    assert not all(torch.equal(a[k], other[k]) for k in a)  # the equality above is not trivial

    again = train_base(recipe, tmp_path / "b", data_dir=synth_dir)  # a rerun of a finished command does nothing
    assert again.skipped and again.clean_acc == resumed.clean_acc


def test_base_metadata_and_round_trip(synth_dir: Path, tmp_path: Path) -> None:
    res = train_base(_tiny(epochs=1), tmp_path, data_dir=synth_dir)
    loaded = load_model(res.path)
    md = loaded.wrapper.info.metadata
    assert md["test_images"] == 48 and md["clean_acc"] == round(res.clean_acc, 4)  # the full test split
    assert md["recipe"]["arch_kwargs"] == {"width": 4} and md["recipe_name"] == "synth_cnn6"
    assert md["weights_dtype"] == "float16" and "1 thread(s)" in md["machine"] and md["train_seconds"] >= 0  # 0.1-s steps: 0.0 is possible
    assert md["dataset_files"] == ["synth_32.npz"] and md["train_images"] == 128 and len(md["history"]) == 1
    assert loaded.wrapper.info.arch_kwargs == {"width": 4}  # rebuilt at the trained size
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(loaded.wrapper(x), res.wrapper(x), atol=1e-4)


def test_deit_distils_from_the_resnet_base(synth_dir: Path, tmp_path: Path) -> None:
    teacher = train_base(_tiny(name="synth_resnet18", arch="bdscan_resnet18", arch_kwargs={}, epochs=1), tmp_path,
                         data_dir=synth_dir)
    deit = _tiny(name="synth_deit", arch="bdscan_deit", arch_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2},
                 epochs=1, teacher_arch="bdscan_resnet18")
    res = train_base(deit, tmp_path, data_dir=synth_dir)
    t = res.wrapper.info.metadata["teacher"]
    assert t["file"] == teacher.path.name and t["arch"] == "bdscan_resnet18" and len(t["sha256"]) == 64
    assert res.wrapper.net.distilled_training is False
    with pytest.raises(UsageError):  # no teacher trained in that folder
        train_base(deit, tmp_path / "empty", data_dir=synth_dir)


def test_train_base_command_line(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    register_recipe(_tiny(name="synth_cli", epochs=1))
    out = tmp_path / "out"
    rc = zoo.main(["train-base", "--recipe", "synth_cli", "--out", str(out), "--data-dir", str(synth_dir), "--max-train", "64"])
    assert rc == 0 and (out / "synth_cli_base.safetensors").exists() and (out / "synth_cli_base.history.json").exists()
    assert load_model(out / "synth_cli_base.safetensors").wrapper.info.metadata["train_images"] == 64
    assert zoo.main(["train-base", "--out", str(out)]) == 2  # neither a recipe nor --dataset/--arch
    assert zoo.main(["recipes"]) == 0 and "gtsrb_vit" in capsys.readouterr().out
    assert zoo.main(["--list", "--out", str(tmp_path / "sample")]) == 0  # the lab zoo's command line still works
    assert "gtsrb_cnn6_clean" in capsys.readouterr().out


def test_bf16_autocast_only_on_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bdscan.machine, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(torch.device("cpu")) is None  # emulated bf16 is slower than float32
    monkeypatch.setattr(bdscan.machine, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
