"""The speed benchmark's default measurement times every default detector of a scan, each on its own: the figure the
issue's cost target is checked against. (The benchmark itself is a measurement, never run here.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bdscan.detect import DEFAULT_DETECTORS
from bdscan.io.base import LoadedModel
from tests.synth import train_tiny


def test_the_default_measurement_times_each_default_detector(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import benchmarks.speed as speed

    tiny = train_tiny("bdscan_vit", classes=4, size=16, epochs=1, n=32)
    lm = LoadedModel(tiny.wrapper, "safetensors", tmp_path / "vit.safetensors", "0" * 64)
    monkeypatch.setattr(speed, "load_with_samples", lambda _path: (lm, tiny.data))
    d = speed.child("vit.safetensors", "default", None, 1, "cpu", "smoke")
    assert list(d["detector_seconds"]) == list(DEFAULT_DETECTORS)
    assert d["seconds"] == pytest.approx(sum(d["detector_seconds"].values()))
    noise = d["other_detectors"]["neuron-noise"]
    assert noise["status"] in ("backdoor", "clean") and noise["p"] is not None  # a LayerNorm model: it ran
    # the original schedule is Neural Cleanse alone
    o = speed.child("vit.safetensors", "original", [0], 1, "cpu", "original")
    assert list(o["detector_seconds"]) == ["neural-cleanse"] and o["other_detectors"] == {}
