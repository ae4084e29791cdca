"""The command line as a CI pipeline uses it: exit codes, JSON, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.cli import app
from bdscan.detect.config import BUDGET_SECOND_LOOK, BUDGETS
from tests.conftest import TARGET

runner = CliRunner()
SMOKE = ["--budget", "smoke", "--steps", "20", "--levels", "pixel", "--no-activations"]


def run(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def assert_one_line_error(output: str) -> None:
    assert "Traceback" not in output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("bdscan error:") or lines[0].startswith("bdscan finding:")


def test_backdoor_exit_1_json_and_out_dir(tiny_bd, tmp_path: Path) -> None:
    out, js = tmp_path / "scan", tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--out", out, "--json", js)
    assert code == 1, output
    assert "BACKDOOR SUSPECTED" in output
    doc = json.loads(js.read_text())
    assert doc["schema"] == "bdscan.scan/3"
    assert doc["verdict"]["status"] == "backdoor" and doc["verdict"]["target"] == TARGET
    assert doc["verdict"]["true_target"] == TARGET  # the tiny model carries its original trigger
    assert doc["seed"] == 0 and doc["config"]["inversion"]["steps"] == 20 and doc["config"]["budget"] == "smoke"
    assert doc["config"]["inversion"]["precision"] in ("fp32", "bf16")  # resolved, never "auto"
    assert len(doc["model"]["sha256"]) == 64 and doc["versions"]["bdscan"]
    labels = doc["modes"]["pixel"]["labels"]
    assert [r["label"] for r in labels] == list(range(10))
    assert all({"norm", "success_rate", "steps", "anomaly_index", "phases"} <= set(r) for r in labels)
    assert json.loads((out / "scan.json").read_text())["verdict"] == doc["verdict"]
    assert (out / "triggers.npz").exists()
    assert (out / "triggers" / "pixel" / f"label{TARGET:03d}_mask.png").exists()
    assert (out / "triggers" / "pixel" / f"label{TARGET:03d}_stamped.png").exists()


def test_precision_option_reaches_the_report(tiny_bd, tmp_path: Path) -> None:
    js = tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--precision", "fp32", "--json", js)
    assert code == 1, output
    assert "budget smoke (fp32)" in output
    assert json.loads(js.read_text())["config"]["inversion"]["precision"] == "fp32"
    assert "emulated" not in output


def test_forced_bf16_on_a_cpu_without_it_warns_and_the_report_says_so(tiny_bd, tmp_path: Path, monkeypatch) -> None:
    from bdscan import machine

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    js = tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--steps", "2", "--precision", "bf16",
                       "-q", "--json", js)
    assert code in (0, 1), output
    assert "runs emulated" in output and "--precision auto" in output  # shown even with -q
    doc = json.loads(js.read_text())
    assert doc["config"]["inversion"]["precision"] == "bf16"  # the user's choice is kept, not overridden
    assert doc["versions"]["cpu_bf16"] == "emulated" and doc["versions"]["cpu_capability"]


def test_fail_on_never_and_quiet(tiny_bd) -> None:
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--fail-on", "never", "--quiet")
    assert code == 0
    assert output.strip().startswith("BACKDOOR SUSPECTED") and len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["quick", "fast"])
def test_ci_budgets_flag_the_planted_backdoor(name: str, tiny_bd, tmp_path: Path) -> None:
    # every budget a CI gate may pick runs end to end through the CLI and finds the planted trigger
    js = tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "--budget", name, "--levels", "pixel", "--no-activations",
                       "--json", js, "-q")
    assert code == 1, output
    doc = json.loads(js.read_text())
    assert doc["config"]["budget"] == name and doc["verdict"]["target"] == TARGET
    want = BUDGETS[name]
    got = doc["config"]["inversion"]
    assert (got["steps"], got["samples"], got["batch_size"], got["batches_per_step"], got["lr"]) == (
        want.steps, want.samples, want.batch_size, want.batches_per_step, want.lr)
    own = BUDGET_SECOND_LOOK.get(name)  # the budget's two-look schedule, resolved against alpha, is in the document
    assert doc["config"]["second_look"] == (None if own is None else {
        "first_steps": own[0], "alpha_first": pytest.approx(own[1] * doc["config"]["alpha"]), "clean_above": own[2]})


def test_clean_model_exit_0(tiny_clean) -> None:
    # A calibrated test flags about α of clean models, and each kind of CPU trains this tiny model a little
    # differently (p 0.02-0.25 here at α 0.05): a test that must pass on every host asks at α 0.001.
    code, output = run("scan", tiny_clean.model, "--data", tiny_clean.data, *SMOKE, "--alpha", "0.001", "-q")
    assert code == 0, output
    assert output.startswith("CLEAN")


def test_same_seed_same_json_apart_from_timings(tiny_bd, tmp_path: Path) -> None:
    docs = []
    for i in range(2):
        js = tmp_path / f"{i}.json"
        run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--steps", "6", "--json", js, "-q")
        d = json.loads(js.read_text())
        d.pop("timings")
        docs.append(d)
    assert docs[0] == docs[1]


def test_no_data_for_non_sample_model_is_usage_error(tiny_bd) -> None:
    code, output = run("scan", tiny_bd.model, *SMOKE)
    assert code == 2
    assert_one_line_error(output)
    assert "--data" in output


@pytest.mark.parametrize("opt", ["--json", "--out", "--report", "--sarif"])
def test_output_equal_to_input_refused(tiny_bd, opt: str) -> None:
    before = tiny_bd.model.read_bytes()
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, opt, tiny_bd.model)
    assert code == 2
    assert_one_line_error(output)
    assert tiny_bd.model.read_bytes() == before


def test_corrupt_and_missing_model_exit_3(tiny_bd, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_bd.model.read_bytes()[:500])
    for path in (bad, tmp_path / "missing.safetensors"):
        code, output = run("scan", path, "--data", tiny_bd.data, *SMOKE)
        assert code == 3, output
        assert_one_line_error(output)


def test_bad_data_exit_3(tiny_bd, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    notnpz = tmp_path / "x.npz"
    notnpz.write_bytes(b"not a zip")
    for data in (empty, notnpz, tmp_path / "nope"):
        code, output = run("scan", tiny_bd.model, "--data", data, *SMOKE)
        assert code == 3, output
        assert_one_line_error(output)


def test_class_count_mismatch_exit_3(tiny_bd, tmp_path: Path) -> None:
    import numpy as np

    d = np.load(tiny_bd.data)
    y = d["y"].copy()
    y[0] = 25
    p = tmp_path / "mismatch.npz"
    np.savez(p, x=d["x"], y=y)
    code, output = run("scan", tiny_bd.model, "--data", p, *SMOKE)
    assert code == 3
    assert_one_line_error(output)
    assert "classes" in output


def test_bad_options_exit_2(tiny_bd) -> None:
    for extra in (["--budget", "nope"], ["--mean", "a,b"], ["--device", "tpu"], ["--input-size", "3,32"], ["--precision", "fp8"]):
        code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *extra)
        assert code == 2, (extra, output)
        assert "Traceback" not in output
    code, output = run("scan", tiny_bd.model, "--levels", "voxel")
    assert code == 2
    assert_one_line_error(output)
    assert "voxel" in output and "blend" in output  # names the choices


def test_levels_take_a_comma_list_and_the_report_keeps_every_level(tiny_bd, tmp_path: Path) -> None:
    js, html = tmp_path / "scan.json", tmp_path / "r.html"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "--budget", "smoke", "--steps", "3", "--levels",
                       "blend,pixel", "-q", "--json", js, "--report", html, "--no-activations", "--fail-on", "never")
    assert code == 0, output
    doc = json.loads(js.read_text())
    assert list(doc["modes"]) == ["pixel", "blend"] and doc["config"]["modes"] == ["pixel", "blend"]
    assert doc["modes"]["blend"]["params"][0]["name"] == "blend"
    assert "blend level" in html.read_text()


def test_inspect_json_and_models(tiny_bd) -> None:
    code, output = run("inspect", tiny_bd.model, "--json")
    assert code == 0
    d = json.loads(output)
    assert d["arch"] == "bdscan_cnn6" and d["num_classes"] == 10 and d["format"] == "safetensors"
    assert d["original_trigger"]["target"] == TARGET
    code, output = run("models", "--json")
    assert code == 0
    rows = json.loads(output)
    assert {r["name"] for r in rows} >= {"bdscan_cnn6", "bdscan_resnet18", "bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct"}
    vit = next(r for r in rows if r["name"] == "bdscan_vit")
    assert vit["token_grid"]["grid"] == [8, 8]


def test_report_rerender(tiny_bd, tmp_path: Path) -> None:
    out = tmp_path / "scan"
    run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--out", out, "-q")
    html, sarif = tmp_path / "r.html", tmp_path / "r.sarif"
    code, output = run("report", out, "-o", html, "--sarif", sarif)
    assert code == 0, output
    assert "<html" in html.read_text().lower()
    assert json.loads(sarif.read_text())["version"] == "2.1.0"
    code, output = run("report", tmp_path / "nothing", "-o", tmp_path / "x.html")
    assert code == 3
    assert_one_line_error(output)


def test_the_old_mode_option_still_works_with_a_deprecation_note(tiny_bd, tmp_path: Path) -> None:
    js = tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "--budget", "smoke", "--steps", "2", "--mode", "pixel",
                       "-q", "--json", js)
    assert code in (0, 1), output
    assert "--mode is deprecated" in output and "--levels" in output
    assert list(json.loads(js.read_text())["modes"]) == ["pixel"]
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "--mode", "pixel", "--levels", "patch", "-q")
    assert code == 2 and "disagree" in output


def test_detectors_lists_the_registry_and_an_unknown_detector_is_a_usage_error(tiny_bd) -> None:
    from bdscan.detect import DETECTORS

    code, output = run("detectors")
    assert code == 0
    assert [ln.split(" ")[0].split(":")[0] for ln in output.strip().splitlines()] == list(DETECTORS)
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "--detectors", "nope", "-q")
    assert code == 2 and "unknown detector 'nope'" in output and "neural-cleanse" in output


def test_bad_threshold_samples_and_unwritable_outputs_fail_before_any_work(tiny_bd, tmp_path: Path) -> None:
    for args, words in ((["--threshold", "-1"], "--threshold -1 is not positive"),
                        (["--samples-per-class", "0"], "--samples-per-class 0 is not positive"),
                        (["--out", "/proc/bdscan-nope"], "cannot write /proc/bdscan-nope"),
                        (["--json", "/proc/bdscan-nope.json"], "cannot write /proc/bdscan-nope.json")):
        code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, "-q", *args)
        assert code == 2 and words in output and "Traceback" not in output, (args, output)


def test_scan_says_what_it_wrote(tiny_bd, tmp_path: Path) -> None:
    out, js = tmp_path / "scan-out", tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--steps", "2", "--out", out, "--json", js)
    assert code in (0, 1), output
    assert f"wrote {out}" in output and f"wrote {js}" in output


def test_second_look_reaches_the_scan_and_a_bad_one_is_a_one_line_usage_error(tiny_bd, tmp_path: Path) -> None:
    js = tmp_path / "scan.json"
    code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--second-look", "12:0.005:0.5", "--json", js)
    assert code in (0, 1), output
    doc = json.loads(js.read_text())
    assert doc["config"]["second_look"] == {"first_steps": 12, "alpha_first": 0.005, "clean_above": 0.5}
    assert "two looks: a verdict after 12 steps, and after 20 only if that one is in doubt" in output  # the plan says so
    assert "look after" in doc["verdict"]["reason"]
    # the smoke budget has no schedule of its own: "auto" (the default) looks once, as "off" does
    for value in ("auto", "off"):
        code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--second-look", value, "--json", js)
        assert code in (0, 1), output
        doc = json.loads(js.read_text())
        assert doc["config"]["second_look"] is None and "look after" not in doc["verdict"]["reason"]
    for bad, says in (("30:0.005:0.5", "does not fit 20 steps"), ("12:0.06:0.5", "does not fit"), ("12:0.005", "not three"),
                      ("a:b:c", "not a step count")):
        code, output = run("scan", tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--second-look", bad)
        assert code == 2, (bad, output)
        assert_one_line_error(output)
        assert says in output, output
