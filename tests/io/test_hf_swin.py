"""A Swin positive control in the Hugging Face layout (bdscan.lab.hf, issue #26): the written folder loads back
through bdscan's loader with the same logits and the patch embedding's token grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdscan.io import load_model
from bdscan.lab.attacks import AttackConfig
from tests.synth import synthetic

pytest.importorskip("transformers")


def test_swin_control_round_trips_with_the_embedding_grid(tmp_path: Path) -> None:
    from bdscan.lab.hf import train_hf_control

    train = synthetic(32, 4, 16, seed=0)
    attack = AttackConfig("badnets", 1, {"size": 3, "position": "bottom-right", "margin": 1})
    c = train_hf_control(train, tmp_path / "swin", attack, epochs=1, arch="swin")
    assert c.wrapper.info.arch == "hf:SwinForImageClassification"
    lm = load_model(c.folder)
    assert lm.format == "hf-folder" and lm.wrapper.info.arch == "hf:SwinForImageClassification"
    grid = lm.wrapper.token_grid
    assert grid is not None and grid.grid == (8, 8) and grid.stride == 2  # 16 px / patch_size 2
    assert "swin patch_size 2" in grid.source and "4×4-token windows" in grid.source
    assert grid.grid == c.wrapper.token_grid.grid and grid.stride == c.wrapper.token_grid.stride
    assert lm.original_trigger is not None and lm.original_trigger.target == 1
    x = train.x[:6]
    with torch.no_grad():
        torch.testing.assert_close(lm.wrapper.eval()(x), c.wrapper.eval()(x), rtol=1e-4, atol=1e-5)


def test_unknown_control_architecture_is_a_usage_error(tmp_path: Path) -> None:
    from bdscan.errors import UsageError
    from bdscan.lab.hf import train_hf_control

    with pytest.raises(UsageError, match="unknown HF control architecture"):
        train_hf_control(synthetic(8, 2, 16, seed=0), tmp_path / "x", arch="resnet")
