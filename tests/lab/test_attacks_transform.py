"""The evaluation zoo's new attacks: SIG, WaNet, ISSBA-style, the procedural blended picture and the large patch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bdscan.errors import UsageError
from bdscan.io import load_model, save_safetensors
from bdscan.lab.attacks import ATTACKS, AttackConfig, make_trigger, rebuild_trigger
from bdscan.lab.attacks_transform import TransformTrigger, identity_grid, residual_similarity

SIZE = (3, 32, 32)
NEW = [
    AttackConfig("sig", 3, {"delta": 0.08, "frequency": 6}),
    AttackConfig("sig", 3, {"delta": 0.1, "frequency": 4, "vertical": True}),
    AttackConfig("wanet", 5, {"k": 4, "s": 0.5, "seed": 7}),
    AttackConfig("issba", 1, {"eps": 0.05, "seed": 2}),
    AttackConfig("blended", 2, {"alpha": 0.15, "pattern": "procedural", "seed": 4}),
    AttackConfig("badnets", 0, {"size": 8, "position": [12, 15], "pattern": "random", "seed": 1}),
]
IDS = ["sig", "sig-vertical", "wanet", "issba", "blended-procedural", "badnets-8x8"]


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    # smooth images with edges (a warp of pure noise would say little)
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=SIZE[1:], mode="bilinear", align_corners=False).clamp(0, 1)


def test_registry_has_the_new_attacks() -> None:
    assert {"sig", "wanet", "issba"} <= set(ATTACKS)


@pytest.mark.parametrize("attack", NEW, ids=IDS)
def test_shape_range_determinism_and_not_identity(attack: AttackConfig) -> None:
    x = _images()
    t1, t2 = make_trigger(attack, SIZE), make_trigger(attack, SIZE)
    y1, y2 = t1.stamp(x), t2.stamp(x)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert float(y1.min()) >= 0 and float(y1.max()) <= 1
    assert torch.equal(y1, y2)  # same parameters, same images: the same bits
    assert float((y1 - x).abs().max()) > 0.01  # it does something
    assert t1.mask.shape == SIZE[1:] and t1.pattern.shape == SIZE
    assert float(t1.mask.min()) >= 0 and float(t1.mask.max()) <= 1
    assert t1.target == attack.target
    json.dumps(t1.params)  # JSON-able for the manifest and the file
    # a batch is processed image by image: the result does not depend on the batch
    assert torch.allclose(t1.stamp(x[:2]), y1[:2], atol=1e-6)


@pytest.mark.parametrize("attack", NEW[:4], ids=IDS[:4])
def test_transform_triggers_rebuild_from_their_file(attack: AttackConfig, lab_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wrapper, _ = lab_tiny
    size = tuple(wrapper.input_size)
    t = make_trigger(attack, size)
    assert isinstance(t, TransformTrigger) and t.params["stamp"] == "transform"
    path = tmp_path / "m.safetensors"
    save_safetensors(wrapper, path, trigger=t)
    stored = load_model(path).original_trigger
    assert stored is not None and stored.kind == attack.name and stored.target == attack.target
    again = rebuild_trigger(stored)
    x = torch.rand(3, *size)
    assert torch.equal(again.stamp(x), t.stamp(x))
    stamp_trigger = make_trigger(AttackConfig("badnets", 1, {"size": 3}), size)
    assert rebuild_trigger(stamp_trigger) is stamp_trigger  # an ordinary stamp is kept as it is


def test_sig_is_the_sinusoid_of_barni_et_al() -> None:
    x = torch.full((1, *SIZE), 0.5)
    t = make_trigger(AttackConfig("sig", 0, {"delta": 0.1, "frequency": 4}), SIZE)
    v = (t.stamp(x) - x)[0]
    j = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(v[1, 7], 0.1 * torch.sin(2 * torch.pi * j * 4 / 32), atol=1e-6)
    assert torch.equal(v[:, 0], v[:, 31]) and torch.equal(v[0], v[2])  # the same in every row and channel
    assert t.stamp(torch.ones(1, *SIZE)).max() == 1  # clipped


def test_wanet_warp_is_small_smooth_and_has_a_noise_mode() -> None:
    grid = identity_grid(32, 32).float()
    x = _images(2)
    assert torch.allclose(F.grid_sample(x, grid.expand(2, -1, -1, -1), align_corners=True), x, atol=1e-5)  # the identity is exact
    t = make_trigger(AttackConfig("wanet", 0, {"k": 4, "s": 0.5, "seed": 3}), SIZE)
    assert isinstance(t, TransformTrigger)
    assert 0 < t.params["max_shift_px"] < 1.5  # imperceptible: under a pixel or so at s = 0.5
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    n1, n2 = t.noise(x, g1), t.noise(x, g2)
    assert torch.equal(n1, n2) and not torch.allclose(n1, t.stamp(x), atol=1e-4)
    other = make_trigger(AttackConfig("wanet", 0, {"k": 4, "s": 0.5, "seed": 4}), SIZE)
    assert not torch.allclose(other.stamp(x), t.stamp(x))
    no_noise = make_trigger(AttackConfig("wanet", 0, {"cross_ratio": 0}), SIZE)
    assert torch.equal(no_noise.noise(x, g1), x)


def test_issba_is_invisible_and_sample_specific() -> None:
    x = _images(8)
    t = make_trigger(AttackConfig("issba", 0, {"eps": 0.05, "seed": 5}), SIZE)
    d = t.stamp(x) - x
    assert float(d.abs().max()) <= 0.05 + 1e-6
    assert 0.01 < float(d.pow(2).mean().sqrt()) <= 0.03  # ~eps/2 RMS, minus clipping at 0 and 1
    assert residual_similarity(t, x) < 0.95  # every image gets its own perturbation ...
    blended = make_trigger(AttackConfig("blended", 0, {"alpha": 0.1}), SIZE)
    assert residual_similarity(t, x) < residual_similarity(blended, torch.full_like(x, 0.5)) - 0.04  # ... unlike a shared one
    assert not torch.equal(t.stamp(x), make_trigger(AttackConfig("issba", 0, {"seed": 6}), SIZE).stamp(x))


def test_procedural_picture_is_an_image_not_noise() -> None:
    t = make_trigger(AttackConfig("blended", 0, {"alpha": 0.2, "pattern": "procedural", "seed": 9}), SIZE)
    p = t.pattern
    assert torch.allclose(t.mask, torch.full((32, 32), 0.2))
    neighbour = (p[:, :, 1:] - p[:, :, :-1]).abs().mean()
    assert float(neighbour) < 0.1 and float(p.std()) > 0.08  # smooth regions, yet not flat
    other = make_trigger(AttackConfig("blended", 0, {"pattern": "procedural", "seed": 10}), SIZE)
    assert not torch.equal(other.pattern, p)


@pytest.mark.parametrize(
    "attack",
    [AttackConfig("sig", 0, {"delta": 0}), AttackConfig("wanet", 0, {"k": 1}), AttackConfig("wanet", 0, {"s": -1}),
     AttackConfig("issba", 0, {"eps": 0}), AttackConfig("issba", 0, {"bogus": 1}), AttackConfig("blended", 0, {"pattern": "photo"})],
)
def test_bad_parameters_raise_usage_errors(attack: AttackConfig) -> None:
    with pytest.raises(UsageError):
        make_trigger(attack, SIZE)
