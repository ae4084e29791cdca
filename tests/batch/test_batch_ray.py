"""``bdscan scan`` over a registry on a local Ray (2 CPUs, 127.0.0.1; one Ray for the module): the rows and the
exit code, the outputs (summary, SARIF valid against the 2.1.0 schema, index), the cache, per-row manifest
options, a worker that dies mid-task, and Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from bdscan.cli import app
from tests.batch.helpers import save_dies_once
from tests.conftest import TARGET

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "data" / "sarif-schema-2.1.0.json").read_text())
#: the cheapest scan that still flags the tiny backdoored model (tests/cli/test_cli_scan.py)
SMOKE = ["--budget", "smoke", "--steps", "20", "--levels", "pixel", "--no-activations"]


def bdscan(*args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def by_path(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(r["path"]).name: r for r in doc["rows"]}


def test_a_registry_folder_gives_one_row_per_model_and_a_rerun_is_served_from_the_cache(ray_local, registry, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # α 0.001: the clean model must stay clean on every kind of CPU (a calibrated test flags about α of clean models)
    code, output = bdscan("scan", registry.dir, "--data", registry.data, *SMOKE, "--alpha", "0.001", "--out", out)
    assert code == 1, output  # a finding (the backdoor, the unsafe pickle) wins over the corrupt file's exit 3
    assert "Traceback" not in output
    assert not registry.marker.exists()  # the hostile pickle's payload never ran
    doc = summary(out)
    rows = by_path(doc)
    assert list(rows) == ["bd.safetensors", "clean.safetensors", "corrupt.safetensors", "hostile.pt"]  # walk order
    bd, clean, corrupt, hostile = rows.values()
    assert bd["status"] == "backdoor" and bd["target"] == TARGET and bd["scores"]["neural-cleanse"] > 2
    assert clean["status"] in ("clean", "inconclusive") and clean["target"] is None
    assert corrupt["status"] == "error" and "corrupt.safetensors" in corrupt["error"] and corrupt["report"] is None
    assert hostile["status"] == "unsafe" and "posix.system" in hostile["error"]
    assert all(len(r["sha256"]) == 64 and not r["cached"] for r in doc["rows"])
    assert {r["torch_threads"] for r in doc["rows"] if r["status"] != "error"} == {1}  # torch threads = the task's CPUs
    assert doc["counts"] == {"backdoor": 1, "unsafe": 1, "error": 1, "inconclusive": int(clean["status"] == "inconclusive"),
                             "clean": int(clean["status"] == "clean"), "cached": 0, "total": 4}
    skipped = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert skipped == {".git": "hidden folder", "notes.txt": skipped["notes.txt"]} and "not a model format" in skipped["notes.txt"]
    assert doc["engine"]["name"] == "ray" and doc["engine"]["ray_version"] and doc["engine"]["cluster_resources"]["CPU"] == 2
    for r in (bd, clean, hostile):
        assert (out / r["folder"] / "scan.json").is_file() and (out / r["report"]).is_file()
    assert json.loads((out / bd["folder"] / "scan.json").read_text())["verdict"]["target"] == TARGET
    # one SARIF run, one artifact per model, each result pointing at its model's artifact
    sarif = json.loads((out / "bdscan.sarif").read_text())
    jsonschema.validate(sarif, SCHEMA)
    run = sarif["runs"][0]
    assert [Path(a["location"]["uri"]).name for a in run["artifacts"]] == list(rows)
    hits = {(r["ruleId"], r["locations"][0]["physicalLocation"]["artifactLocation"]["index"]) for r in run["results"]}
    assert ("BDS001", 0) in hits and ("BDS002", 3) in hits and not any(i in (1, 2) for _, i in hits if _ != "BDS003")
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert run["invocations"][0]["executionSuccessful"] is False
    assert [n["locations"][0]["physicalLocation"]["artifactLocation"]["index"] for n in notes] == [2]
    html = (out / "index.html").read_text()
    assert f'href="{bd["report"]}"' in html and f'href="{hostile["report"]}"' in html and "<script>" in html
    assert "http://" not in html.replace('href="http', "") and "src=" not in html  # self-contained
    # a rerun: every finished scan comes from the cache (the corrupt file is tried again)
    code2, output2 = bdscan("scan", registry.dir, "--data", registry.data, *SMOKE, "--alpha", "0.001", "--out", out)
    assert code2 == 1, output2
    assert "3 of 4 model(s) served from the cache" in output2
    again = by_path(summary(out))
    assert [r["cached"] for r in again.values()] == [True, True, False, True]
    assert {k: (r["status"], r["target"]) for k, r in again.items()} == {k: (r["status"], r["target"]) for k, r in rows.items()}
    # a changed option is another configuration: a miss
    code3, output3 = bdscan("scan", registry.dir / "bd.safetensors", registry.dir / "clean.safetensors", "--data", registry.data,
                            *SMOKE, "--seed", "1", "--out", out, "-q")
    assert code3 in (0, 1) and "from the cache" not in output3 and len(output3.strip().splitlines()) == 1, output3
    code4, output4 = bdscan("scan", registry.dir / "bd.safetensors", registry.dir / "clean.safetensors", "--data", registry.data,
                            *SMOKE, "--seed", "1", "--out", out)
    assert code4 == code3 and "2 of 2 model(s) served from the cache" in output4, output4
    assert "every model was served from the cache" in summary(out)["engine"]["note"]  # and Ray was not needed


def test_a_manifest_sets_options_per_row(ray_local, tiny_bd, tmp_path: Path) -> None:
    import torch

    from bdscan.io.build import create_net

    reg = tmp_path / "m"
    reg.mkdir()
    torch.manual_seed(0)  # weight-only: loads only with its architecture, classes and input size stated
    torch.save(create_net("bdscan_cnn6", 10, (3, 16, 16)).state_dict(), reg / "weights.pt")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    rows = [
        {"model": str(tiny_bd.model), "steps": 20},
        {"model": "weights.pt", "arch": "bdscan_cnn6", "num_classes": 10, "input_size": "3,16,16",
         "mean": mean, "std": ",".join(map(str, std)), "steps": 3, "seed": 0},
        {"model": "weights.pt", "steps": 2, "seed": 3, "arch": "bdscan_cnn6", "num_classes": 10, "input_size": [3, 16, 16]},
    ]
    (reg / "models.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    code, output = bdscan("scan", "--manifest", reg / "models.jsonl", "--data", tiny_bd.data, "--budget", "smoke",
                          "--levels", "pixel", "--no-activations", "--out", out, "-q")
    assert code == 1, output
    got = summary(out)["rows"]
    assert [r["where"] for r in got] == ["models.jsonl line 1", "models.jsonl line 2", "models.jsonl line 3"]
    docs = [json.loads((out / r["folder"] / "scan.json").read_text()) for r in got]
    assert [d["config"]["inversion"]["steps"] for d in docs] == [20, 3, 2]
    assert [d["seed"] for d in docs] == [0, 0, 3]
    assert [d["config"]["budget"] for d in docs] == ["smoke"] * 3 and all(list(d["modes"]) == ["pixel"] for d in docs)  # defaults
    assert docs[1]["model"]["format"] == "state-dict" and docs[1]["model"]["arch"] == "bdscan_cnn6"
    assert docs[1]["model"]["mean"] == pytest.approx(mean) and docs[1]["model"]["std"] == pytest.approx(std)
    assert docs[2]["model"]["mean"] != pytest.approx(mean)  # row 3 left the normalisation out: nothing leaks from row 2
    assert got[0]["status"] == "backdoor" and got[0]["target"] == TARGET
    assert len({r["folder"] for r in got}) == 3  # the same file twice: two folders


def test_a_worker_killed_mid_task_is_retried_and_the_batch_completes(ray_local, tiny_clean, tmp_path: Path) -> None:
    marker = tmp_path / "died-once"
    model = save_dies_once(tiny_clean.tiny.wrapper, tmp_path / "dies_once.pt", marker)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"model": model.name, "trust_pickle": True, "input_size": "3,16,16", "num_classes": 10}]))
    out = tmp_path / "out"
    code, output = bdscan("scan", "--manifest", manifest, "--data", tiny_clean.data, *SMOKE, "--steps", "2", "--out", out)
    assert marker.exists(), output  # the first try ended its worker process
    row = summary(out)["rows"][0]
    assert row["status"] in ("clean", "inconclusive", "backdoor"), row  # the retry, in a new worker, scanned it
    assert int(marker.read_text()) != 0 and code in (0, 1), output


def test_ctrl_c_cancels_the_running_tasks_and_writes_the_summary_of_what_finished(ray_local, tiny_bd, tmp_path: Path) -> None:
    from bdscan.batch import BatchEvents, plan_batch, run_batch

    class CtrlC(BatchEvents):
        def finished(self, row: dict[str, Any]) -> None:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C when the first model finished

    models = []
    for i in range(4):
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(tiny_bd.model.read_bytes())
        models.append(p)
    plan = plan_batch(models, None, {"data": tiny_bd.data, "budget": "smoke", "steps": 2, "levels": ["pixel"], "activations": False})
    out = tmp_path / "out"
    result = run_batch(plan, out, events=CtrlC())
    assert result.interrupted
    doc = summary(out)
    assert doc["interrupted"] is True and len(doc["rows"]) == 1 and len(doc["not_finished"]) == 3
    assert {Path(p).name for p in doc["not_finished"]} | {Path(doc["rows"][0]["path"]).name} == {p.name for p in models}
    assert (out / "index.html").is_file() and "did not finish" in (out / "index.html").read_text()
    # the session still works after the forced cancellation
    assert ray_local.get(ray_local.remote(lambda: 1).remote()) == 1


@pytest.mark.parametrize("args,expect", [
    (["--cpus-per-model", "3"], "no node of the Ray cluster has that many CPUs"),
])
def test_a_task_no_node_can_run_is_a_usage_error(ray_local, tiny_bd, tmp_path: Path, args: list[str], expect: str) -> None:
    code, output = bdscan("scan", tiny_bd.model, tiny_bd.model, "--data", tiny_bd.data, *SMOKE, "--out", tmp_path / "o", *args)
    assert code == 2 and expect in output, output
