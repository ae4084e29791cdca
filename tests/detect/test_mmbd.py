"""MM-BD (maximum-margin detector): registry entry, every output, determinism, a p-value that means what it says,
scans without clean data, token-grid models, and one-line errors for a broken model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.data import CleanData
from bdscan.detect import DETECTORS, ScanSettings, get_detector
from bdscan.detect.mmbd import SCHEDULES, MMBDConfig, last_layer_norm, unnormalised
from bdscan.detect.mmbd_stats import FREE_LOCATION_FROM, fit_gamma, fit_gamma3, max_statistic_test
from bdscan.errors import NumericalError, UsageError
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from tests.conftest import TARGET
from tests.synth import square_trigger, train_tiny

runner = CliRunner()
#: a short schedule: 30 Adam steps from 2 random starts per class find the tiny backdoor with a wide margin
QUICK = ScanSettings(budget="quick", seed=0)


def _mmbd(wrapper: ModelWrapper, data: CleanData | None, settings: ScanSettings = QUICK, **changes: object):  # type: ignore[no-untyped-def]
    det = get_detector("mm-bd")
    cfg = det.configure(settings).with_(**changes)
    return det.detect(wrapper, data, cfg)


# ---------------------------------------------------------------------------------------------- the detector


def test_it_finds_the_planted_backdoor_and_passes_the_clean_twin(tiny_bd, tiny_clean) -> None:
    bd = _mmbd(tiny_bd.tiny.wrapper, tiny_bd.tiny.data)
    assert bd.evidence.status == "backdoor" and bd.evidence.target == TARGET, bd.evidence.reason
    assert bd.evidence.p_value is not None and bd.evidence.p_value < 0.05
    assert bd.evidence.score > bd.evidence.threshold  # the largest margin lies beyond the critical value
    assert f"class {TARGET}" in bd.evidence.reason and "p = " in bd.evidence.reason
    clean = _mmbd(tiny_clean.tiny.wrapper, tiny_clean.tiny.data)
    assert clean.evidence.status == "clean" and clean.evidence.p_value > 0.05, clean.evidence.reason
    assert clean.evidence.score <= clean.evidence.threshold


def test_same_seed_same_answer_and_the_seed_reaches_every_random_choice(tiny_bd) -> None:
    a = _mmbd(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanSettings(budget="smoke", seed=3))
    b = _mmbd(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanSettings(budget="smoke", seed=3))
    assert (a.evidence.p_value, a.evidence.target) == (b.evidence.p_value, b.evidence.target)
    np.testing.assert_array_equal(a.run.per_start, b.run.per_start)
    c = _mmbd(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanSettings(budget="smoke", seed=4))
    assert not np.array_equal(a.run.per_start, c.run.per_start)
    assert c.evidence.target == TARGET  # another seed, the same suspect


def test_no_clean_data_is_needed(tiny_bd) -> None:
    w = tiny_bd.tiny.wrapper
    empty = CleanData(torch.empty(0, 3, 16, 16), torch.empty(0, dtype=torch.long))
    with_data = _mmbd(w, tiny_bd.tiny.data)
    assert with_data.measured["baseline"] == "clean-median" and with_data.run.baseline.shape == (10,)
    raw = _mmbd(w, tiny_bd.tiny.data, baseline="none")  # the reference's statistic: the maximum itself
    for data in (None, empty):
        r = _mmbd(w, data)
        assert r.measured["baseline"] == "none" and "baseline_note" in r.measured
        assert r.evidence.p_value == raw.evidence.p_value and r.evidence.target == TARGET and r.evidence.status == "backdoor"
        np.testing.assert_array_equal(r.run.per_start, with_data.run.per_start)  # the same search; only the baseline differs
        # clean starts asked for but no images: random starts alone, and the section says so
        r = _mmbd(w, data, clean_starts=2)
        assert r.measured["clean_starts"] == 0 and r.run.per_start.shape == (10, SCHEDULES["quick"].random_starts)
    r = _mmbd(w, tiny_bd.tiny.data, clean_starts=2)
    assert r.measured["clean_starts"] == 2 and r.run.per_start.shape == (10, SCHEDULES["quick"].random_starts + 2)
    assert r.evidence.target == TARGET


def test_token_grid_models_use_the_margin_before_the_last_layernorm() -> None:
    for arch in ("bdscan_vit", "bdscan_deit"):  # DeiT returns two heads' logits; the wrapper averages them
        t = train_tiny(arch, 4, 16, square_trigger(16, 1), epochs=2, n=64, patch_size=4)
        r = _mmbd(t.wrapper, None, ScanSettings(budget="smoke"))
        assert r.measured["statistic"] == "prenorm" and r.measured["norm"] == "LayerNorm" and r.measured["norm_scale"] > 0
        assert r.run.statistics.shape == (4,) and np.isfinite(r.run.statistics).all()
        logit = _mmbd(t.wrapper, None, ScanSettings(budget="smoke"), statistic="logit")
        assert logit.measured["statistic"] == "logit" and "norm" not in logit.measured


def test_the_unnormalised_norm_is_the_layernorm_when_the_scale_is_the_samples_own() -> None:
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    h = torch.randn(5, 8)
    h = (h - h.mean(-1, keepdim=True)) / h.std(-1, unbiased=False, keepdim=True) * 2.5 + 1.0  # every row's std is 2.5
    with unnormalised(norm, 2.5):
        out = norm(h)
    torch.testing.assert_close(out, norm(h), atol=1e-4, rtol=1e-4)
    with unnormalised(norm, 1.0):
        assert not torch.allclose(norm(h), out)  # a fixed scale, not the sample's own: the ceiling is gone
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), norm, torch.nn.Linear(8, 3))
    assert last_layer_norm(model, torch.randn(2, 8)) is norm
    assert last_layer_norm(torch.nn.Linear(8, 3), torch.randn(2, 8)) is None


class _Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 5), float("nan")) + 0 * x.sum()


class _NaNAtTheEdge(torch.nn.Module):
    """Finite logits inside the box, NaN once a pixel reaches 1 (random starts never do; the first steps do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        return torch.where((x.flatten(1).amax(1) >= 1.0)[:, None], torch.full_like(z, float("nan")), z)


def test_nan_logits_are_a_numerical_error_and_two_classes_are_inconclusive() -> None:
    for net in (_Broken(), _NaNAtTheEdge()):
        w = ModelWrapper(net, ModelInfo("broken", 5, (3, 8, 8)))
        with pytest.raises(NumericalError, match="NaN or inf"):
            _mmbd(w, None, ScanSettings(budget="smoke"))
    two = ModelWrapper(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)), ModelInfo("linear", 2, (3, 8, 8)))
    r = _mmbd(two, None, ScanSettings(budget="smoke"))
    assert r.evidence.status == "inconclusive" and r.evidence.p_value is None and r.arrays() == {} and not list(r.images(None))


def test_configure_maps_budgets_and_overrides_and_refuses_bad_values() -> None:
    det = get_detector("mm-bd")
    for name, sch in SCHEDULES.items():
        cfg = det.configure(ScanSettings(budget=name, seed=7))
        assert (cfg.steps, cfg.random_starts, cfg.optimiser, cfg.seed, cfg.budget) == (sch.steps, sch.random_starts, sch.optimiser, 7, name)
    assert SCHEDULES["original"] == SCHEDULES["original"].__class__(300, 30, "sgd", 0.01)  # the reference's schedule
    cfg = det.configure(ScanSettings(steps=11, device="cpu"))
    assert cfg.steps == 11 and cfg.alpha == 0.05 and cfg.to_dict()["statistic"] == "prenorm" and cfg.baseline == "clean-median"
    with pytest.raises(UsageError):
        det.configure(ScanSettings(budget="nope"))
    with pytest.raises(UsageError):
        det.configure(ScanSettings(steps=0))
    for bad in ({"alpha": 1.5}, {"optimiser": "lbfgs"}, {"statistic": "softmax"}, {"random_starts": 0}, {"bootstrap": 10}, {"baseline": "mean"}):
        with pytest.raises(UsageError):
            MMBDConfig(**bad).validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the p-value


def test_gamma_fits_are_maximum_likelihood() -> None:
    x = np.random.default_rng(0).gamma(3.0, 2.0, size=(4, 30))
    a, s = fit_gamma(x)
    for i in range(4):
        ea, _, es = stats.gamma.fit(x[i], floc=0)
        assert a[i] == pytest.approx(ea, rel=1e-4) and s[i] == pytest.approx(es, rel=1e-4)
    # three parameters (the reference's family), any sign: at least as likely as scipy's general-purpose fit
    x = x - 7.0
    a, loc, s, _ = fit_gamma3(x)
    for i in range(4):
        ours = stats.gamma.logpdf(x[i], a[i], loc=loc[i], scale=s[i]).sum()
        theirs = stats.gamma.logpdf(x[i], *stats.gamma.fit(x[i])).sum()
        assert loc[i] < x[i].min() and ours >= theirs - 0.05


@pytest.mark.parametrize(("k", "draws", "shift"), [(10, 150, 0.0), (43, 80, 3.0)])
def test_the_calibrated_p_value_holds_its_level_under_the_null_where_the_raw_one_does_not(k: int, draws: int, shift: float) -> None:
    rng = np.random.default_rng(k)
    tests = [max_statistic_test(rng.gamma(4.0, 1.5, size=k) + shift, bootstrap=150, seed=i) for i in range(draws)]
    assert {t.loc == 0.0 for t in tests} == {k < FREE_LOCATION_FROM}  # location 0 for few classes, free for many
    cal = np.mean([t.p_value < 0.05 for t in tests])
    raw = np.mean([t.p_raw < 0.05 for t in tests])
    assert cal <= 0.1, cal  # 0.05 expected; 0.1 leaves room for 150 draws
    assert raw > cal  # the reference's plug-in p-value (fit on the K - 1 smallest) flags clean models too often
    assert all((t.p_value < 0.05) == (t.top > t.critical) for t in tests)  # the critical value is the same rule


def test_a_planted_outlier_is_found_wherever_it_is() -> None:
    rng = np.random.default_rng(1)
    v = rng.gamma(20.0, 0.3, size=10)
    v[6] = 3 * v.max()
    t = max_statistic_test(v, seed=0)
    assert t.target == 6 and t.p_value < 0.01 and t.p_raw < t.p_value
    perm = rng.permutation(10)
    tp = max_statistic_test(v[perm], seed=0)
    assert perm[tp.target] == 6 and tp.p_value == t.p_value  # order of the classes does not matter
    assert max_statistic_test(v, seed=0) == t  # deterministic
    flat = max_statistic_test(np.full(10, 5.0))
    assert flat.p_value > 0.5  # no class stands out


def test_bad_statistics_raise_bdscan_errors() -> None:
    with pytest.raises(NumericalError):
        max_statistic_test(np.array([1.0, np.nan, 2.0, 3.0]))
    with pytest.raises(ValueError):
        max_statistic_test(np.array([1.0, 2.0]))
    t = max_statistic_test(np.array([-1.0, 0.5, 0.6, 0.7, 0.65, 0.55, 4.0]))  # negative statistics are no error
    assert t.target == 6 and t.loc < -1.0 and 0 < t.p_value <= 1


# ---------------------------------------------------------------------------------------------- the outputs


def _cli(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_listed_by_bdscan_detectors() -> None:
    code, out = _cli("detectors")
    assert code == 0 and "mm-bd (weight 1): per class, the largest logit margin" in out
    assert DETECTORS["mm-bd"].sarif_rule["id"] == "BDS004" and DETECTORS["mm-bd"].json_key == "mm_bd"


@pytest.mark.parametrize("detectors", ["mm-bd", "neural-cleanse,mm-bd"])
def test_a_scan_writes_json_sarif_html_and_the_picture(tiny_bd, tmp_path: Path, detectors: str) -> None:
    out, js, sarif, html = tmp_path / "scan", tmp_path / "scan.json", tmp_path / "scan.sarif", tmp_path / "report.html"
    code, output = _cli("scan", tiny_bd.model, "--data", tiny_bd.data, "--detectors", detectors, "--budget", "quick",
                        "--levels", "pixel", "--no-activations", "--out", out, "--json", js, "--sarif", sarif, "--report", html)
    assert code == 1 and "Traceback" not in output, output
    doc = json.loads(js.read_text())
    sec = doc["mm_bd"]
    assert sec["evidence"]["status"] == "backdoor" and sec["evidence"]["target"] == TARGET
    assert sec["evidence"]["details"]["p_value"] < 0.05 and sec["p_value"] == sec["evidence"]["details"]["p_value"]
    assert sec["config"]["steps"] == SCHEDULES["quick"].steps and sec["config"]["seed"] == 0
    assert [r["label"] for r in sec["scores"]] == list(range(10)) and sec["max_label"] == TARGET
    assert sec["null"]["family"] == "gamma" and sec["null"]["fitted_on"] == 9
    assert sec["images"]["null"].startswith("data:image/png;base64,")
    assert ("modes" in doc) == detectors.startswith("neural-cleanse")
    assert doc["verdict"]["status"] == "backdoor" and doc["verdict"]["target"] == TARGET
    ev = DETECTORS["mm-bd"].evidence_from_doc(doc)
    assert ev is not None and ev.status == "backdoor" and ev.details["p_value"] == sec["p_value"]
    with np.load(out / "triggers.npz") as z:
        assert z["mmbd_stats"].shape == (10,) and int(np.argmax(z["mmbd_stats"])) == TARGET
        assert z["mmbd_inputs"].shape == (10, 3, 16, 16)
    assert (out / "mm-bd" / "null.png").is_file() and (out / "mm-bd" / f"label{TARGET:03d}_input.png").is_file()
    log = json.loads(sarif.read_text())["runs"][0]
    mine = [r for r in log["results"] if r["ruleId"] == "BDS004"]
    assert len(mine) == 1 and "BDS004" in [r["id"] for r in log["tool"]["driver"]["rules"]]
    page = html.read_text()
    assert "MM-BD" in page and "</html>" in page
