"""What a batch scans, without Ray: folder walks, the four manifest formats, per-row options over the command
line's, and the one-line usage errors a malformed row or a bad combination of options gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.batch import plan_batch
from bdscan.batch.cache import Cache, sha256_path
from bdscan.batch.engine import EngineOptions, RayEngine, plugin_modules
from bdscan.batch.inputs import Job, walk
from bdscan.cli import app
from bdscan.errors import UsageError
from bdscan.pipeline import ScanRequest


def bdscan(*args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def one_line_error(output: str, *needles: str) -> None:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bdscan error:") and "Traceback" not in output, output
    for n in needles:
        assert n in lines[0], output


def test_a_folder_walk_finds_the_models_and_says_why_it_skipped_the_rest(registry, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    (registry.dir / "sub" / "link.safetensors").symlink_to(outside)
    found, skipped = walk(registry.dir)
    assert [p.relative_to(registry.dir).as_posix() for p in found] == [
        "bd.safetensors", "clean.safetensors", "sub/corrupt.safetensors", "sub/hostile.pt"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons[".git"] == "hidden folder" and reasons["link.safetensors"] == "symbolic link out of the folder"
    assert reasons["notes.txt"].startswith("not a model format bdscan reads")
    assert not registry.marker.exists()  # sniffing reads 64 bytes; nothing is unpickled


def test_a_model_folder_is_one_model_and_is_not_descended(registry) -> None:
    from bdscan.commands.batch import wanted
    from bdscan.io import loaders

    if not any(getattr(loader, "folder", False) for loader in loaders().values()):
        pytest.skip("no loader reads model folders")
    vendor = registry.dir / "vendor" / "timm_model"
    vendor.mkdir(parents=True)
    (vendor / "config.json").write_text(json.dumps({"architecture": "bdscan_cnn6", "num_classes": 10, "pretrained_cfg": {}}))
    (vendor / "model.safetensors").write_bytes((registry.dir / "bd.safetensors").read_bytes())
    found, _ = walk(registry.dir)
    assert [p.relative_to(registry.dir).as_posix() for p in found] == [
        "bd.safetensors", "clean.safetensors", "sub/corrupt.safetensors", "sub/hostile.pt", "vendor/timm_model"]
    assert wanted([vendor], None) is False and wanted([registry.dir / "vendor"], None) is True  # one model folder: in-process


def _manifests(d: Path, rows: list[dict]) -> dict[str, Path]:
    import csv

    import yaml

    (d / "a.json").write_text(json.dumps(rows))
    (d / "a.jsonl").write_text("# a comment\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "a.yaml").write_text(yaml.safe_dump(rows))
    cols = sorted({k for r in rows for k in r})
    with (d / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows({k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows)
    return {p.suffix: p for p in d.iterdir() if p.is_file()}


def test_every_manifest_format_gives_the_same_jobs_with_rows_over_the_command_line(tmp_path: Path) -> None:
    d = tmp_path / "reg"
    (d / "v").mkdir(parents=True)
    rows = [{"model": "v/a.onnx", "data": "clean", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "budget": "quick"},
            {"model": "b.pt", "arch": "bdscan_cnn6", "num_classes": 43, "levels": "patch", "trust_pickle": True, "steps": 7,
             "second_look": "3:0.005:0.5"}]
    cli = {"budget": "smoke", "seed": 5, "data": Path("cli.npz"), "num_classes": 10, "activations": False}
    plans = {suffix: plan_batch([], m, cli) for suffix, m in _manifests(d, rows).items()}
    first = plans[".json"].jobs
    for suffix, plan in plans.items():
        assert [(j.request, j.slug) for j in plan.jobs] == [(j.request, j.slug) for j in first], suffix
    a, b = first
    assert a.request.model == d / "v" / "a.onnx" and a.request.data == d / "clean"  # relative to the manifest
    assert a.request.load.mean == (0.485, 0.456, 0.406) and a.request.load.num_classes == 10  # the command line's
    assert a.request.settings.budget == "quick" and a.request.settings.seed == 5 and a.request.activations is False
    assert b.request.data == Path("cli.npz") and b.request.load.num_classes == 43 and b.request.load.trust_pickle
    assert b.request.settings.levels == ("patch",) and b.request.settings.steps == 7 and b.request.settings.budget == "smoke"
    assert b.request.settings.second_look == (3, 0.005, 0.5) and a.request.settings.second_look == "auto"
    assert a.path.endswith("v/a.onnx") and a.slug != b.slug
    assert plans[".csv"].jobs[0].where == "a.csv line 2" and plans[".jsonl"].jobs[1].where == "a.jsonl line 3"


@pytest.mark.parametrize("name,text,needles", [
    ("m.csv", "model,budget\na.pt,fast\nb.pt,fastest\n", ["m.csv line 3", "budget 'fastest'", "expects one of"]),
    ("m.jsonl", '{"model": "a.pt"}\n{"model": "b.pt", "num_clases": 4}\n', ["m.jsonl line 2", "unknown option 'num_clases'"]),
    ("m.json", '[{"model": "a.pt"}, {"data": "x.npz"}]', ["m.json row 2", "no model"]),
    ("m.json", '[{"model": "a.pt", "num_classes": "ten"}]', ["m.json row 1", "num_classes 'ten' expects a whole number"]),
    ("m.yaml", "- model: a.pt\n- just a string\n", ["m.yaml item 2", "must be an object"]),
    ("m.yaml", "- model: a.pt\n  mean: [0.5, x]\n", ["m.yaml item 1", "mean"]),
    ("m.csv", "model,mean\na.pt,0.5,0.5\n", ["m.csv line 2", "3 cells for 2 columns"]),
    ("m.json", '{"model": "a.pt"}', ["m.json", "must be a list"]),
    ("m.jsonl", '{"model": "a.pt"\n', ["m.jsonl line 1", "not valid JSON"]),
    ("m.json", '[{"model": "a.pt", "threshold": -1}]', ["m.json row 1", "threshold"]),
    ("m.txt", "a.pt\n", ["unknown manifest format '.txt'"]),
    ("m.json", '[{"model": "a.pt", "levels": "pixel,voxel"}]', ["m.json row 1", "levels", "blend"]),
    ("m.json", '[{"model": "a.pt", "second_look": "30:0.005"}]', ["m.json row 1", "second_look", "not three values"]),
    ("m.json", '[{"model": "a.pt", "second_look": "90:0.005:0.5"}]', ["m.json row 1", "does not fit 90 steps"]),
    ("m.json", '[{"model": "a.pt", "second_look": "twice"}]', ["m.json row 1", "second_look", "auto, off or"]),
])
def test_a_malformed_manifest_row_is_one_usage_error_naming_the_row(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    m = tmp_path / name
    m.write_text(text)
    code, output = bdscan("scan", "--manifest", m, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(output, *needles)
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("args,needles", [
    (["scan"], ["no model given"]),
    (["scan", "{m}", "{m}"], ["needs --out DIR"]),
    (["scan", "{m}", "{m}", "--out", "{o}", "--report", "{o}/r.html"], ["--report is for one model"]),
    (["scan", "{d}", "--out", "{d}/out"], ["overlaps the input"]),
    (["scan", "{m}", "{m}", "--out", "{o}", "--num-classes", "1"], ["command line: num_classes 1 must be at least 2"]),
    (["scan", "{m}", "{m}", "--out", "{o}", "--ray-address", "127.0.0.1:1"], ["--ray-address 127.0.0.1:1: nothing answers there"]),
])
def test_batch_usage_errors(tiny_bd, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    fill = {"m": str(tiny_bd.model), "d": str(tiny_bd.model.parent), "o": str(tmp_path / "o")}
    code, output = bdscan(*[a.format(**fill) for a in args])
    assert code == 2, output
    one_line_error(output, *needles)


def test_one_model_keeps_the_in_process_scan(tiny_bd, tmp_path: Path, monkeypatch) -> None:
    import bdscan.batch.run as batch_run

    def no_ray(*a: object, **k: object) -> None:
        raise AssertionError("a single model must not start Ray")

    monkeypatch.setattr(batch_run, "RayEngine", no_ray)
    code, output = bdscan("scan", tiny_bd.model, "--data", tiny_bd.data, "--budget", "smoke", "--steps", "2", "--levels", "pixel",
                          "--no-activations", "-q", "--json", tmp_path / "s.json")
    assert code in (0, 1) and len(output.strip().splitlines()) == 1, output
    assert json.loads((tmp_path / "s.json").read_text())["schema"] == "bdscan.scan/3"


def test_each_task_declares_its_cpus_and_a_gpu_for_cuda_and_ships_plug_in_detectors(tmp_path: Path) -> None:
    from bdscan.detect import DETECTORS, ScanSettings, register_detector
    from tests.detect.test_plugin import MeanScore

    eng = RayEngine(EngineOptions(cpus_per_model=3, max_retries=4))
    cpu = Job(0, "a.pt", "a.pt", ScanRequest(Path("a.pt")), "argument 1")
    gpu = Job(1, "b.pt", "b.pt", ScanRequest(Path("b.pt"), settings=ScanSettings(device="cuda")), "argument 2")
    assert {k: eng.task_options(cpu)[k] for k in ("num_cpus", "num_gpus", "max_retries", "retry_exceptions")} == \
        {"num_cpus": 3, "num_gpus": 0, "max_retries": 4, "retry_exceptions": False}
    assert eng.task_options(gpu)["num_gpus"] == 1
    register_detector(MeanScore)
    try:
        plug = Job(2, "c.pt", "c.pt", ScanRequest(Path("c.pt"), detectors=("mean-score", "neural-cleanse")), "argument 3")
        assert plugin_modules([cpu, plug]) == ("tests.detect.test_plugin",)  # the worker imports it; built-ins need nothing
    finally:
        DETECTORS.pop("mean-score", None)


def test_the_cache_key_follows_model_data_and_configuration(tmp_path: Path) -> None:
    from bdscan.detect import ScanSettings

    data = tmp_path / "clean"
    (data / "0").mkdir(parents=True)
    (data / "0" / "a.png").write_bytes(b"1")
    cache = Cache(tmp_path / "out")
    base = ScanRequest(Path("m.pt"), data=data)
    key = cache.key(base, "0" * 64)
    assert key == Cache(tmp_path / "out").key(base, "0" * 64)
    assert key != cache.key(base, "1" * 64)  # another model file
    assert key != cache.key(ScanRequest(Path("m.pt"), data=data, settings=ScanSettings(seed=1)), "0" * 64)
    assert key == cache.key(ScanRequest(Path("m.pt"), data=data, settings=ScanSettings(workers=2)), "0" * 64)  # same results
    before = sha256_path(data)
    (data / "0" / "a.png").write_bytes(b"2")
    assert sha256_path(data) != before and Cache(tmp_path / "out").key(base, "0" * 64) != key  # the data changed
    with pytest.raises(UsageError, match="no model"):
        plan_batch([], None, {})
