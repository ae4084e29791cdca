"""The evaluation zoo's plan: deterministic, big enough, every cell full, and a split stratified by cell and attack."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bdscan.lab import evalzoo_plan, zoo
from bdscan.lab.attacks import AttackConfig, make_trigger
from bdscan.lab.evalzoo import DEFAULT_MANIFEST, dumps_rows, merge_plan, read_rows
from bdscan.lab.evalzoo_finetune import FinetuneRecipe
from bdscan.lab.evalzoo_plan import (
    ARCHS,
    DATASETS,
    DEFAULT_SEED,
    HF_CELLS,
    HF_SLOTS,
    HF_TWINS,
    INPUT_SIZE,
    KINDS,
    MEASURED,
    balanced_matrix,
    base_file,
    finetune_recipe,
    plan_rows,
    planned_part,
)

REQUIRED = ("name", "file", "arch", "dataset", "attack", "target", "trigger", "clean_acc", "asr", "seed", "split", "sha256",
            "finetune", "base", "base_sha256")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return plan_rows(DEFAULT_SEED)


def test_the_plan_is_a_function_of_its_seed(rows: list[dict]) -> None:
    assert plan_rows(DEFAULT_SEED) == rows
    assert dumps_rows(plan_rows(DEFAULT_SEED)) == dumps_rows(rows)  # the same bytes on disk
    other = plan_rows(DEFAULT_SEED + 1)
    assert [r["name"] for r in other] == [r["name"] for r in rows]
    assert [r["seed"] for r in other] != [r["seed"] for r in rows] and [r["split"] for r in other] != [r["split"] for r in rows]


def test_size_cells_fields_and_targets(rows: list[dict]) -> None:
    bd = [r for r in rows if r["attack"] is not None]
    clean = [r for r in rows if r["attack"] is None]
    assert len(bd) >= 100 and len(clean) >= 36 and len({r["name"] for r in rows}) == len(rows)
    assert set(KINDS) == {"badnets_small", "badnets_large", "blended", "trojan", "sig", "wanet", "issba", "lowrate_patch"}
    cells = {(r["dataset"], r["arch"]) for r in rows if "format" not in r}
    assert cells == {(d, a) for d in DATASETS for a in ARCHS}
    for d, a in cells:
        in_cell = [r for r in rows if (r["dataset"], r["arch"]) == (d, a)]
        kinds = [r["attack"] for r in in_cell if r["attack"]]
        assert len(kinds) >= 6 and len(set(kinds)) >= 6 and set(kinds) == set(KINDS)
        assert sum(r["attack"] is None for r in in_cell) >= 3
        twins = {r["name"] for r in in_cell if r["attack"] is None}
        assert all(r["clean_twin"] in twins for r in in_cell if r["attack"])
    for r in rows:
        assert all(k in r for k in REQUIRED) and all(r[k] is None for k in MEASURED)
        json.dumps(r)
        FinetuneRecipe.from_dict(r["finetune"])  # a valid recipe
        if r["attack"] is None:
            assert r["target"] is None and r["trigger"] is None and r["finetune"]["poison_rate"] == 0
        else:
            assert 0 <= r["target"] < DATASETS[r["dataset"]] and r["finetune"]["poison_rate"] > 0
    low = [r for r in bd if r["attack"] == "lowrate_patch"]
    assert {r["finetune"]["poison_rate"] for r in low} == {0.01}
    # targets are drawn, not fixed: many different ones per data set
    assert len({r["target"] for r in bd if r["dataset"] == "gtsrb"}) >= 20


def test_badnets_small_patches_sit_on_and_off_the_token_grid(rows: list[dict]) -> None:
    for r in rows:
        if r["attack"] != "badnets_small":
            continue
        p = r["trigger"]["params"]
        on = p["position"][0] % 4 == 0 and p["position"][1] % 4 == 0 and p["size"] == 4
        assert 3 <= p["size"] <= 5
        assert on == r["name"].endswith("_badnets_grid")
    large = [r["trigger"]["params"]["size"] for r in rows if r["attack"] == "badnets_large"]
    assert set(large) == {8}
    blends = Counter(r["trigger"]["params"]["pattern"] for r in rows if r["attack"] == "blended" and "format" not in r)
    assert blends["noise"] == blends["procedural"] == 6
    assert all(0.1 <= r["trigger"]["params"]["alpha"] <= 0.2 for r in rows if r["attack"] == "blended")


def test_every_planned_trigger_builds(rows: list[dict]) -> None:
    for r in rows:
        if r["attack"] and r["trigger"]["name"] != "trojan":  # trojan's needs the base; its parameters are checked here
            t = make_trigger(AttackConfig(r["trigger"]["name"], r["target"], r["trigger"]["params"]), INPUT_SIZE)
            assert t.mask.shape == INPUT_SIZE[1:]


def test_split_is_stratified_by_cell_and_by_attack(rows: list[dict]) -> None:
    for cell in {r["cell"] for r in rows}:
        in_cell = [r for r in rows if r["cell"] == cell]
        c = Counter(r["split"] for r in in_cell)
        assert c["calibration"] == c["evaluation"] == len(in_cell) // 2
        twins = Counter(r["split"] for r in in_cell if r["attack"] is None)
        assert twins["calibration"] >= 1 and twins["evaluation"] >= 1
    for d in DATASETS:
        for kind in KINDS:
            c = Counter(r["split"] for r in rows if r["dataset"] == d and r["attack"] == kind and "format" not in r)
            assert c["calibration"] == c["evaluation"]
        c = Counter(r["split"] for r in rows if r["dataset"] == d and r["attack"] is None)
        assert c["calibration"] == c["evaluation"]  # folder cells too: one twin in each half
        # slot by slot too (the two small-patch slots separately)
        grid = [r for r in rows if r["dataset"] == d and "format" not in r]
        for slot in {r["name"].split("_", 2)[2] for r in grid}:
            c = Counter(r["split"] for r in grid if r["name"].endswith("_" + slot))
            if not slot.startswith("clean"):
                assert c["calibration"] == c["evaluation"], slot


def test_balanced_matrix_keeps_its_sums_and_is_random() -> None:
    rows_s, cols_s = [4, 5, 4, 5, 4, 5], [3] * 9
    a = balanced_matrix(rows_s, cols_s, np.random.default_rng(0))
    b = balanced_matrix(rows_s, cols_s, np.random.default_rng(1))
    for m in (a, b):
        assert m.sum(1).tolist() == rows_s and m.sum(0).tolist() == cols_s and set(np.unique(m)) <= {0, 1}
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        balanced_matrix([10, 0], [1, 9], np.random.default_rng(0))


def test_merge_keeps_measurements_of_unchanged_rows(rows: list[dict]) -> None:
    old = [dict(r) for r in rows[:3]]
    old[0].update(clean_acc=0.97, sha256="ab")
    old[1].update(clean_acc=0.5, seed=old[1]["seed"] + 1)  # re-planned: its measurement is stale
    merged = merge_plan(rows, old)
    assert merged[0]["clean_acc"] == 0.97 and merged[0]["sha256"] == "ab"
    assert merged[1]["clean_acc"] is None and merged[1]["seed"] == rows[1]["seed"]


def test_committed_manifest_holds_the_plan() -> None:
    assert DEFAULT_MANIFEST.name == "manifest.json"
    committed = read_rows(DEFAULT_MANIFEST)
    assert [planned_part(r) for r in committed] == [planned_part(r) for r in plan_rows(DEFAULT_SEED)]


def test_plan_command_is_idempotent(tmp_path: Path) -> None:
    m = tmp_path / "manifest.json"
    assert zoo.main(["plan", "--manifest", str(m)]) == 0
    first = m.read_bytes()
    assert zoo.main(["plan", "--manifest", str(m)]) == 0 and m.read_bytes() == first
    assert zoo.main(["plan", "--manifest", str(m), "--check"]) == 0
    assert zoo.main(["plan", "--manifest", str(m), "--check", "--seed", "5"]) == 1
    assert len(read_rows(m)) == len(plan_rows())


def test_folder_rows_are_hugging_face_folders_in_both_halves(rows: list[dict]) -> None:
    folders = [r for r in rows if r.get("format") == "hf-folder"]
    assert {r["cell"] for r in folders} == set(HF_CELLS)
    for cell, (dataset, arch, base_arch, conv) in HF_CELLS.items():
        in_cell = [r for r in folders if r["cell"] == cell]
        assert len(in_cell) == len(HF_SLOTS) + HF_TWINS
        assert all(r["arch"] == arch and r["dataset"] == dataset and r["convert"] == conv for r in in_cell)
        assert all(r["base"] == base_file(dataset, base_arch) and not r["file"].endswith(".safetensors") for r in in_cell)
        for bd in (True, False):
            halves = Counter(r["split"] for r in in_cell if (r["attack"] is not None) == bd)
            assert halves["calibration"] == halves["evaluation"] >= 1
    # the folder rows come after the grid, which they leave as it was
    assert rows[: len(rows) - len(folders)] == [r for r in rows if "format" not in r]


def test_a_family_recipe_for_one_kind_changes_that_family_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cnn, vit = finetune_recipe("bdscan_cnn6", "gtsrb", "wanet"), finetune_recipe("bdscan_vit", "gtsrb", "wanet")
    monkeypatch.setattr(evalzoo_plan, "FAMILY_KIND_RECIPES", {("transformer", "wanet"): {"steps": 1234, "lr": 1e-4}})
    assert finetune_recipe("bdscan_cnn6", "gtsrb", "wanet") == cnn
    changed = finetune_recipe("bdscan_vit", "gtsrb", "wanet")
    assert (changed.steps, changed.lr) == (1234, 1e-4) and changed.poison_rate == vit.poison_rate
    assert finetune_recipe("bdscan_vit", "gtsrb", "blended").steps != 1234
    assert finetune_recipe("bdscan_vit", "gtsrb", None).steps != 1234


def test_a_data_set_recipe_changes_that_data_set_and_family_only_and_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evalzoo_plan, "FAMILY_KIND_RECIPES", {("transformer", "wanet"): {"steps": 1234, "lr": 1e-4}})
    monkeypatch.setattr(evalzoo_plan, "DATASET_KIND_RECIPES", {("cifar10", "transformer", "wanet"): {"steps": 777}})
    cifar, gtsrb = finetune_recipe("bdscan_vit", "cifar10", "wanet"), finetune_recipe("bdscan_vit", "gtsrb", "wanet")
    assert (cifar.steps, cifar.lr) == (777, 1e-4)  # the data set's change on top of the family's
    assert (gtsrb.steps, gtsrb.lr) == (1234, 1e-4)
    assert finetune_recipe("bdscan_cnn6", "cifar10", "wanet").steps != 777
    assert finetune_recipe("bdscan_vit", "cifar10", None).steps != 777


def test_a_cell_recipe_changes_that_cell_only_and_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evalzoo_plan, "DATASET_KIND_RECIPES", {("cifar10", "transformer", "sig"): {"steps": 777, "lr": 1e-4}})
    monkeypatch.setattr(evalzoo_plan, "CELL_KIND_RECIPES", {("cifar10", "bdscan_deit", "sig"): {"steps": 999}})
    deit = finetune_recipe("bdscan_deit", "cifar10", "sig")
    assert (deit.steps, deit.lr) == (999, 1e-4)  # the cell's change on top of the data set's
    assert finetune_recipe("bdscan_vit", "cifar10", "sig").steps == 777
    assert finetune_recipe("bdscan_deit", "gtsrb", "sig").steps != 999
    assert finetune_recipe("bdscan_deit", "cifar10", "blended").steps != 999
    assert finetune_recipe("bdscan_deit", "cifar10", None).steps != 999


def test_the_cifar10_deits_sig_row_carries_its_cells_recipe(rows: list[dict]) -> None:
    steps = {(r["dataset"], r["arch"]): r["finetune"]["steps"] for r in rows if r["attack"] == "sig"}
    assert steps.pop(("cifar10", "bdscan_deit")) == 1200
    assert set(steps.values()) == {400}


@pytest.mark.parametrize("kind", ["blended", "issba"])
def test_the_cifar10_transformers_rows_carry_their_recipe(rows: list[dict], kind: str) -> None:
    steps = {(r["dataset"], r["arch"]): r["finetune"]["steps"] for r in rows if r["attack"] == kind}
    assert steps[("cifar10", "bdscan_cct")] == steps[("cifar10", "bdscan_vit")] == 1200
    assert steps[("gtsrb", "bdscan_cct")] == steps[("cifar10", "bdscan_cnn6")] == 400


def test_a_warp_rows_noise_mode_is_its_recipes(rows: list[dict]) -> None:
    wanet = [r for r in rows if r["attack"] == "wanet"]
    assert wanet and all(r["trigger"]["params"]["cross_ratio"] == r["finetune"]["cross_ratio"] for r in wanet)
    # the transformers' own WaNet recipe (FAMILY_KIND_RECIPES): no noise mode; the CNNs keep the paper's
    assert {r["finetune"]["cross_ratio"] for r in wanet if r["arch"] in ("bdscan_cnn6", "bdscan_resnet18")} == {2.0}
    assert {r["finetune"]["cross_ratio"] for r in wanet if r["arch"] not in ("bdscan_cnn6", "bdscan_resnet18")} == {0.0}


def test_the_transformers_low_rate_rows_train_three_times_longer(rows: list[dict]) -> None:
    lowrate = [r for r in rows if r["attack"] == "lowrate_patch"]
    assert lowrate
    steps = {r["arch"]: r["finetune"]["steps"] for r in lowrate}
    assert steps["bdscan_cnn6"] == steps["bdscan_resnet18"] == 800
    assert {steps[a] for a in ("bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct")} == {2400}
    assert all(r["finetune"]["poison_rate"] == 0.01 for r in lowrate)
