"""Backdoor injection on a tiny model, and the original trigger's round trip through safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdscan.errors import UsageError
from bdscan.io import load_model, save_safetensors
from bdscan.lab.attacks import AttackConfig
from bdscan.lab.inject import InjectConfig, inject

FAST = InjectConfig(epochs=4, lr=3e-3, batch_size=32, poison_rate=0.2, test_subsample=None, max_train=0)


@pytest.fixture(scope="module")
def badnets(lab_tiny, lab_npz: Path):  # type: ignore[no-untyped-def]
    wrapper, _ = lab_tiny
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    res = inject(wrapper, lab_npz, AttackConfig("badnets", 1, {"size": 4, "position": "bottom-right"}), FAST)
    assert all(torch.equal(v, wrapper.state_dict()[k]) for k, v in before.items())  # the clean model is untouched
    return res


def test_badnets_injection_reaches_high_asr(badnets) -> None:  # type: ignore[no-untyped-def]
    assert badnets.asr >= 0.9
    assert badnets.clean_acc >= badnets.clean_twin_acc - 0.05
    md = badnets.wrapper.info.metadata
    assert md["attack_success_rate"] == round(badnets.asr, 4) and md["clean_acc"] == round(badnets.clean_acc, 4)
    assert md["clean_twin_acc"] == round(badnets.clean_twin_acc, 4) and md["clean_twin_asr"] < 0.5
    assert md["attack"]["name"] == "badnets" and md["attack"]["bbox"] == [11, 11, 15, 15]
    assert md["target"] == 1 and md["target_name"] == "green" and md["poison_rate"] == 0.2
    assert badnets.trigger.kind == "badnets" and badnets.trigger.target == 1


def test_original_trigger_round_trips(badnets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bd.safetensors"
    save_safetensors(badnets.wrapper, path, trigger=badnets.trigger)
    loaded = load_model(path)
    t = loaded.original_trigger
    assert t is not None and t.target == 1 and t.kind == "badnets"
    assert torch.equal(t.mask, badnets.trigger.mask) and torch.equal(t.pattern, badnets.trigger.pattern)
    assert t.params["bbox"] == [11, 11, 15, 15]
    assert loaded.wrapper.info.metadata["attack_success_rate"] == round(badnets.asr, 4)
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(loaded.wrapper(x), badnets.wrapper(x), atol=1e-5)


@pytest.mark.parametrize(
    ("attack", "min_asr"),
    [(AttackConfig("blended", 0, {"alpha": 0.5}), 0.8), (AttackConfig("trojan", 2, {"size": 4, "steps": 30}), 0.8)],
)
def test_blended_and_trojan_inject(lab_tiny, lab_npz: Path, attack: AttackConfig, min_asr: float) -> None:  # type: ignore[no-untyped-def]
    wrapper, _ = lab_tiny
    seen: list[dict] = []
    res = inject(wrapper, lab_npz, attack, FAST, progress=lambda d, t, s: seen.append(s))
    assert res.asr >= min_asr and res.trigger.kind == attack.name
    assert {s.get("phase", "") for s in seen} >= {f"inject {attack.name} into bdscan_cnn6"}


def test_bad_target_is_a_usage_error(lab_tiny, lab_npz: Path) -> None:  # type: ignore[no-untyped-def]
    wrapper, _ = lab_tiny
    with pytest.raises(UsageError):
        inject(wrapper, lab_npz, AttackConfig("badnets", 9), FAST)
    with pytest.raises(UsageError):
        inject(wrapper, lab_npz, AttackConfig("badnets", 0), InjectConfig(poison_rate=1.5))
