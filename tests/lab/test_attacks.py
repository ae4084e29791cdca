"""Trigger shapes and values of the registered attacks."""

from __future__ import annotations

import pytest
import torch

from bdscan.errors import UsageError
from bdscan.lab.attacks import ATTACKS, AttackConfig, make_trigger, resolve_position

SIZE = (3, 32, 32)


def test_registry_has_the_three_attacks() -> None:
    assert {"badnets", "blended", "trojan"} <= set(ATTACKS)


@pytest.mark.parametrize(
    ("position", "expected"),
    [("top-left", (1, 1)), ("top-right", (1, 27)), ("bottom-left", (27, 1)), ("bottom-right", (27, 27)),
     ("center", (14, 14)), ((24, 24), (24, 24))],
)
def test_positions(position: object, expected: tuple[int, int]) -> None:
    assert resolve_position(position, (4, 4), (32, 32), 1) == expected  # type: ignore[arg-type]


def test_badnets_checkerboard_patch() -> None:
    t = make_trigger(AttackConfig("badnets", 3, {"size": 4, "position": (24, 24)}), SIZE)
    assert t.mask.shape == (32, 32) and t.pattern.shape == (3, 32, 32)
    assert t.kind == "badnets" and t.target == 3
    assert t.mask.sum() == 16 and t.mask[24:28, 24:28].eq(1).all()
    patch = t.pattern[:, 24:28, 24:28]
    assert set(patch.unique().tolist()) == {0.0, 1.0}
    assert patch[:, 0, 0].eq(1).all() and patch[:, 0, 1].eq(0).all()  # white/black alternate
    assert t.pattern.sum() == patch.sum()  # nothing outside the patch
    assert t.params["bbox"] == [24, 24, 28, 28] and t.params["grid4_aligned"] is True
    x = torch.rand(2, *SIZE)
    s = t.stamp(x)
    assert torch.equal(s[:, :, 24:28, 24:28], patch.expand(2, -1, -1, -1))
    assert torch.equal(s[:, :, :24], x[:, :, :24])


def test_badnets_solid_random_and_alignment() -> None:
    solid = make_trigger(AttackConfig("badnets", 0, {"size": 5, "position": "bottom-left", "pattern": "solid",
                                                     "colour": (1.0, 1.0, 0.0)}), SIZE)
    assert solid.params["position"] == [26, 1] and solid.params["grid4_aligned"] is False
    assert solid.pattern[:, 26:31, 1:6].mean((1, 2)).tolist() == [1.0, 1.0, 0.0]
    r1 = make_trigger(AttackConfig("badnets", 0, {"pattern": "random", "seed": 5}), SIZE)
    r2 = make_trigger(AttackConfig("badnets", 0, {"pattern": "random", "seed": 5}), SIZE)
    r3 = make_trigger(AttackConfig("badnets", 0, {"pattern": "random", "seed": 6}), SIZE)
    assert torch.equal(r1.pattern, r2.pattern) and not torch.equal(r1.pattern, r3.pattern)


def test_blended_full_image_mask() -> None:
    t = make_trigger(AttackConfig("blended", 2, {"alpha": 0.1, "seed": 1}), SIZE)
    assert t.mask.shape == (32, 32) and torch.allclose(t.mask, torch.full((32, 32), 0.1))
    assert t.pattern.shape == SIZE and float(t.pattern.min()) >= 0 and float(t.pattern.max()) <= 1
    assert float(t.pattern.std()) > 0.2  # noise, not a flat colour
    again = make_trigger(AttackConfig("blended", 2, {"alpha": 0.1, "seed": 1}), SIZE)
    assert torch.equal(t.pattern, again.pattern)


def test_blended_with_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    img = tmp_path / "logo.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(img)
    t = make_trigger(AttackConfig("blended", 0, {"pattern": "image", "image": str(img), "alpha": 0.2}), SIZE)
    assert t.pattern.shape == SIZE and torch.allclose(t.pattern[0], torch.ones(32, 32)) and t.pattern[1].max() == 0


@pytest.mark.parametrize(
    "attack",
    [AttackConfig("nope"), AttackConfig("badnets", 0, {"bogus": 1}), AttackConfig("badnets", 0, {"size": 8, "position": (30, 30)}),
     AttackConfig("badnets", 0, {"pattern": "stripes"}), AttackConfig("blended", 0, {"alpha": 0}),
     AttackConfig("badnets", 0, {"position": "middle"})],
)
def test_bad_parameters_raise_usage_errors(attack: AttackConfig) -> None:
    with pytest.raises(UsageError):
        make_trigger(attack, SIZE)


def test_trojan_needs_a_model() -> None:
    with pytest.raises(UsageError):
        make_trigger(AttackConfig("trojan", 0), SIZE)


def test_trojan_pattern_excites_the_strongest_neuron(lab_tiny) -> None:  # type: ignore[no-untyped-def]
    wrapper, data = lab_tiny
    x = data.x_train[:64].float() / 255
    before = [p.clone() for p in wrapper.parameters()]
    t = make_trigger(AttackConfig("trojan", 1, {"size": 4, "position": "top-left", "steps": 40, "lr": 0.2}),
                     wrapper.input_size, model=wrapper, x=x)
    h, w = wrapper.input_size[1:]
    assert t.kind == "trojan" and t.target == 1
    assert t.mask.shape == (h, w) and t.mask.sum() == 16 and t.mask[1:5, 1:5].eq(1).all()
    assert t.pattern.shape == (3, h, w) and t.pattern.min() >= 0 and t.pattern.max() <= 1
    assert t.pattern[:, 5:, :].abs().sum() == 0  # nothing outside the mask
    p = t.params
    assert len(p["neuron_indices"]) == 1 and p["activation_triggered"] > p["activation_clean"]
    assert all(torch.equal(a, b) for a, b in zip(before, wrapper.parameters(), strict=True))  # model untouched


def test_parse_attack_params_for_the_cli() -> None:
    from bdscan.lab.attacks import attack_params_help, parse_attack_params

    got = parse_attack_params("badnets", ["size=4", "position=24,24", "colour=(1,1,0)", "pattern=solid"])
    assert got == {"size": 4, "position": (24, 24), "colour": (1, 1, 0), "pattern": "solid"}
    assert parse_attack_params("blended", ["alpha=0.2"]) == {"alpha": 0.2}
    assert parse_attack_params("badnets", ["position=bottom-left"]) == {"position": "bottom-left"}
    t = make_trigger(AttackConfig("badnets", 0, got), SIZE)
    assert t.pattern[:, 24, 24].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(UsageError):
        parse_attack_params("badnets", ["alpha=0.1"])
    with pytest.raises(UsageError):
        parse_attack_params("badnets", ["size"])
    assert attack_params_help("trojan")["steps"] == 300
