"""What a scan suggests runs as printed, and what it writes keeps the user's relative paths (issue #27, items 3 and 8).

The scan runs from a folder whose name has a space, with relative paths, as a user in a checkout would; the
repair command its console and report suggest is executed as printed from that same folder, and so is the
command the repair report suggests next. SARIF names the model relative to that folder (``%SRCROOT%``), valid
against the SARIF 2.1.0 schema.
"""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from bdscan.cli import app

runner = CliRunner()
SMOKE = ["--budget", "smoke", "--steps", "20", "--levels", "pixel", "--no-activations"]
SCHEMA = Path(__file__).resolve().parent.parent / "data" / "sarif-schema-2.1.0.json"


def run(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def suggested(page: str, verb: str) -> list[str]:
    """The first ``bdscan <verb> ...`` command shown in a report, as the shell would split it."""
    m = re.search(rf"<code>(bdscan {verb} [^<]*)</code>", page)
    assert m, f"the report suggests no `bdscan {verb}` command"
    args = shlex.split(html.unescape(m.group(1)))
    assert args[:2] == ["bdscan", verb]
    return args[1:]


def sarif_location(path: Path) -> dict[str, Any]:
    log = json.loads(path.read_text(encoding="utf-8"))
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    errors = list(validator.iter_errors(log))
    assert not errors, errors[0].message
    run_ = log["runs"][0]
    for r in run_["results"]:
        assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == run_["artifacts"][0]["location"]["uri"]
    return {**run_["artifacts"][0]["location"], "bases": run_.get("originalUriBaseIds")}


@pytest.fixture
def workdir(tiny_bd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    """A folder with a space in its name holding ``my models/bd.safetensors`` and ``my models/clean.npz``; the cwd."""
    wd = tmp_path / "audit run"
    (wd / "my models").mkdir(parents=True)
    shutil.copy(tiny_bd.model, wd / "my models" / "bd.safetensors")
    shutil.copy(tiny_bd.data, wd / "my models" / "clean.npz")
    monkeypatch.chdir(wd)
    return wd


@pytest.mark.slow
def test_the_suggested_repair_and_rescan_run_as_printed(workdir: Path) -> None:
    code, output = run("scan", "my models/bd.safetensors", "--data", "my models/clean.npz", *SMOKE,
                       "--out", "scan-out", "--report", "report.html", "--sarif", "scan.sarif")
    assert code == 1, output
    page = (workdir / "report.html").read_text(encoding="utf-8")
    args = suggested(page, "repair")
    assert args[args.index("--scan") + 1] == "scan-out" and args[args.index("--data") + 1] == "my models/clean.npz"
    assert "to remove it (from this folder): bdscan repair 'my models/bd.safetensors'" in output  # the console says the same
    code, output = run(*args)
    assert code == 0, output
    out = workdir / args[args.index("--out") + 1]
    repair_page = (workdir / args[args.index("--report") + 1]).read_text(encoding="utf-8")
    assert out.name == "bd-repaired.safetensors" and out.is_file()
    assert "PASSED" in repair_page and f"written to {out.name}" in repair_page
    # the repair report's verdict box no longer says to run a repair; it says the repair ran and how to check it
    assert "Remove the backdoor by unlearning" not in repair_page and "A repair ran and passed its checks" in repair_page
    code, output = run(*suggested(repair_page, "scan"))
    assert code in (0, 1), output
    assert (workdir / "bd-repaired-scan.html").is_file()


def test_outputs_keep_relative_paths_and_sarif_is_relative_to_the_folder(workdir: Path) -> None:
    code, output = run("scan", "my models/bd.safetensors", "--data", "my models/clean.npz", *SMOKE, "--steps", "2",
                       "--out", "scan-out", "--report", "report.html", "--sarif", "scan.sarif")
    assert code in (0, 1), output
    doc = json.loads((workdir / "scan-out" / "scan.json").read_text(encoding="utf-8"))
    assert doc["invocation"] == {"model": "my models/bd.safetensors", "data": "my models/clean.npz", "scan_folder": "scan-out",
                                 "load_args": []}
    assert doc["data"]["source"] == "my models/clean.npz"
    for f in ("scan-out/scan.json", "report.html", "scan.sarif"):
        assert str(workdir) not in (workdir / f).read_text(encoding="utf-8"), f  # no absolute local path leaks
    loc = sarif_location(workdir / "scan.sarif")
    assert loc["uri"] == "my%20models/bd.safetensors" and loc["uriBaseId"] == "%SRCROOT%"
    assert set(loc["bases"]) == {"%SRCROOT%"} and "uri" not in loc["bases"]["%SRCROOT%"]
    # re-rendered later from the folder: the same location, not a bare file name
    code, output = run("report", "scan-out", "-o", "again.html", "--sarif", "again.sarif")
    assert code == 0, output
    assert sarif_location(workdir / "again.sarif")["uri"] == "my%20models/bd.safetensors"


def test_an_absolute_model_path_gives_a_file_uri(workdir: Path) -> None:
    model = (workdir / "my models" / "bd.safetensors").resolve()
    code, output = run("scan", model, "--data", "my models/clean.npz", *SMOKE, "--steps", "2", "--sarif", "abs.sarif", "-q")
    assert code in (0, 1), output
    loc = sarif_location(workdir / "abs.sarif")
    assert loc["uri"] == "file://" + str(model).replace(" ", "%20") and "uriBaseId" not in loc and loc["bases"] is None


def test_a_bundled_sample_s_data_is_named_relative_to_the_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from bdscan.io import load_model
    from bdscan.pipeline import resolve_data

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    lm = load_model(Path("benchmarks/lab_zoo/cifar10_cnn6_badnets.safetensors"))
    assert resolve_data(None, lm) == Path("benchmarks/lab_zoo/cifar10_samples.npz")  # not /abs/path/benchmarks/...
