"""The guard's algorithm: layer, split, neurons, threshold, measurements, and refusing a rate it cannot keep."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from bdscan.data import CleanData
from bdscan.errors import UsageError
from bdscan.guard import (
    GuardConfig,
    GuardRateError,
    build_guard,
    conformal_threshold,
    features,
    min_calibration_images,
    resolve_layer,
    select_neurons,
    split_guard_data,
)
from bdscan.guard.core import MIN_NEURONS, binomial_tail, clopper_pearson
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from tests.conftest import TARGET


def test_conformal_threshold_and_its_minimum() -> None:
    s = torch.arange(1.0, 21.0)  # 1..20
    # rank ceil(21 * 0.95) = 20: the largest score; nothing of the calibration set is above it
    assert conformal_threshold(s, 0.05) == 20.0
    assert conformal_threshold(s[:18], 0.05) is None  # 18 < 19 images
    assert min_calibration_images(0.05) == 19 and min_calibration_images(0.01) == 99
    assert conformal_threshold(torch.arange(100.0), 0.1) == 90.0  # rank ceil(101 * 0.9) = 91


def test_conformal_threshold_keeps_the_rate_on_fresh_scores() -> None:
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(300):
        cal, fresh = torch.randn(60, generator=g), torch.randn(2000, generator=g)
        t = conformal_threshold(cal, 0.05)
        assert t is not None
        rates.append(float((fresh > t).float().mean()))
    assert sum(rates) / len(rates) <= 0.05 + 0.005  # the guarantee is on average over calibration sets


def test_binomial_helpers_match_known_values() -> None:
    assert binomial_tail(0, 10, 0.3) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(1, 5, 0.2) == pytest.approx(1 - 0.8**5)
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6)  # exact for k = 0
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.1871, abs=1e-3) and hi == pytest.approx(0.8129, abs=1e-3)


def test_select_neurons_ranks_by_standardised_effect_and_floors_sigma() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 50, generator=g)
    clean[:, 7] = 0.0  # a neuron that never moves on clean images
    stamped = clean[:100].clone()
    stamped[:, 3] += 5.0
    stamped[:, 7] += 0.05  # tiny raw change; without the floor its effect would be infinite
    s = select_neurons(clean, stamped, 0.01)
    assert s.idx.numel() == MIN_NEURONS and int(s.idx[0]) == 3
    assert torch.isfinite(s.effect).all() and float(s.sigma.min()) > 0
    assert select_neurons(clean, stamped, 1.0).idx.numel() == 50
    z = s(stamped) - s(clean[:100])
    assert float(z.mean()) > 1.0


def test_split_is_disjoint_stratified_and_complete(clean300: CleanData) -> None:
    fit, cal, test = split_guard_data(clean300, GuardConfig())
    assert len(fit) + len(cal) + len(test) == len(clean300)
    keys = [{tuple(img.flatten()[:16].tolist()) for img in part.x} for part in (fit, cal, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    for part in (fit, cal, test):
        assert set(part.y.tolist()) == set(range(10))
    assert split_guard_data(clean300, GuardConfig())[2].y.tolist() == test.y.tolist()  # seeded


def test_layers_of_a_cnn_and_a_vit(tiny_bd, tiny_vit) -> None:
    cnn, vit = tiny_bd.tiny.wrapper, tiny_vit.tiny.wrapper
    lay = resolve_layer(cnn)
    assert lay.kind == "penultimate" and lay.modules == ("head",) and lay.reduce == "none"
    assert lay.width == cnn.net.head.in_features
    with pytest.raises(UsageError, match="no token sequence"):
        resolve_layer(cnn, "tokens")
    tok = resolve_layer(vit, "tokens")
    assert tok.kind == "tokens" and tok.modules == ("norm",) and tok.reduce == "tokens" and tok.width == 32
    pen = resolve_layer(vit, "penultimate")
    assert pen.kind == "penultimate" and pen.width == 32
    conv = resolve_layer(cnn, "features.0")
    assert conv.kind == "module" and conv.reduce == "spatial"
    with pytest.raises(UsageError, match="neither"):
        resolve_layer(cnn, "no.such.module")
    f, logits = features(vit, tok, tiny_vit.tiny.data.x[:5])
    assert f.shape == (5, 32) and torch.allclose(logits, vit(tiny_vit.tiny.data.x[:5]))


def test_deit_heads_are_read_side_by_side() -> None:
    net = timm.create_model("bdscan_deit", num_classes=5, img_size=16, embed_dim=32, depth=1, num_heads=2)
    w = ModelWrapper(net.eval(), ModelInfo("bdscan_deit", 5, (3, 16, 16)))
    lay = resolve_layer(w, "penultimate")
    assert lay.modules == ("head", "head_dist") and lay.width == 64
    assert features(w, lay, torch.rand(3, 3, 16, 16))[0].shape == (3, 64)


@pytest.mark.parametrize("which", ["tiny_bd", "tiny_vit"])
def test_guard_catches_the_planted_trigger(which: str, request: pytest.FixtureRequest, clean300: CleanData) -> None:
    t = request.getfixturevalue(which).tiny
    r = build_guard(t.wrapper, clean300, t.trigger, GuardConfig(), original=t.trigger)
    assert r.reached and r.reason is None and r.threshold is not None
    assert sum(r.split.values()) == len(clean300) and r.clean.images == r.split["test"]
    assert r.clean.rate is not None and r.clean.rate <= 0.15  # 5 % requested; ~100 test images
    assert r.stamped.rate is not None and r.stamped.rate >= 0.9
    assert r.stamped_original is not None and r.stamped_original.rate == r.stamped.rate
    assert r.stamped.images == int((r.holdout.y != TARGET).sum())
    d = r.to_dict()
    json.dumps(d)  # JSON-able, no NaN
    assert d["test"]["clean"]["ci95"][0] <= d["test"]["clean"]["rate"] <= d["test"]["clean"]["ci95"][1]
    assert len(d["scores"]["clean"]) == r.clean.images and len(d["scores"]["original"]) == r.stamped.images
    so = d["test"]["stamped_original"]
    assert so["successful"] == r.stamped_original.to_target and so["flagged_successful"] >= 0.9
    assert d["neurons"]["count"] == max(MIN_NEURONS, math.ceil(0.01 * r.layer.width))


def test_a_rate_the_data_cannot_support_is_refused(tiny_bd, clean300: CleanData) -> None:
    t = tiny_bd.tiny
    r = build_guard(t.wrapper, clean300, t.trigger, GuardConfig(fpr=0.005))  # needs 199 calibration images
    assert not r.reached and r.threshold is None and "calibration images" in (r.reason or "")
    with pytest.raises(GuardRateError, match="calibration images") as e:
        r.check()
    assert e.value.result is r and "--fpr" in (e.value.hint or "")


def test_a_trigger_without_target_gets_one_and_bad_configs_are_refused(tiny_bd, clean300: CleanData) -> None:
    t = tiny_bd.tiny
    from dataclasses import replace

    r = build_guard(t.wrapper, clean300, replace(t.trigger, target=None), GuardConfig())
    assert r.trigger.target == TARGET and r.trigger.params["target_inferred"]
    for bad in (GuardConfig(fpr=0), GuardConfig(fpr=1.5), GuardConfig(neurons=0), GuardConfig(test_fraction=0.7)):
        with pytest.raises(UsageError):
            build_guard(t.wrapper, clean300, t.trigger, bad)
    wrong = replace(t.trigger, mask=torch.zeros(8, 8))
    with pytest.raises(UsageError, match="does not fit"):
        build_guard(t.wrapper, clean300, wrong, GuardConfig())
