"""Neuron noise (BAN-style) as a detector: registry entry, the planted backdoor of a tiny transformer, determinism,
the test's guard, where it applies, one-line errors, and every output of a scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.data import CleanData
from bdscan.detect import DETECTORS, ScanSettings, get_detector
from bdscan.detect.base import combine
from bdscan.detect.neuron_noise import (
    NeuronNoiseConfig,
    NoiseRun,
    count_p,
    has_layer_norm,
    inflow_test,
    measure,
    noisy_names,
    split_halves,
)
from bdscan.errors import NumericalError, UsageError
from bdscan.io.safetensors_io import save_safetensors
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from tests.conftest import save_npz
from tests.synth import Tiny, square_trigger, synthetic, train_tiny

runner = CliRunner()
#: the tiny transformer's target: a 4×4 white square, 3 epochs (a model with errors for the noise to redirect)
TARGET = 3


@pytest.fixture(scope="module")
def tiny_vit_bd() -> Tiny:
    return train_tiny("bdscan_vit", classes=10, trigger=square_trigger(16, TARGET, box=4), epochs=3, n=400)


@pytest.fixture(scope="module")
def tiny_vit_clean() -> Tiny:
    return train_tiny("bdscan_vit", classes=10, trigger=None, epochs=3, n=400)


@pytest.fixture(scope="module")
def held_out() -> CleanData:
    return synthetic(200, 10, 16, 5)


def _noise(wrapper: ModelWrapper, data: CleanData | None, seed: int = 0, **changes: object):  # type: ignore[no-untyped-def]
    det = get_detector("neuron-noise")
    return det.detect(wrapper, data, det.configure(ScanSettings(seed=seed)).with_(**changes))


def _run(conf: list[list[int]]) -> NoiseRun:
    return NoiseRun(np.asarray(conf, dtype=np.int64), 1.0, 0.0, np.zeros(1), (0, int(np.sum(conf))), 1)


# ---------------------------------------------------------------------------------------------- the detector


def test_registered_with_its_weight_rule_and_key() -> None:
    det = DETECTORS["neuron-noise"]
    assert det.weight == 0.1 and det.json_key == "neuron_noise" and det.sarif_rule["id"] == "BDS005"
    code = runner.invoke(app, ["detectors"])
    assert code.exit_code == 0 and "neuron-noise" in code.output


def test_it_finds_the_planted_backdoor_of_a_tiny_transformer_and_passes_its_clean_twin(tiny_vit_bd, tiny_vit_clean,
                                                                                          held_out) -> None:
    bd = _noise(tiny_vit_bd.wrapper, held_out)
    assert bd.evidence.status == "backdoor" and bd.evidence.target == TARGET, bd.evidence.reason
    assert bd.evidence.p_value is not None and bd.evidence.p_value < 0.01 and bd.evidence.weight == 0.1
    assert bd.evidence.score >= bd.evidence.threshold  # the suspect's share reaches the critical share
    assert f"class {TARGET}" in bd.evidence.reason and "p = " in bd.evidence.reason
    clean = _noise(tiny_vit_clean.wrapper, held_out)
    assert clean.evidence.status == "clean" and clean.evidence.p_value > 0.05, clean.evidence.reason
    assert bd.run is not None and bd.run.images == (100, 100) and bd.run.noisy_layers == len(noisy_names(tiny_vit_bd.wrapper))


def test_same_seed_same_noise_and_the_seed_draws_the_split_and_the_start(tiny_vit_bd, held_out) -> None:
    cfg = NeuronNoiseConfig(seed=2, steps=3)
    a, b = measure(tiny_vit_bd.wrapper, held_out, cfg), measure(tiny_vit_bd.wrapper, held_out, cfg)
    np.testing.assert_array_equal(a.confusion, b.confusion)
    np.testing.assert_array_equal(a.losses, b.losses)
    c = measure(tiny_vit_bd.wrapper, held_out, cfg.with_(seed=3))
    assert not np.array_equal(a.losses, c.losses)
    # the optimisation raises the loss it follows, and the model's weights are left as they were
    before = {n: p.clone() for n, p in tiny_vit_bd.wrapper.named_parameters()}
    run = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=6))
    assert run.losses[-1] > run.losses[0]
    assert all(torch.equal(p, before[n]) for n, p in tiny_vit_bd.wrapper.named_parameters())


def test_chunked_forwards_follow_the_same_loss(tiny_vit_bd, held_out) -> None:
    one = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=2))
    chunked = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=2, chunk=7))
    assert chunked.losses[0] == pytest.approx(one.losses[0], rel=1e-5)  # the same start, the loss summed in chunks


def test_more_images_than_the_cap_are_a_balanced_draw() -> None:
    data = synthetic(300, 10, 8, 0)
    cfg = NeuronNoiseConfig(max_images=100, seed=1)
    a, b = split_halves(data, cfg, torch.Generator().manual_seed(1))
    assert (len(a), len(b)) == (50, 50)
    assert torch.bincount(torch.cat([a.y, b.y]), minlength=10).tolist() == [10] * 10


def test_the_test_names_a_collapse_and_not_a_spread_or_a_single_error() -> None:
    k = 10
    spread = np.full((k, k), 1) + np.diag(np.full(k, 8))
    t = inflow_test(_run(spread.tolist()))
    assert t is not None and t.p_value > 0.5
    collapse = spread.copy()
    collapse[:, 4] += 8  # every class sends 8 more images to class 4
    t = inflow_test(_run(collapse.tolist()))
    assert t is not None and t.target == 4 and t.p_value < 1e-4
    # one error in all: the other classes' sizes differ only by their exposures; the count guard keeps p at 1
    one = np.diag(np.full(k, 10))
    one[0, 7] = 1
    t = inflow_test(_run(one.tolist()))
    assert t is not None and t.size.p_value < 1e-3 and t.p_count == 1.0 and t.p_value == 1.0
    assert count_p(0, 0, k) == 1.0 and count_p(30, 30, k) < 1e-20


def test_not_applicable_without_layer_norm_so_not_a_test(tiny_bd) -> None:
    cnn = tiny_bd.tiny.wrapper
    assert not has_layer_norm(cnn) and noisy_names(cnn)  # BatchNorm: noise could go there, but is not calibrated
    r = _noise(cnn, tiny_bd.tiny.data)
    assert r.evidence.status == "inconclusive" and r.evidence.p_value is None and "LayerNorm" in r.evidence.reason
    assert r.section([], None, None) == {} and r.arrays() == {} and not list(r.images(None))
    nc = DETECTORS["mm-bd"]  # any calibrated evidence: it is the only test, its p-value is not multiplied
    from bdscan.detect.base import Evidence
    other = Evidence(nc.name, "backdoor", 3, 1.0, 0.5, "x", {}, 0.04)
    v = combine([other, r.evidence])
    assert v.tests == 1 and v.status == "backdoor" and v.p_value == pytest.approx(0.04)
    forced = _noise(cnn, tiny_bd.tiny.data, layer_norm_only=False, steps=2)
    assert forced.evidence.p_value is not None  # measurable when asked, uncalibrated there


def test_no_data_few_classes_and_nan_are_handled(tiny_vit_bd, held_out) -> None:
    r = _noise(tiny_vit_bd.wrapper, None)
    assert r.evidence.status == "inconclusive" and "--data" in r.evidence.reason
    two = ModelWrapper(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(3 * 8 * 8), torch.nn.Linear(3 * 8 * 8, 2)),
                       ModelInfo("linear", 2, (3, 8, 8)))
    assert _noise(two, synthetic(20, 2, 8, 0)).evidence.status == "inconclusive"

    class _NaN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(3 * 8 * 8)
            self.lin = torch.nn.Linear(3 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.norm(x.flatten(1))) * float("nan")

    with pytest.raises(NumericalError, match="NaN or inf"):
        _noise(ModelWrapper(_NaN(), ModelInfo("nan", 5, (3, 8, 8))), synthetic(40, 5, 8, 0))


def test_configure_maps_budgets_and_refuses_bad_values() -> None:
    det = get_detector("neuron-noise")
    assert det.configure(ScanSettings(budget="fast", seed=4)).steps == 20
    assert det.configure(ScanSettings(budget="smoke")).steps < 20
    # --steps belongs to Neural Cleanse and MM-BD: the noise keeps the schedule it was calibrated with
    assert det.configure(ScanSettings(budget="fast", steps=90)).steps == 20
    with pytest.raises(UsageError):
        det.configure(ScanSettings(budget="nope"))
    for bad in ({"eps": 0.0}, {"eps": 1.5}, {"steps": 0}, {"max_images": 2}, {"alpha": 1.0}):
        with pytest.raises(UsageError):
            NeuronNoiseConfig(**bad).validate()  # type: ignore[arg-type]


def test_a_scan_writes_json_sarif_html_and_the_picture(tiny_vit_bd, held_out, tmp_path: Path) -> None:
    model = tmp_path / "vit.safetensors"
    save_safetensors(tiny_vit_bd.wrapper, model)
    data = save_npz(tmp_path / "clean.npz", held_out.x, held_out.y)
    out, js, sarif, html = tmp_path / "scan", tmp_path / "scan.json", tmp_path / "scan.sarif", tmp_path / "report.html"
    r = runner.invoke(app, [str(a) for a in ("scan", model, "--data", data, "--detectors", "neuron-noise", "--no-activations",
                                             "--out", out, "--json", js, "--sarif", sarif, "--report", html)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    doc = json.loads(js.read_text())
    assert doc["schema"] == "bdscan.scan/3"
    sec = doc["neuron_noise"]
    assert sec["evidence"]["status"] == "backdoor" and sec["evidence"]["target"] == TARGET and sec["evidence"]["weight"] == 0.1
    assert sec["config"]["eps"] == 0.1 and sec["config"]["steps"] == 20 and sec["config"]["seed"] == 0
    assert [s["label"] for s in sec["scores"]] == list(range(10)) and sec["test"]["max_label"] == TARGET
    assert np.asarray(sec["confusion"]).sum() == 100 and sec["images"]["inflow"].startswith("data:image/png;base64,")
    v = doc["verdict"]
    assert (v["status"], v["target"], v["rule"]) == ("backdoor", TARGET, "weighted-bonferroni-min-p")
    assert v["factors"] == {"neuron-noise": 1.0}  # the only test: its weight is all of α
    ev = DETECTORS["neuron-noise"].evidence_from_doc(doc)
    assert ev is not None and ev.weight == 0.1 and ev.target == TARGET
    with np.load(out / "triggers.npz") as z:
        assert z["noise_confusion"].shape == (10, 10) and int(np.argmax(z["noise_shares"])) == TARGET
    assert (out / "neuron-noise" / "inflow.png").is_file()
    log = json.loads(sarif.read_text())["runs"][0]
    assert [r["ruleId"] for r in log["results"] if r["ruleId"] == "BDS005"] == ["BDS005"]
    assert "BDS005" in [r["id"] for r in log["tool"]["driver"]["rules"]]
    page = html.read_text()
    assert "Neuron noise (BAN)" in page and "</html>" in page
