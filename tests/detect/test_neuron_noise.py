"""Neuron noise (BAN-style) as a detector: registry entry, a dormant pathway to one class that the noise switches on
(BAN's premise, built by hand), determinism, the test's guards, where it applies, one-line errors, and every output
of a scan."""

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
    split_seeds,
)
from bdscan.errors import NumericalError, UsageError
from bdscan.io.base import LoadedModel
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from bdscan.pipeline import Outputs, scan_loaded, write_scan_outputs
from tests.synth import Tiny, synthetic, train_tiny

runner = CliRunner()
#: the class the trap sends every input to
TARGET = 3


class Trap(torch.nn.Module):
    """A tiny ViT with a dormant pathway to :data:`TARGET`: units that a LayerNorm holds just below zero for every
    input (its normalised output is the constant [1, -1]; gain 1, shift -1.01), each adding ``strength`` to the
    target's logit once positive. Clean predictions are the ViT's own; a noise of a few per cent on the LayerNorm's
    gains and shifts switches the units on for every input: the hidden pathway BAN looks for."""

    def __init__(self, base: torch.nn.Module, units: int = 8, margin: float = 0.01, strength: float = 50.0) -> None:
        super().__init__()
        self.base, self.strength = base, strength
        self.norm = torch.nn.LayerNorm((units, 2))
        with torch.no_grad():
            self.norm.bias.zero_()
            self.norm.bias[:, 0] = -(1.0 + margin)
        self.register_buffer("const", torch.tensor([1.0, -1.0]).repeat(units, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        u = torch.relu(self.norm(self.const.expand(len(x), -1, -1))[..., 0]).sum(1)
        bump = torch.zeros_like(z)
        bump[:, TARGET] = self.strength * u
        return z + bump


@pytest.fixture(scope="module")
def tiny_vit_clean() -> Tiny:
    """An accurate tiny ViT: a noise of 0.1 makes almost no errors."""
    return train_tiny("bdscan_vit", classes=10, trigger=None, epochs=8, n=400)


@pytest.fixture(scope="module")
def tiny_vit_bd(tiny_vit_clean: Tiny) -> Tiny:
    """The same ViT with the trap: the same clean predictions, a pathway to class 3 the noise can open."""
    return Tiny(ModelWrapper(Trap(tiny_vit_clean.wrapper.net), tiny_vit_clean.wrapper.info), tiny_vit_clean.data, None)


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
    assert code.exit_code == 0 and "neuron-noise (weight 0.1, default)" in code.output
    assert "neural-cleanse (weight 1, default)" in code.output and "mm-bd (weight 1):" in code.output


def test_it_finds_the_dormant_pathway_and_passes_the_clean_twin(tiny_vit_bd, tiny_vit_clean, held_out) -> None:
    assert torch.equal(tiny_vit_bd.wrapper(held_out.x).argmax(1), tiny_vit_clean.wrapper(held_out.x).argmax(1))
    bd = _noise(tiny_vit_bd.wrapper, held_out)
    assert bd.evidence.status == "backdoor" and bd.evidence.target == TARGET, bd.evidence.reason
    assert bd.evidence.p_value is not None and bd.evidence.p_value < 1e-4 and bd.evidence.weight == 0.1
    assert bd.test is not None and bd.test.sources >= 8  # images of (almost) every other class went to the target
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
    assert not np.array_equal(a.losses, c.losses) or not np.array_equal(a.confusion, c.confusion)
    # the optimisation raises the loss it follows, and the model's weights are left as they were
    before = {n: p.clone() for n, p in tiny_vit_bd.wrapper.named_parameters()}
    run = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=6))
    assert run.losses[-1] > run.losses[0]
    assert all(torch.equal(p, before[n]) for n, p in tiny_vit_bd.wrapper.named_parameters())


def test_chunked_forwards_follow_the_same_loss(tiny_vit_bd, held_out) -> None:
    one = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=2))
    chunked = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=0, steps=2, chunk=7))
    assert chunked.losses[0] == pytest.approx(one.losses[0], rel=1e-5)  # the same start, the loss summed in chunks


def test_a_cross_fit_reads_every_image_once_with_a_noise_that_did_not_see_it(tiny_vit_bd, held_out) -> None:
    plain = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3))
    ticks: list[tuple[int, int]] = []
    cross = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3, cross_fit_below=201),
                    lambda _task, done, total, _stats: ticks.append((done, total)))
    assert ticks == [(i, 6) for i in range(1, 7)]  # one progress bar over both noises
    assert plain.images == (100, 100) and cross.images == (200, 200)
    # every image read once: the pooled rows count each class's images, with and without noise
    counts = torch.bincount(held_out.y, minlength=10).numpy()
    np.testing.assert_array_equal(cross.confusion.sum(1), counts)
    np.testing.assert_array_equal(cross.clean_confusion.sum(1), counts)
    # its first noise is the plain run's (same draws, in the same order); the second is read on the other half
    np.testing.assert_array_equal(cross.losses[:3], plain.losses)
    assert len(cross.losses) == 6 and not np.array_equal(cross.losses[3:], plain.losses)
    second = cross.confusion - plain.confusion
    assert (second >= 0).all() and second.sum() == 100
    opt_half, _ = split_halves(held_out, NeuronNoiseConfig(seed=1), torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(second.sum(1), torch.bincount(opt_half.y, minlength=10).numpy())
    assert cross.clean_accuracy == pytest.approx(float((tiny_vit_bd.wrapper(held_out.x).argmax(1) == held_out.y).float().mean()))
    # at the threshold and above: one noise, as before
    at = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3, cross_fit_below=200))
    np.testing.assert_array_equal(at.confusion, plain.confusion)
    # the detector reports the pooled readout, and still finds the pathway
    res = _noise(tiny_vit_bd.wrapper, held_out, cross_fit_below=512)
    assert res.run.images == (200, 200) and res.evidence.status == "backdoor" and res.evidence.target == TARGET


def test_below_no_split_every_image_finds_the_noise_and_is_read(tiny_vit_bd, held_out) -> None:
    whole = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3, no_split_below=201))
    assert whole.images == (200, 200) and all(type(i) is int for i in whole.images) and len(whole.losses) == 3
    np.testing.assert_array_equal(whole.confusion.sum(1), torch.bincount(held_out.y, minlength=10).numpy())
    # the same start as the halves' run, its loss taken over every image
    x = held_out.x
    with torch.no_grad():
        full_ce = float(torch.nn.functional.cross_entropy(tiny_vit_bd.wrapper(x), held_out.y))
    no_noise = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=1, eps=1e-9, no_split_below=201))
    assert no_noise.losses[0] == pytest.approx(full_ce, rel=1e-4)
    # at the threshold: halves, as before; the seed still draws the start
    halves = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3, no_split_below=200))
    assert halves.images == (100, 100)
    again = measure(tiny_vit_bd.wrapper, held_out, NeuronNoiseConfig(seed=1, steps=3, no_split_below=201))
    np.testing.assert_array_equal(again.confusion, whole.confusion)
    res = _noise(tiny_vit_bd.wrapper, held_out, no_split_below=512)
    assert res.run.images == (200, 200) and res.evidence.status == "backdoor" and res.evidence.target == TARGET


def test_below_splits_the_smallest_of_three_splits_p_values_is_reported_three_times_larger(tiny_vit_clean, held_out) -> None:
    cfg = NeuronNoiseConfig(seed=2, steps=3)
    assert split_seeds(cfg, 200) == [2] and split_seeds(cfg.with_(splits_below=201), 200) == [2, 1_000_005, 2_000_008]
    assert len(split_seeds(cfg.with_(splits_below=150, max_images=100), 200)) == 3  # counted after the cap
    each = [inflow_test(measure(tiny_vit_clean.wrapper, held_out, cfg.with_(seed=s))) for s in (2, 1_000_005, 2_000_008)]
    ticks: list[tuple[int, int]] = []
    det = get_detector("neuron-noise")
    res = det.detect(tiny_vit_clean.wrapper, held_out, det.configure(ScanSettings(seed=2, budget="smoke")).with_(
        steps=3, splits_below=512), lambda _t, done, total, _s: ticks.append((done, total)))
    best = min(each, key=lambda t: t.p_value)
    assert res.test is not None and res.test.p_value == pytest.approx(min(1.0, 3 * best.p_value))
    assert res.evidence.p_value == res.test.p_value and res.test.target == best.target
    assert ticks == [(i, 9) for i in range(1, 10)]  # one progress bar over the three splits
    plain = det.detect(tiny_vit_clean.wrapper, held_out, det.configure(ScanSettings(seed=2, budget="smoke")).with_(steps=3))
    assert plain.test is not None and plain.test.p_value == pytest.approx(each[0].p_value)  # one split: the seed's own


def test_more_images_than_the_cap_are_a_balanced_draw() -> None:
    data = synthetic(300, 10, 8, 0)
    cfg = NeuronNoiseConfig(max_images=100, seed=1)
    a, b = split_halves(data, cfg, torch.Generator().manual_seed(1))
    assert (len(a), len(b)) == (50, 50)
    assert torch.bincount(torch.cat([a.y, b.y]), minlength=10).tolist() == [10] * 10


def test_the_test_names_a_collapse_and_not_a_spread_or_one_class_pushed_onto_a_neighbour() -> None:
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
    # twelve errors, all of class 0 onto class 1 (an accurate clean model's nearest neighbour): one source, no collapse
    near = np.diag(np.full(k, 10))
    near[0, 1] = 12
    t = inflow_test(_run(near.tolist()))
    assert t is not None and t.target == 1 and t.size.p_value < 1e-3 and (t.sources, t.erring) == (1, 1) and t.p_value == 1.0
    assert count_p(0, 0, k) == 1.0 and count_p(9, 9, k) < 1e-6
    # the "count" rule (measured, not adopted) takes the count test alone: one error is still p 1, a collapse smaller
    assert inflow_test(_run(one.tolist()), "count").p_value == 1.0
    t, c = inflow_test(_run(collapse.tolist())), inflow_test(_run(collapse.tolist()), "count")
    assert c.p_value == c.p_count <= t.p_value == max(t.size.p_value, t.p_count)


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
    for bad in ({"eps": 0.0}, {"eps": 1.5}, {"steps": 0}, {"max_images": 2}, {"alpha": 1.0}, {"p_rule": "min"}):
        with pytest.raises(UsageError):
            NeuronNoiseConfig(**bad).validate()  # type: ignore[arg-type]


def test_a_scan_writes_json_sarif_html_and_the_picture(tiny_vit_bd, held_out, tmp_path: Path) -> None:
    lm = LoadedModel(tiny_vit_bd.wrapper, "safetensors", tmp_path / "trap.safetensors", "0" * 64)
    settings = ScanSettings(budget="smoke", levels=("pixel",), seed=0)
    doc, det = scan_loaded(lm, held_out, tmp_path / "clean.npz", settings, ("neural-cleanse", "neuron-noise"), activations=False)
    out, js, sarif, html = tmp_path / "scan", tmp_path / "scan.json", tmp_path / "scan.sarif", tmp_path / "report.html"
    write_scan_outputs(doc, det, held_out, Outputs(folder=out, json=js, sarif=sarif, html=html), "trap.safetensors")
    doc = json.loads(js.read_text())
    assert doc["schema"] == "bdscan.scan/3"
    sec = doc["neuron_noise"]
    assert sec["evidence"]["status"] == "backdoor" and sec["evidence"]["target"] == TARGET and sec["evidence"]["weight"] == 0.1
    assert sec["config"]["eps"] == 0.1 and sec["config"]["steps"] == 4 and sec["config"]["seed"] == 0
    assert [s["label"] for s in sec["scores"]] == list(range(10)) and sec["test"]["max_label"] == TARGET
    assert np.asarray(sec["confusion"]).sum() == 100 and sec["images"]["inflow"].startswith("data:image/png;base64,")
    v = doc["verdict"]
    assert (v["status"], v["target"], v["rule"]) == ("backdoor", TARGET, "weighted-bonferroni-min-p")
    assert v["factors"] == pytest.approx({"neural-cleanse": 1.1, "neuron-noise": 11.0})
    assert v["decided_by"]["detector"] == "neuron-noise" and v["p_value"] == pytest.approx(11 * sec["evidence"]["p_value"], rel=1e-3)
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


def test_a_model_that_collapses_without_noise_gets_no_p_value(tiny_vit_clean, held_out) -> None:
    """An open pathway (margin below zero: every input already goes to class 3) is no evidence the noise found: an
    untrained or broken model answers one class for everything too."""
    broken = ModelWrapper(Trap(tiny_vit_clean.wrapper.net, margin=-0.1), tiny_vit_clean.wrapper.info)
    assert bool((broken(held_out.x).argmax(1) == TARGET).all())
    r = _noise(broken, held_out)
    assert r.evidence.status == "inconclusive" and r.evidence.p_value is None, r.evidence.reason
    assert "without any noise" in r.evidence.reason and f"class {TARGET}" in r.evidence.reason
    assert r.run is not None and r.run.clean_confusion is not None and r.run.clean_confusion[:, TARGET].sum() == 100
    sec = r.section([f"class{k}" for k in range(10)], None, None)
    assert np.asarray(sec["clean_confusion"]).sum() == 100 and "test" not in sec
