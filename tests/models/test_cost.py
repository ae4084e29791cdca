"""The scan-time estimate shown before a long scan: probed the way the scan runs, and told as the likely and the
longest time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdscan.console import estimate_text, plan_lines
from bdscan.detect import ScanSettings
from bdscan.io import load_model
from bdscan.models import cost
from bdscan.models.cost import PROBE_BATCH, PROBE_PASS_FLOP, ScanEstimate, estimate_seconds, probe_batch, scan_images
from bdscan.pipeline import ScanPlan, configure


def _config(**settings: object):  # type: ignore[no-untyped-def]
    return configure(ScanSettings(budget="smoke", **settings), ("neural-cleanse",))["neural-cleanse"]


def test_the_probe_batch_is_one_scan_forward_unless_the_model_is_large() -> None:
    assert probe_batch(1e6, 32) == 32  # a small model: the scan's own batch
    assert probe_batch(PROBE_PASS_FLOP / 8, 32) == 8  # a large one: as many images as the FLOP cap allows
    assert probe_batch(PROBE_PASS_FLOP * 10, 32) == PROBE_BATCH  # a huge one: never below the floor
    assert probe_batch(0.0, 1) == PROBE_BATCH


def test_the_estimate_probes_each_worker_on_its_share_of_the_threads(tiny_bd, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    seen: list[tuple[int, int]] = []

    def rate(wrapper, batch):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), batch))
        return 100.0

    monkeypatch.setattr(cost, "PROBE_ABOVE_FLOP", 0.0)
    monkeypatch.setattr(cost, "images_per_second", rate)
    before = torch.get_num_threads()
    cfg = _config(levels=("pixel", "patch"), steps=9, second_look=(3, 0.01, 0.5))
    est = estimate_seconds(lm.wrapper, cfg, threads=2)
    assert torch.get_num_threads() == before  # restored
    inv = cfg.inversion
    # two levels on two threads: two workers of one thread each, each probed with one batched forward of the scan
    assert seen == [(1, probe_batch(3 * cost.forward_flops(lm.wrapper), inv.resolved_label_chunk("cpu", 1) * inv.batch_size))]
    images = scan_images(cfg, lm.wrapper.num_classes)
    assert est == ScanEstimate(images / 200.0, images / 200.0 * 3 / 9)
    assert est.likely_s == est.first_look_s


def test_the_other_detectors_passes_are_added_to_both_looks(tiny_bd, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    monkeypatch.setattr(cost, "PROBE_ABOVE_FLOP", 0.0)
    monkeypatch.setattr(cost, "images_per_second", lambda wrapper, batch: 100.0)
    cfg = _config(levels=("pixel",), steps=9, second_look=(3, 0.01, 0.5))
    images = scan_images(cfg, lm.wrapper.num_classes)
    est = estimate_seconds(lm.wrapper, cfg, threads=1, other_passes=500.0)
    assert est is not None and est.full_s == pytest.approx(images / 100 + 5) and est.first_look_s == pytest.approx(images / 300 + 5)
    # without Neural Cleanse: the other detectors alone, on every thread
    assert estimate_seconds(lm.wrapper, None, threads=2, other_passes=500.0) == ScanEstimate(5.0)
    assert estimate_seconds(lm.wrapper, None, threads=2) is None  # nothing to do: nothing to say


def test_each_detector_counts_its_own_passes(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    from bdscan.detect import get_detector
    from tests.synth import train_tiny

    cnn = load_model(tiny_bd.model).wrapper  # no LayerNorm: neuron noise does not run there
    vit = train_tiny("bdscan_vit", classes=4, size=16, epochs=1, n=32).wrapper
    nn, nc, mm = get_detector("neuron-noise"), get_detector("neural-cleanse"), get_detector("mm-bd")
    settings = ScanSettings(budget="fast")
    nn_cfg = nn.configure(settings)
    assert nn.passes(cnn, 200, nn_cfg) == 0.0 and nc.passes(vit, 200, nc.configure(settings)) == 0.0
    one = nn_cfg.steps * 100 + 2 / 3 * 100  # 20 steps over one half, two forwards of the other
    assert nn.passes(vit, 200, nn_cfg) == pytest.approx(one)
    assert nn.passes(vit, 200, nn_cfg.with_(cross_fit_below=201)) == pytest.approx(2 * one)
    assert nn.passes(vit, 200, nn_cfg.with_(no_split_below=201)) == pytest.approx(nn_cfg.steps * 200 + 2 / 3 * 200)
    assert nn.passes(vit, 200, nn_cfg.with_(splits_below=201)) == pytest.approx(3 * one)
    assert nn.passes(vit, 5000, nn_cfg) == pytest.approx(nn_cfg.steps * 512 + 2 / 3 * 512)  # the cap
    mm_cfg = mm.configure(settings)
    assert mm.passes(vit, 200, mm_cfg) == 4 * (mm_cfg.random_starts + mm_cfg.clean_starts) * mm_cfg.steps


def test_one_look_has_no_first_look_and_a_failing_probe_gives_no_estimate(tiny_bd, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    monkeypatch.setattr(cost, "PROBE_ABOVE_FLOP", 0.0)
    est = estimate_seconds(lm.wrapper, _config(levels=("pixel",), second_look="off"), threads=1)
    assert est is not None and est.first_look_s is None and est.likely_s == est.full_s > 0

    def boom(*a: object) -> float:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cost, "images_per_second", boom)
    assert estimate_seconds(lm.wrapper, _config(), threads=1) is None  # never stops a scan
    monkeypatch.setattr(cost, "PROBE_ABOVE_FLOP", float("inf"))
    assert estimate_seconds(lm.wrapper, _config(), threads=1) is None  # a short scan: nothing to say


def test_the_console_says_the_likely_time_and_the_longest(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    assert estimate_text(ScanEstimate(195.0, 65.0)) == "about 1 min 5 s (about 3 min 15 s if the first look is in doubt)"
    assert estimate_text(ScanEstimate(240.0)) == "about 4 min 0 s"
    lm = load_model(tiny_bd.model)
    settings = ScanSettings(budget="smoke")
    configs = configure(settings, ("neural-cleanse",))

    def lines(est: ScanEstimate | None) -> str:
        return "\n".join(plan_lines(ScanPlan(lm, tiny_bd.tiny.data, Path("d"), settings, ("neural-cleanse",), configs,
                                             "fp32", est)))

    assert "should take about 1 min 5 s" in lines(ScanEstimate(195.0, 65.0))
    assert "should take" not in lines(ScanEstimate(195.0, 30.0))  # likely under a minute: no line
    assert "should take" not in lines(None)
