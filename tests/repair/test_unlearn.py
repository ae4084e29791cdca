"""Unlearning (Neural Cleanse section VI-C) on the planted tiny CNN: the shared configuration, split and result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bdscan.errors import UsageError
from bdscan.repair import RepairConfig, repair, reversed_trigger_from_findings, split_data
from bdscan.report.html import view_model
from tests.conftest import TARGET

KEYS = {"method", "trigger", "before", "after", "intervals", "counts", "acc_drop", "tolerance", "within_tolerance", "max_asr",
        "backdoor_removed", "passed", "checks", "config", "holdout_images", "repair_images", "seconds", "details"}
METRICS = {"clean_accuracy", "asr_reversed", "asr_original", "target_without_trigger"}


def test_unlearning_with_the_original_trigger_removes_the_backdoor(unlearned) -> None:  # type: ignore[no-untyped-def]
    r = unlearned
    assert r.before["asr_original"] > 0.9  # the planted backdoor works before
    assert r.after["asr_original"] < 0.10
    assert r.after["asr_reversed"] == r.after["asr_original"]  # the trigger used is the original here
    assert r.within_tolerance and r.acc_drop <= r.tolerance == 0.03
    assert r.backdoor_removed and r.passed and [c.name for c in r.checks] == ["clean accuracy", "attack success"]
    assert r.repair_images + r.holdout_images == 160 and r.holdout_images == 50
    assert not r.wrapper.training and not any(p.requires_grad for p in r.wrapper.parameters())


def test_the_input_model_is_not_modified(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    w = tiny_bd.tiny.wrapper
    state = {k: v.clone() for k, v in w.state_dict().items()}
    grads = [p.requires_grad for p in w.parameters()]
    calls: list[tuple[int, int]] = []
    r = repair(w, tiny_bd.tiny.data, tiny_bd.tiny.trigger, RepairConfig(epochs=2),
               progress=lambda d, t, s: calls.append((d, t)))
    assert all(torch.equal(state[k], v) for k, v in w.state_dict().items())
    assert [p.requires_grad for p in w.parameters()] == grads and not w.training
    assert r.wrapper is not w and r.wrapper.net is not w.net
    assert calls == [(1, 2), (2, 2)]
    assert r.before["asr_original"] is None  # no original trigger given


def test_unlearning_is_deterministic(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    t = tiny_bd.tiny
    a, b = (repair(t.wrapper, t.data, t.trigger, RepairConfig(epochs=1, seed=5)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.wrapper.state_dict().values(), b.wrapper.state_dict().values(), strict=True))


def test_unlearning_with_a_reversed_trigger_lowers_attack_success(tiny_bd, smoke_scan) -> None:  # type: ignore[no-untyped-def]
    t = tiny_bd.tiny
    trig = reversed_trigger_from_findings(smoke_scan.findings, label=TARGET)
    assert trig.kind == "reversed-pixel" and trig.target == TARGET
    r = repair(smoke_scan.lm.wrapper, t.data, trig, RepairConfig(), original=t.trigger)
    assert r.after["asr_reversed"] < r.before["asr_reversed"] - 0.5
    assert r.after["asr_original"] < r.before["asr_original"]
    assert r.to_dict()["trigger"]["kind"] == "reversed-pixel"


def test_to_dict_is_the_report_s_repair_section(unlearned) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(json.dumps(unlearned.to_dict()))
    assert set(d) == KEYS
    assert set(d["before"]) == set(d["after"]) == METRICS
    assert d["method"] == "unlearn" and d["trigger"]["target"] == TARGET and d["trigger"]["kind"] == "badnets"
    assert d["trigger"]["l1"] == pytest.approx(9.0)
    assert d["config"]["stamp_fraction"] == 0.5 and d["config"]["targets"] == "model"
    assert d["tolerance"] == 0.03 and d["within_tolerance"] is True and d["max_asr"] == 0.1 and d["passed"] is True
    assert d["intervals"]["confidence"] == 0.95 and len(d["intervals"]["acc_drop"]) == 2
    for when in ("before", "after"):
        lo, hi = d["intervals"][when]["clean_accuracy"]
        assert lo <= d[when]["clean_accuracy"] <= hi
    assert d["counts"]["clean"] == d["holdout_images"] and d["counts"]["attack"] < d["holdout_images"]
    assert [c["check"] for c in d["checks"]] == ["clean accuracy", "attack success"] and all(c["passed"] for c in d["checks"])
    view = view_model({"repair": d})["repair"]
    assert [row["metric"] for row in view["rows"]] == ["Clean accuracy", "Attack success of the trigger used",
                                                       "Attack success of the original trigger", "Sent to the target with no trigger"]
    assert "%" in view["rows"][0]["before"] and " – " in view["rows"][0]["before_ci"] and view["passed"]


def test_split_is_stratified_and_seeded(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    data = tiny_bd.tiny.data
    rep, hold = split_data(data, 0.3, 0)
    _, hold2 = split_data(data, 0.3, 0)
    assert torch.equal(hold.y, hold2.y) and torch.equal(hold.x, hold2.x)
    assert torch.bincount(hold.y).tolist() == [5] * 10 and len(rep) == 110
    assert not torch.equal(split_data(data, 0.3, 1)[1].x, hold.x)


def test_bad_inputs_are_usage_errors(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    t = tiny_bd.tiny
    with pytest.raises(UsageError, match="unknown repair method"):
        repair(t.wrapper, t.data, t.trigger, RepairConfig(method="retrain"))
    with pytest.raises(UsageError, match="does not fit"):
        repair(t.wrapper, t.data, replace(t.trigger, mask=torch.zeros(8, 8)), RepairConfig())
    with pytest.raises(UsageError, match="at least"):
        repair(t.wrapper, t.data.subset(torch.arange(5)), t.trigger, RepairConfig())


def test_a_trigger_without_target_gets_the_class_it_sends_images_to(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    t = tiny_bd.tiny
    r = repair(t.wrapper, t.data, replace(t.trigger, target=None), RepairConfig(epochs=1))
    assert r.trigger.target == TARGET and r.trigger.params["target_inferred"] is True


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # onnx2torch's Slice converter
def test_unlearning_reaches_the_weights_onnx2torch_keeps_in_buffers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A transformer loaded from ONNX holds most weights in onnx2torch's initializer buffers, not in parameters."""
    from bdscan.io import export_onnx, load_model
    from tests.synth import square_trigger, train_tiny

    t = train_tiny("bdscan_vit", 4, 16, square_trigger(16, 1, row=4, col=4), epochs=6, n=160)
    export_onnx(t.wrapper, tmp_path / "vit.onnx")
    lm = load_model(tmp_path / "vit.onnx")
    r = repair(lm.wrapper, t.data, t.trigger, RepairConfig(epochs=4))
    assert r.before["asr_reversed"] > 0.5 and r.after["asr_reversed"] < 0.1
    assert not any(b.requires_grad for b in r.wrapper.buffers())
