"""The zoo builder: builds a tiny manifest, resumes without rebuilding, rebuilds on a config change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import bdscan.lab.zoo as zoo
from bdscan.io import load_model
from bdscan.lab.zoo import ZooEntry, build_zoo, config_hash, default_manifest, read_manifest


def _entries(npz: Path, epochs: int = 2) -> list[ZooEntry]:
    tiny = {"epochs": epochs, "test_subsample": None, "batch_size": 32, "lr": 3e-3}
    inj = {"epochs": 3, "test_subsample": None, "batch_size": 32, "poison_rate": 0.2, "lr": 3e-3, "max_train": 0}
    return [
        ZooEntry("s_cnn6_clean", "bdscan_cnn6", "synth", train=tiny, data=str(npz)),
        ZooEntry("s_cnn6_badnets", "bdscan_cnn6", "synth", "badnets", 1, {"size": 4, "position": "bottom-right"},
                 clean_twin="s_cnn6_clean", inject=inj, data=str(npz)),
    ]


@pytest.fixture(scope="module")
def built(lab_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(_entries(lab_npz), out, samples_per_class=5)
    return out


def test_build_writes_models_manifest_samples_and_readme(built: Path) -> None:
    recs = {r["name"]: r for r in json.loads((built / "zoo.json").read_text())}
    assert set(recs) == {"s_cnn6_clean", "s_cnn6_badnets"}
    assert all(r["status"] == "built" and r["size_bytes"] > 0 and r["seconds"] > 0 for r in recs.values())
    bd = recs["s_cnn6_badnets"]
    assert bd["asr"] is not None and bd["clean_twin_acc"] == recs["s_cnn6_clean"]["clean_acc"]
    assert isinstance(bd["counts"], bool) and bd["file"] == "s_cnn6_badnets.safetensors"
    with np.load(built / "synth_samples.npz", allow_pickle=False) as d:
        assert d["x"].dtype == np.uint8 and d["x"].shape == (20, 16, 16, 3) and d["y"].dtype == np.int64
        assert np.bincount(d["y"]).tolist() == [5, 5, 5, 5] and list(d["class_names"]) == ["red", "green", "blue", "yellow"]
    loaded = load_model(built / "s_cnn6_badnets.safetensors")
    md = loaded.wrapper.info.metadata
    assert md["samples"] == "synth_samples.npz" and md["zoo"]["weights_dtype"] == "float16"
    assert md["attack_success_rate"] == bd["asr"] and loaded.original_trigger is not None
    assert "s_cnn6_badnets" in (built / "README.md").read_text()


def test_second_build_skips_built_models(built: Path, lab_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.glob("*.safetensors")}

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt a model that was up to date")

    monkeypatch.setattr(zoo, "_build_one", boom)
    recs = build_zoo(built / "zoo.json", built)
    assert all(r["status"] == "built" for r in recs)
    assert {p.name: p.stat().st_mtime_ns for p in built.glob("*.safetensors")} == mtimes


def test_changed_config_rebuilds_and_only_pulls_in_the_twin(built: Path, lab_npz: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    built = Path(shutil.copytree(built, tmp_path / "zoo"))  # a private copy: this test changes the manifest
    calls: list[str] = []
    monkeypatch.setattr(zoo, "_build_one", lambda e, *a, **k: calls.append(e.name) or {})
    changed = _entries(lab_npz, epochs=3)  # the clean model's recipe changed -> both are stale
    build_zoo(changed, built, only=["s_cnn6_badnets"])
    assert calls == ["s_cnn6_clean", "s_cnn6_badnets"]


def test_default_manifest_is_consistent() -> None:
    entries = default_manifest()
    by = {e.name: e for e in entries}
    assert len(by) == len(entries) == 28
    assert [e.name for e in entries[:6]] == ["gtsrb_cnn6_clean", "gtsrb_cnn6_badnets", "gtsrb_vit_clean",
                                             "gtsrb_vit_badnets", "cifar10_cnn6_clean", "cifar10_cnn6_badnets"]
    for e in entries:
        config_hash(e, by)  # every twin/teacher exists
        for dep in (e.clean_twin, e.teacher):
            if dep:
                assert entries.index(by[dep]) < entries.index(e)  # dependencies come first
    kinds = {(e.dataset, e.kind) for e in entries}
    assert {("gtsrb", "blended"), ("gtsrb", "trojan"), ("cifar10", "blended"), ("cifar10", "trojan")} <= kinds
    assert len({e.target for e in entries if e.kind == "badnets"}) >= 10
    assert read_manifest(Path("/nonexistent/zoo.json"))[0]["name"] == "gtsrb_cnn6_clean"
