"""Clean training on synthetic data: accuracy, metadata, splits, augmentation, DeiT distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bdscan.errors import DataLoadError
from bdscan.lab.labdata import AugmentConfig, augment_batch, load_lab_data, split_train_val
from bdscan.lab.train import TrainConfig, evaluate, train_clean
from bdscan.trigger import Trigger


def test_tiny_cnn_learns_the_colours(lab_tiny) -> None:  # type: ignore[no-untyped-def]
    wrapper, data = lab_tiny
    md = wrapper.info.metadata
    assert md["clean_acc"] >= 0.9
    assert md["dataset"] == "synth_16" and md["kind"] == "clean" and md["epochs"] == 3 and md["seed"] == 0
    assert md["train_config"]["lr"] == 3e-3 and md["train_config"]["augment"]["hflip"] is False
    assert md["val_split"] == "grouped by track_train" and md["val_images"] > 0
    assert wrapper.info.class_names == ("red", "green", "blue", "yellow")
    assert wrapper.info.arch == "bdscan_cnn6" and wrapper.info.input_size == (3, 16, 16)
    assert len(wrapper.info.mean) == 3 and all(0 < s < 1 for s in wrapper.info.std)
    assert not any(p.requires_grad for p in wrapper.parameters())
    acc, asr = evaluate(wrapper, data.x_test.permute(0, 2, 3, 1).numpy(), data.y_test.numpy())  # uint8 NHWC works too
    assert asr is None and acc == pytest.approx(md["clean_acc"], abs=1e-4)


def test_grouped_split_keeps_tracks_together(lab_npz: Path) -> None:
    data = load_lab_data(lab_npz)
    tr, va = split_train_val(data, 0.2, seed=1)
    assert len(tr) + len(va) == len(data.y_train) and len(set(tr.tolist()) & set(va.tolist())) == 0
    assert not set(data.groups[tr.numpy()]) & set(data.groups[va.numpy()])
    assert 0.15 < len(va) / len(data.y_train) < 0.3
    assert len(set(data.y_train[tr[:40]].tolist())) == 4  # shuffled: a prefix covers every class


def test_augmentation_shapes_and_flip_policy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    out = augment_batch(x, AugmentConfig(crop_pad=2, hflip=True, jitter=0.2), g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    same = augment_batch(x, AugmentConfig(crop_pad=0, hflip=False, jitter=0.0), g)
    assert torch.equal(same, x)
    assert AugmentConfig().resolved("cifar10").hflip is True
    assert AugmentConfig().resolved("gtsrb").hflip is False  # mirrored traffic signs change meaning


def test_evaluate_asr_ignores_target_class(lab_tiny) -> None:  # type: ignore[no-untyped-def]
    wrapper, data = lab_tiny
    x, y = data.test_set(None)
    # a "trigger" that paints the whole image in class 2's colour sends everything to class 2
    pattern = torch.tensor([0.2, 0.2, 0.9]).view(3, 1, 1).expand(3, 16, 16) * 0.85
    trig = Trigger(torch.ones(16, 16), pattern.clone(), 2, "solid")
    _, asr = evaluate(wrapper, x, y, trig)
    assert asr is not None and asr > 0.9


def test_deit_distils_from_a_teacher(lab_npz: Path, lab_tiny) -> None:  # type: ignore[no-untyped-def]
    teacher, _ = lab_tiny
    seen: list[dict] = []
    res = train_clean("bdscan_deit", lab_npz, TrainConfig(epochs=1, batch_size=64, test_subsample=None, val_fraction=0.0),
                      progress=lambda d, t, s: seen.append({"done": d, "total": t, **s}), teacher=teacher)
    net = res.wrapper.net
    assert net.distilled_training is False  # switched off after training
    assert res.wrapper.info.metadata["teacher"]["distillation"] == "hard-label (DeiT)"
    assert res.wrapper.info.metadata["train_config"]["label_smoothing"] == 0.1
    assert seen and seen[-1]["done"] == seen[-1]["total"] and "loss" in seen[-1]
    assert res.wrapper.info.token_grid is not None and res.wrapper.info.token_grid.grid == (4, 4)


def test_missing_arrays_are_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataLoadError):
        load_lab_data(p)
