"""Pruning (Neural Cleanse section VI-B) on the planted tiny CNN."""

from __future__ import annotations

import timm
import torch
from torch import nn

import bdscan.models  # noqa: F401
from bdscan.repair import RepairConfig, find_classifier, repair, reversed_trigger_from_findings
from tests.conftest import TARGET


def test_pruning_lowers_attack_success_and_zeroes_classifier_columns(tiny_bd, smoke_scan) -> None:  # type: ignore[no-untyped-def]
    t = tiny_bd.tiny
    trig = reversed_trigger_from_findings(smoke_scan.findings, label=TARGET)
    r = repair(t.wrapper, t.data, trig, RepairConfig(method="prune"), original=t.trigger)
    assert r.method == "prune" and r.details["pruned_neurons"] > 0
    assert r.after["asr_reversed"] < r.before["asr_reversed"] - 0.3
    head = find_classifier(r.wrapper.net, 10)[0]
    zero_cols = int((head.weight == 0).all(0).sum())
    assert zero_cols == r.details["pruned_neurons"]  # the weights carry the pruning: any export keeps it
    assert r.details["stop_reason"] in ("asr", "accuracy", "max_fraction")
    assert int((find_classifier(t.wrapper.net, 10)[0].weight == 0).all(0).sum()) == 0  # input untouched


def test_find_classifier() -> None:
    vit = timm.create_model("bdscan_vit", num_classes=5, img_size=16, embed_dim=32, depth=1, num_heads=2)
    assert find_classifier(vit, 5) == [vit.head]
    deit = timm.create_model("bdscan_deit", num_classes=5, img_size=16, embed_dim=32, depth=1, num_heads=2)
    assert find_classifier(deit, 5) == [deit.head, deit.head_dist]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3), nn.Softmax(1))
    assert find_classifier(seq, 3) == [seq[3]]
    assert torch.equal(find_classifier(seq, None)[0].weight, seq[3].weight)
