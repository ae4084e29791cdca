"""Activation statistics, neuron rankings and precision@k (research paper, sections 5.1-5.2)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bdscan.analysis.activations import (
    PAPER_KS,
    activation_profile,
    activation_stats,
    activations_section,
    hooked_layers,
    neuron_ranking,
    precision_at_k,
    probe_images,
)
from bdscan.data import CleanData
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from bdscan.trigger import Trigger
from tests.conftest import CLASSES, SIZE, TARGET
from tests.report.scans import scanned


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def images(tiny, n: int = 64) -> torch.Tensor:  # type: ignore[no-untyped-def]
    d = tiny.data
    return d.x[d.y != TARGET][:n]


def random_trigger(seed: int = 0) -> Trigger:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(SIZE, SIZE)
    mask[2:5, 2:5] = 1
    return Trigger(mask, torch.rand(3, SIZE, SIZE, generator=g), None, "random")


def test_original_trigger_activates_neurons(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w, trig = tiny_bd.tiny.wrapper, tiny_bd.tiny.trigger
    x = images(tiny_bd.tiny)
    st = activation_stats(w, x, trig)
    names = [n for n, _ in hooked_layers(w.net)]
    assert [ly.name for ly in st.layers] == names and names[-1] == "head"
    assert st.neurons == sum(ly.neurons for ly in st.layers)
    assert st.activated == sum(ly.activated for ly in st.layers)
    assert st.fraction == pytest.approx(st.activated / st.neurons)
    assert 0.01 < st.fraction < 0.9, st.fraction  # a measurable share, not everything
    assert st.images == len(x) and st.trigger == "badnets" and st.target == TARGET
    # the backdoor target's logit rises most among the head's outputs, and is among the top neurons
    head = st.layers[-1]
    assert head.shape == (CLASSES,)
    assert any(n.layer == "head" and n.index == TARGET for n in st.top)
    assert len(st.top) == 10 and all(a.increase >= b.increase for a, b in zip(st.top, st.top[1:], strict=False))
    # the planted trigger moves more neurons than a random patch of the same size
    assert st.fraction > activation_stats(w, x, random_trigger()).fraction
    json.dumps(st.to_dict())


def test_conv_neuron_positions(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    st = activation_stats(tiny_bd.tiny.wrapper, images(tiny_bd.tiny), tiny_bd.tiny.trigger, top_k=200)
    conv = [n for n in st.top if n.type == "Conv2d"]
    assert conv, "expected conv neurons among the top 200"
    layer = next(ly for ly in st.layers if ly.name == conv[0].layer)
    _, h, w = layer.shape
    n = conv[0]
    assert len(n.position) == 3 and n.index == (n.position[0] * h + n.position[1]) * w + n.position[2]
    assert n.increase == pytest.approx(n.triggered - n.clean)


def test_threshold_is_monotonic(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w, x, trig = tiny_bd.tiny.wrapper, images(tiny_bd.tiny), tiny_bd.tiny.trigger
    clean = activation_profile(w, x)
    counts = [activation_stats(w, x, trig, threshold=t, clean=clean).activated for t in (0.0, 0.05, 0.1, 0.5, 10.0)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and counts[0] > counts[2]


def test_batching_does_not_change_results(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w, x, trig = tiny_bd.tiny.wrapper, images(tiny_bd.tiny, 40), tiny_bd.tiny.trigger
    a = neuron_ranking(w, x, trig, batch_size=64)
    b = neuron_ranking(w, x, trig, batch_size=7)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a, neuron_ranking(w, x, trig, batch_size=64))  # deterministic


def test_hooks_removed_and_mode_restored(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w = tiny_bd.tiny.wrapper
    w.train()
    try:
        activation_stats(w, images(tiny_bd.tiny, 8), tiny_bd.tiny.trigger)
        assert w.training
    finally:
        w.eval()
    assert all(not m._forward_hooks for m in w.modules())


def test_max_images(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    p = activation_profile(tiny_bd.tiny.wrapper, tiny_bd.tiny.data.x, max_images=20)
    assert p.images == 20 and p.flat().numel() == p.neurons


def test_precision_at_k_self_and_reversed(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w, x = tiny_bd.tiny.wrapper, images(tiny_bd.tiny)
    clean = activation_profile(w, x)
    ra = neuron_ranking(w, x, tiny_bd.tiny.trigger, clean=clean)
    rb = neuron_ranking(w, x, random_trigger(), clean=clean)
    n = ra.numel()
    self_p = precision_at_k(ra, ra)
    assert all(v == 1.0 for v in self_p.values()) and list(self_p) == list(PAPER_KS)
    p = precision_at_k(ra, rb)
    assert all(0.0 <= v <= 1.0 for v in p.values())
    assert n < 10_000 and p.capped == (10_000, 50_000, 100_000)  # this tiny model has fewer neurons than k
    assert p.k_used[10] == 10 and p.k_used[100_000] == n and p[100_000] == 1.0
    assert [e["capped"] for e in p.to_list()] == [False, False, False, True, True, True]


def test_precision_at_k_by_hand() -> None:
    a = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    p = precision_at_k(a, b, ks=(1, 2, 3, 5, 7))
    assert p == {1: 0.0, 2: 0.0, 3: pytest.approx(1 / 3), 5: 1.0, 7: 1.0}
    assert p.k_used == {1: 1, 2: 2, 3: 3, 5: 5, 7: 5} and p.capped == (7,) and p.neurons == 5
    ties = torch.zeros(4)  # ties break by index, the same way for both rankings
    assert precision_at_k(ties, ties.clone(), ks=(2,))[2] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        precision_at_k(a, b[:3])
    with pytest.raises(ValueError, match="positive"):
        precision_at_k(a, b, ks=(0,))


def test_probe_images_balanced_and_avoiding() -> None:
    y = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    x = torch.arange(15).float().view(15, 1, 1, 1).expand(15, 3, 2, 2).contiguous()
    got = probe_images(CleanData(x, y), [1], 4)
    assert got[:, 0, 0, 0].tolist() == [0.0, 10.0, 1.0, 11.0]


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) @ self.w


def test_model_without_hookable_layers(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w = ModelWrapper(_NoLayers(), ModelInfo("nolayers", 4, (3, SIZE, SIZE)))
    with pytest.raises(ValueError, match=r"no nn\.Conv2d or nn\.Linear"):
        activation_stats(w, torch.rand(4, 3, SIZE, SIZE), tiny_bd.tiny.trigger)
    s = scanned(tiny_bd.model, tiny_bd.tiny.data)
    sec = activations_section(w, s.data, s.findings, None)
    assert sec["computed"] is False and "Conv2d" in sec["reason"]


def test_activations_section(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    s = scanned(tiny_bd.model, tiny_bd.tiny.data)
    sec = s.doc["activations"]
    assert sec is not None and sec["computed"] is True
    json.dumps(sec)
    assert sec["method"]["threshold"] == 0.1 and TARGET in sec["method"]["excluded_classes"]
    orig = sec["original"]
    assert orig["trigger"] == "badnets" and orig["fraction"] > 0 and len(orig["top"]) == 10
    assert set(sec["modes"]) == set(s.findings.modes)
    for mode, e in sec["modes"].items():
        target = s.findings.verdict.target
        if target is not None:
            assert e["label"] == target and e["label_basis"] == "suspected target", mode
        else:
            assert e["label"] == s.findings.modes[mode].anomaly.min_label and e["label_basis"] == "smallest norm", mode
        rev = e["reversed"]
        assert rev["neurons"] == sec["neurons"] == orig["neurons"] and len(rev["layers"]) == sec["layers"]
        assert 0.0 <= rev["fraction"] <= 1.0
        pk = e["precision_at_k"]
        assert [p["k"] for p in pk["final"]] == list(PAPER_KS)
        assert all(0.0 <= p["precision"] <= 1.0 for p in pk["final"])
        assert [ph["phase"] for ph in pk["phases"]] == [1, 2, 3]
        for ph in pk["phases"]:
            assert ph["precision"] is None or len(ph["precision"]) == len(PAPER_KS)
    # the same inputs give the same section (deterministic: it goes into the comparable part of scan.json)
    again = activations_section(s.lm.wrapper, s.data, s.findings, s.lm.original_trigger)
    assert again == sec


def test_activations_section_without_original(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    s = scanned(tiny_bd.model, tiny_bd.tiny.data)
    sec = activations_section(s.lm.wrapper, s.data, s.findings, None, max_images=16)
    assert sec["original"] is None and sec["images"] == 16
    assert all(e["precision_at_k"] is None and e["reversed"]["images"] == 16 for e in sec["modes"].values())
