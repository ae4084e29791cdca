"""The study library on a tiny temporary zoo: a planted backdoor and its clean twin (tests/synth.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bdscan.study.run as study_run
from bdscan.errors import UsageError
from bdscan.io import save_safetensors
from bdscan.study import StudyConfig, run_study, write_study
from bdscan.study.tables import all_tables, precision_table, table1
from tests.conftest import TARGET, TinyFiles

torch.set_num_threads(1)

CFG = StudyConfig(budget="smoke", repair_epochs=1, activation_images=32, ks=(10, 100, 1000, 10**6))


def _zoo(root: Path, bd: TinyFiles, clean: TinyFiles) -> Path:
    d = bd.tiny.data
    np.savez(root / "samples.npz", x=(d.x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), y=d.y.numpy(),
             class_names=np.array([f"class{i}" for i in range(10)]))
    save_safetensors(bd.tiny.wrapper, root / "tiny_bd.safetensors", extra={"samples": "samples.npz"}, trigger=bd.tiny.trigger)
    save_safetensors(clean.tiny.wrapper, root / "tiny_clean.safetensors", extra={"samples": "samples.npz"})
    entries = [
        {"name": "tiny_clean", "arch": "bdscan_cnn6", "dataset": "gtsrb", "kind": "clean", "target": None, "clean_twin": None,
         "status": "built", "config_hash": "c0", "file": "tiny_clean.safetensors", "clean_acc": 0.9, "asr": None},
        {"name": "tiny_bd", "arch": "bdscan_cnn6", "dataset": "gtsrb", "kind": "badnets", "target": TARGET,
         "clean_twin": "tiny_clean", "status": "built", "config_hash": "b0", "file": "tiny_bd.safetensors", "clean_acc": 0.88,
         "asr": 0.99, "clean_twin_acc": 0.9},
        {"name": "tiny_vit", "arch": "bdscan_vit", "dataset": "cifar10", "kind": "badnets", "target": 1, "status": "queued"},
    ]
    m = root / "zoo.json"
    m.write_text(json.dumps(entries))
    return m


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_bd: TinyFiles, tiny_clean: TinyFiles) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("zoo")
    manifest = _zoo(root, tiny_bd, tiny_clean)
    out = root / "study"
    calls: list[tuple[str, int, int]] = []
    result = run_study(manifest, out, CFG, lambda *a: calls.append(a))
    paths = write_study(result, out)
    return {"manifest": manifest, "out": out, "result": result, "paths": paths, "calls": calls}


def test_study_outputs(study: dict[str, Any]) -> None:
    r, out = study["result"], study["out"]
    assert r.computed == ["tiny_clean", "tiny_bd"] and r.reused == []
    assert r.skipped == {"tiny_vit": "status queued"}
    assert study["calls"][0] == ("tiny_clean", 0, 2) and study["calls"][-1] == ("done", 2, 2)
    assert (out / "models" / "tiny_bd.json").is_file() and (out / "models" / "tiny_clean.json").is_file()

    bd = next(m for m in r.models if m["name"] == "tiny_bd")
    assert set(bd["scan"]) == {"pixel", "patch"}
    assert bd["scan"]["pixel"]["target_norm"] is not None and len(bd["scan"]["pixel"]["phase_norms"]) == 3
    assert bd["repair"]["original"]["after"]["clean_accuracy"] is not None
    rev = bd["repair"]["reversed"]
    assert rev is not None and rev["mode"] in ("pixel", "patch") and "asr_original" in rev["after"]
    acts = bd["activations"]
    assert acts["computed"] and 0 <= acts["poisoned"]["original"] <= 1 and acts["clean"] is not None
    assert 0 <= acts["clean"]["original"] <= 1
    prec = bd["precision"]["pixel"]
    assert len(prec["phases"]) == 3 and prec["neurons"] > 0
    capped = next(e for e in prec["final"] if e["k"] == 10**6)
    assert capped["capped"] and capped["k_used"] == prec["neurons"]
    assert bd["distance"]["pixel"] is not None and bd["distance"]["pixel"] >= 0
    clean = next(m for m in r.models if m["name"] == "tiny_clean")
    assert clean["repair"] is None and clean["scan"]["pixel"]["identified"] is None

    md = study["paths"]["markdown"].read_text()
    for i in range(1, 10):
        assert f"## Table {i}\n" in md
    assert "## Figures 3-5" in md and "## Section 5.4" in md
    assert "| tiny_bd |" in md and "| tiny_clean |" in md
    assert "Total wall time" in md and "torch" in md and "cores" in md
    assert "(figures/tiny_bd_pixel.png)" in md and (out / "figures" / "tiny_bd_patch.png").is_file()

    page = study["paths"]["html"].read_text()
    assert "<h2>Table 9</h2>" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and 'src="figures/' not in page

    doc = json.loads(study["paths"]["json"].read_text())
    assert doc["schema"] == "bdscan.study/1" and [m["name"] for m in doc["models"]] == ["tiny_clean", "tiny_bd"]
    assert doc["machine"]["torch"] == torch.__version__


def test_resume_skips_saved_models(study: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("scan must not run again")

    monkeypatch.setattr(study_run, "detect", boom)
    r = run_study(study["manifest"], study["out"], CFG)
    assert r.computed == [] and r.reused == ["tiny_clean", "tiny_bd"]
    assert r.models[1]["verdict"] == study["result"].models[1]["verdict"]
    # the --models filter picks models and does not change the configuration hash
    r = run_study(study["manifest"], study["out"], StudyConfig(**{**CFG.__dict__, "models": ("tiny_bd",)}))
    assert [m["name"] for m in r.models] == ["tiny_bd"] and r.reused == ["tiny_bd"]
    # another configuration would compute again
    with pytest.raises(AssertionError, match="must not run again"):
        run_study(study["manifest"], study["out"], StudyConfig(**{**CFG.__dict__, "seed": 1, "models": ("tiny_clean",)}))


def test_models_filter_unknown_name(study: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope"):
        run_study(study["manifest"], tmp_path, StudyConfig(models=("nope",)))


def test_hash_ignores_models_filter() -> None:
    e = {"name": "a", "config_hash": "x", "file": "a.safetensors"}
    assert CFG.hash_for(e) == StudyConfig(**{**CFG.__dict__, "models": ("a",)}).hash_for(e)
    assert CFG.hash_for(e) != StudyConfig(**{**CFG.__dict__, "budget": "fast"}).hash_for(e)
    assert CFG.hash_for(e) != CFG.hash_for({**e, "config_hash": "y"})


def test_hash_follows_the_budgets_values(monkeypatch) -> None:
    """A preset whose values change under the same name must not reuse results made with the old values."""
    from bdscan.detect import config

    e = {"name": "a", "config_hash": "x", "file": "a.safetensors"}
    before = CFG.hash_for(e)
    monkeypatch.setitem(config.BUDGETS, CFG.budget, config.BUDGETS[CFG.budget].with_(label_chunk=3))
    assert CFG.hash_for(e) == before  # how labels are grouped per forward is not part of the result
    monkeypatch.setitem(config.BUDGETS, CFG.budget, config.BUDGETS[CFG.budget].with_(steps=7))
    assert CFG.hash_for(e) != before


def _prec(ks: list[int], neurons: int, value: float = 0.5) -> list[dict[str, Any]]:
    return [{"k": k, "k_used": min(k, neurons), "capped": k > neurons, "precision": 1.0 if k >= neurons else value} for k in ks]


def test_precision_table_caps_at_neuron_count() -> None:
    ks = [10, 100, 1000]
    m = {"name": "m", "kind": "badnets", "precision": {"pixel": {"neurons": 100, "phases": [
        {"phase": 1, "precision": _prec(ks, 100, 0.3)}, {"phase": 2, "precision": None}, {"phase": 3, "precision": _prec(ks, 100, 0.6)}]}}}
    t7 = precision_table([m], ["pixel", "patch"], 1, ks)
    assert t7.title == "Table 7" and t7.headers == ["Model", "Mode", "Neurons", "K=10", "K=100", "K=1,000"]
    assert t7.rows == [["m", "pixel", "100", "0.30", "1.00", "–"]]
    assert any("neuron count" in n for n in t7.notes)
    assert precision_table([m], ["pixel"], 2, ks).rows == [["m", "pixel", "100", "–", "–", "–"]]
    assert precision_table([m], ["pixel"], 3, ks).rows[0][3] == "0.60"
    assert precision_table([{"name": "c", "kind": "clean"}], ["pixel"], 1, ks).rows == []


def test_table1_and_titles() -> None:
    bd = {"name": "bd", "dataset": "cifar10", "arch": "bdscan_vit", "kind": "badnets", "target": 2,
          "scan": {"pixel": {"anomaly_index": 2.5, "target_norm": 0.51234, "min_label": 2, "identified": True}},
          "verdict": {"status": "backdoor", "target": 2}}
    clean = {"name": "cl", "dataset": "cifar10", "arch": "bdscan_vit", "kind": "clean", "target": None,
             "scan": {"pixel": {"anomaly_index": "inf", "target_norm": None, "min_label": 0, "identified": None}},
             "verdict": {"status": "clean", "target": None}}
    t = table1([bd, clean], ["pixel"])
    assert t.rows[0][5:] == ["2.50", "0.512", "2", "yes", "backdoor", "2"]
    assert t.rows[1][5:] == ["inf", "–", "0", "–", "clean", "–"]
    titles = [x.title for x in all_tables([bd, clean], ["pixel"], [10])]
    assert titles == [f"Table {i}" for i in range(1, 10)] + ["Section 5.4"]
    tables = {x.title: x for x in all_tables([bd, clean], ["pixel"], [10])}
    assert tables["Table 2"].rows == [] and [r[0] for r in tables["Table 3"].rows] == ["bd"]
    other = all_tables([{**bd, "dataset": "mnist"}], ["pixel"], [10])
    assert "Table 2–3 (mnist)" in [x.title for x in other]


def test_failing_model_is_reported_not_saved(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    m = tmp_path / "zoo.json"
    m.write_text(json.dumps([{"name": "bad", "kind": "clean", "status": "built", "file": "bad.safetensors"}]))
    r = run_study(m, tmp_path / "out", CFG)
    assert r.models == [] and r.skipped["bad"].startswith("failed:")
    assert not (tmp_path / "out" / "models" / "bad.json").exists()


def test_hash_follows_what_auto_precision_means_on_this_cpu(monkeypatch) -> None:
    """bf16 results from one machine must not be reused where "auto" means float32, and the other way round."""
    from bdscan import machine

    e = {"name": "a", "config_hash": "x", "file": "a.safetensors"}
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    with_bf16 = CFG.hash_for(e)
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    assert CFG.hash_for(e) != with_bf16
