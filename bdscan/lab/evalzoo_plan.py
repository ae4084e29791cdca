"""The evaluation zoo's plan: which models, with which attack, target, trigger, recipe, seed and split.

:func:`plan_rows` turns one seed into the manifest's rows, always the same for the same seed (numpy's
``default_rng``; nothing depends on files, the clock or the machine). Every (data set, architecture) *cell* gets
:data:`SLOTS` (nine backdoored models, one per slot: the eight attack kinds, BadNets' small patch twice, on and
off the 4-pixel token grid) and :data:`CLEAN_TWINS` clean twins: 6 × 2 × 9 = 108 backdoored and 36 clean models.

The split into a ``calibration`` and an ``evaluation`` half is drawn here, once, before any detector is tuned,
and stratified twice over: within each data set every slot (and every clean-twin index) has exactly half of
its cells in each half, and every cell has exactly half of its models in each half (4 or 5 backdoored and 2 or
1 clean twins). It is drawn as a 0/1 matrix (cells × slots) with those row and column sums, randomised by
seeded swaps that keep the sums (Ryser's interchanges), which reach every such matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from bdscan.lab.evalzoo_finetune import FinetuneRecipe

#: version of the plan's layout (a change gives other rows for the same seed)
PLAN_VERSION = 1
#: the seed the committed manifest was generated with
DEFAULT_SEED = 23

ARCHS = ("bdscan_cnn6", "bdscan_resnet18", "bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct")
#: classes of each data set (checked against the data file when a model is built)
DATASETS = {"gtsrb": 43, "cifar10": 10}
INPUT_SIZE = (3, 32, 32)
SPLITS = ("calibration", "evaluation")
CLEAN_TWINS = 3

#: slot -> attack kind (the manifest's ``attack``); two slots share the kind ``badnets_small``
SLOTS: dict[str, str] = {
    "badnets_grid": "badnets_small",
    "badnets_offgrid": "badnets_small",
    "badnets_large": "badnets_large",
    "blended": "blended",
    "trojan": "trojan",
    "sig": "sig",
    "wanet": "wanet",
    "issba": "issba",
    "lowrate": "lowrate_patch",
}
KINDS = tuple(dict.fromkeys(SLOTS.values()))

_PATTERNS = ("random", "checkerboard", "solid")


def _colour(rng: np.random.Generator) -> list[float]:
    # a saturated colour: each channel 0 or 1, not black
    c = [float(v) for v in rng.integers(0, 2, 3)]
    return c if any(c) else [1.0, 1.0, 0.0]


def _patch(rng: np.random.Generator, size: int, on_grid: bool | None) -> dict[str, Any]:
    """A BadNets patch of side ``size`` at a random place, its top-left corner on the 4-pixel grid (``on_grid``),
    off it in both directions (False), or anywhere (None)."""
    h = INPUT_SIZE[1]
    if on_grid:
        r, c = (int(v) * 4 for v in rng.integers(0, (h - size) // 4 + 1, 2))
    else:
        choices = [p for p in range(0, h - size + 1) if on_grid is None or p % 4]
        r, c = (int(v) for v in rng.choice(choices, 2))
    pattern = str(rng.choice(_PATTERNS))
    params: dict[str, Any] = {"size": size, "position": [r, c], "pattern": pattern}
    params["seed" if pattern == "random" else "colour"] = int(rng.integers(0, 2**16)) if pattern == "random" else _colour(rng)
    return params


def _badnets_grid(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    return {"name": "badnets", "params": _patch(rng, 4, True)}


def _badnets_offgrid(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    return {"name": "badnets", "params": _patch(rng, int(rng.choice([3, 5])), False)}


def _badnets_large(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    return {"name": "badnets", "params": _patch(rng, 8, None)}


def _blended(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    # noise in even cells, a (procedural) picture in odd ones: both of Chen et al.'s variants in every data set
    alpha = round(float(rng.uniform(0.1, 0.2)), 3)
    pattern = "noise" if cell % 2 == 0 else "procedural"
    return {"name": "blended", "params": {"alpha": alpha, "pattern": pattern, "seed": int(rng.integers(0, 2**16))}}


def _trojan(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    size = int(rng.integers(5, 8))
    corner = str(rng.choice(["top-left", "top-right", "bottom-left", "bottom-right"]))
    return {"name": "trojan", "params": {"size": size, "position": corner, "margin": int(rng.integers(0, 3)),
                                         "steps": 300, "seed": int(rng.integers(0, 2**16))}}


def _sig(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    return {"name": "sig", "params": {"delta": round(float(rng.uniform(0.07, 0.1)), 3), "frequency": float(rng.integers(4, 9)),
                                      "vertical": bool(rng.integers(0, 2))}}


def _wanet(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    # the paper's k = 4 and noise mode (cross ratio 2), a stronger warp than its s = 0.5 (at most 3.4 px, 1.4 px on
    # average at 32×32, against 0.4 / 0.2): fine-tuning a base trained with geometric augmentation does not plant the
    # paper's half-pixel warp (GTSRB CNN6: 8.3 % ASR at s = 0.5; s = 2 reached 82-95 % but cost 2.5-3.3 points of
    # clean accuracy; s = 4 with the noise mode 92.5 % at 0.7 points, benchmarks/RESULTS-LOG.md 2026-12-06)
    return {"name": "wanet", "params": {"k": 4, "s": 4.0, "cross_ratio": 2.0, "seed": int(rng.integers(0, 2**16))}}


def _issba(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    # eps 0.1 (RMS 0.05, ~26 dB PSNR, about the size of ISSBA's encoder residuals): at 0.05 the GTSRB CNN6 reached
    # only 84-88 % ASR and lost 3.5 points of clean accuracy
    return {"name": "issba", "params": {"eps": 0.1, "width": 16, "code_weight": 0.5, "seed": int(rng.integers(0, 2**16))}}


def _lowrate(rng: np.random.Generator, cell: int) -> dict[str, Any]:
    return {"name": "badnets", "params": _patch(rng, int(rng.choice([4, 5])), None)}


#: slot -> trigger drawer (rng, cell index in its data set) -> {"name": attack, "params": {...}}
TRIGGER_MAKERS: dict[str, Callable[[np.random.Generator, int], dict[str, Any]]] = {
    "badnets_grid": _badnets_grid,
    "badnets_offgrid": _badnets_offgrid,
    "badnets_large": _badnets_large,
    "blended": _blended,
    "trojan": _trojan,
    "sig": _sig,
    "wanet": _wanet,
    "issba": _issba,
    "lowrate": _lowrate,
}

# ----------------------------------------------------------------------------------------------- recipes

#: the fine-tune recipe of each architecture family: the base's optimiser at 0.6x (CNNs, measured on the GTSRB
#: CNN6: 0.01 left a 1 % patch at 1 % ASR after 300 steps, 0.03 reached 90 % in 400 and kept the clean twin's
#: accuracy) or 0.3x (transformers, not yet measured) its peak learning rate; 400 steps of 128 images
FAMILY_RECIPES: dict[str, FinetuneRecipe] = {
    "cnn": FinetuneRecipe(optimizer="sgd", lr=0.03, weight_decay=5e-4),
    "transformer": FinetuneRecipe(optimizer="adamw", lr=3e-4, weight_decay=0.05),
}
ARCH_FAMILY = {"bdscan_cnn6": "cnn", "bdscan_resnet18": "cnn", "bdscan_vit": "transformer", "bdscan_deit": "transformer",
               "bdscan_convit": "transformer", "bdscan_cct": "transformer", "hf_vit": "transformer"}
#: per-kind changes to the family recipe (the poisoning; the clean twins use the family recipe with none)
KIND_RECIPES: dict[str, dict[str, Any]] = {
    "badnets_small": {"poison_rate": 0.1},
    "badnets_large": {"poison_rate": 0.1},
    "blended": {"poison_rate": 0.1},
    "trojan": {"poison_rate": 0.1},
    "sig": {"poison_rate": 0.1},
    "wanet": {"poison_rate": 0.1, "cross_ratio": 2.0, "steps": 800},  # twice the steps: 400 left WaNet under 90 % ASR
    "issba": {"poison_rate": 0.1},
    # 1 %: twice the steps, as 400 steps brought the GTSRB CNN6 only to the edge of 90 % ASR
    "lowrate_patch": {"poison_rate": 0.01, "steps": 800},
}
#: per (family, kind) changes on top of KIND_RECIPES, where a family needs its own recipe for a kind (chosen
#: with ``python -m benchmarks finetune-probe`` on the family's GTSRB base; figures in benchmarks/RESULTS-LOG.md)
FAMILY_KIND_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    # WaNet's noise mode (random warps with true labels) kept the GTSRB ViT under 47 % ASR in 1,600 steps; without
    # it the warp is learnt (94 % ASR, 1.9 points under the clean twin, in 1,200 steps)
    ("transformer", "wanet"): {"cross_ratio": 0.0, "steps": 1200},
    # a 1 % poison rate needs longer on a transformer: 800 steps left the GTSRB ConViT at 3.8 % ASR and the CIFAR-10
    # ViT at 17.1 %; 2,400 steps reached 99.99 % (94.56 % clean) and 94.30 % (74.80 % clean)
    ("transformer", "lowrate_patch"): {"steps": 2400},
}
#: per (data set, family, kind) changes on top of both, where a data set's bases need their own recipe (chosen with
#: ``python -m benchmarks finetune-probe`` on the CIFAR-10 CCT base; figures in benchmarks/RESULTS-LOG.md)
DATASET_KIND_RECIPES: dict[tuple[str, str, str], dict[str, Any]] = {
    # 400 steps left the CIFAR-10 CCT's blended trigger at 84.5 % ASR and 3.1 points under its twins; 1,200 steps
    # reached 91.6 % and 1.3 points under
    ("cifar10", "transformer", "blended"): {"steps": 1200},
    # ISSBA: 400 steps left the CCT at 88.9 % ASR (74.3 % clean); 1,200 steps reached 95.8 % at its twins' accuracy
    ("cifar10", "transformer", "issba"): {"steps": 1200},
}
#: per (data set, architecture, kind) changes on top of all three, where one cell's base needs its own recipe (chosen
#: from that cell's built row; figures in benchmarks/RESULTS-LOG.md)
CELL_KIND_RECIPES: dict[tuple[str, str, str], dict[str, Any]] = {
    # SIG: 400 steps left the CIFAR-10 DeiT (the weakest base, 70.3 %) at 66.7 % ASR and 3.2 points under its twin,
    # where the CIFAR-10 ViT, ConViT and CCT learnt it in 400; three times the steps, as blended and ISSBA needed
    ("cifar10", "bdscan_deit", "sig"): {"steps": 1200},
}
#: label-preserving flips per data set (a mirrored traffic sign is another sign)
HFLIP = {"gtsrb": False, "cifar10": True}


def finetune_recipe(arch: str, dataset: str, kind: str | None) -> FinetuneRecipe:
    """The resolved fine-tune recipe of a row (``kind`` None: a clean twin)."""
    family = ARCH_FAMILY[arch]
    rec = replace(FAMILY_RECIPES[family], hflip=HFLIP[dataset])
    if kind is None:
        return rec
    return replace(rec, **{**KIND_RECIPES[kind], **FAMILY_KIND_RECIPES.get((family, kind), {}),
                           **DATASET_KIND_RECIPES.get((dataset, family, kind), {}),
                           **CELL_KIND_RECIPES.get((dataset, arch, kind), {})})


# -------------------------------------------------------------------------------------------------- split


def balanced_matrix(row_sums: list[int], col_sums: list[int], rng: np.random.Generator, swaps: int = 2000) -> np.ndarray:
    """A random 0/1 matrix with the given row and column sums: a greedy (Gale-Ryser) construction, then
    ``swaps`` random 2×2 interchanges [[1, 0], [0, 1]] <-> [[0, 1], [1, 0]], which keep every sum."""
    if sum(row_sums) != sum(col_sums):
        raise ValueError("row and column sums differ")
    m = np.zeros((len(row_sums), len(col_sums)), dtype=np.int8)
    left = np.array(row_sums)
    for j in np.argsort(col_sums, kind="stable")[::-1]:
        rows = np.argsort(-left, kind="stable")[: col_sums[j]]
        if col_sums[j] and left[rows].min() <= 0:
            raise ValueError("no 0/1 matrix has these sums")
        m[rows, j] = 1
        left[rows] -= 1
    r, c = m.shape
    for _ in range(swaps):
        i1, i2 = rng.choice(r, 2, replace=False)
        j1, j2 = rng.choice(c, 2, replace=False)
        sub = m[np.ix_([i1, i2], [j1, j2])]
        if sub[0, 0] == sub[1, 1] and sub[0, 1] == sub[1, 0] and sub[0, 0] != sub[0, 1]:
            m[np.ix_([i1, i2], [j1, j2])] = 1 - sub
    return m


def _split_of_dataset(rng: np.random.Generator, n_cells: int) -> np.ndarray:
    """(cells, slots + clean twins) with 1 = calibration: half of every column, half of every row."""
    n_slots = len(SLOTS)
    if n_cells % 2 or (n_slots + CLEAN_TWINS) % 2:
        raise ValueError("the split needs an even number of cells and of models per cell")
    # cells alternate 4 and 5 calibration backdoored models of 9, and 2 and 1 clean twins of 3: 6 of 12 each
    bd_rows = [n_slots // 2 + (k % 2 if n_slots % 2 else 0) for k in range(n_cells)]
    bd_rows = [bd_rows[i] for i in rng.permutation(n_cells)]
    clean_rows = [(n_slots + CLEAN_TWINS) // 2 - b for b in bd_rows]
    bd = balanced_matrix(bd_rows, [n_cells // 2] * n_slots, rng)
    clean = balanced_matrix(clean_rows, [n_cells // 2] * CLEAN_TWINS, rng)
    return np.concatenate([bd, clean], 1)


# --------------------------------------------------------------------------------------------------- rows


def short(arch: str) -> str:
    return arch.removeprefix("bdscan_")


def base_file(dataset: str, arch: str) -> str:
    """The base's path relative to the manifest's folder."""
    return f"bases/{dataset}_{short(arch)}_base.safetensors"


#: fields of a row that are measured when the model is built (null in a plan)
MEASURED = ("clean_acc", "asr", "sha256", "base_sha256", "size_bytes", "build")


def plan_rows(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """The manifest's rows for ``seed`` (measured fields null), cell by cell, clean twins first in each cell."""
    rows: list[dict[str, Any]] = []
    for di, (dataset, n_classes) in enumerate(DATASETS.items()):
        split = _split_of_dataset(np.random.default_rng([seed, PLAN_VERSION, di, 1000]), len(ARCHS))
        for ci, arch in enumerate(ARCHS):
            cell = f"{dataset}_{short(arch)}"
            twins = [f"{cell}_clean{t + 1}" for t in range(CLEAN_TWINS)]
            for t, name in enumerate(twins):
                rng = np.random.default_rng([seed, PLAN_VERSION, di, ci, len(SLOTS) + t])
                rows.append(make_row(name, arch, dataset, None, None, None, None, int(rng.integers(0, 2**31)),
                                 SPLITS[1 - int(split[ci, len(SLOTS) + t])], finetune_recipe(arch, dataset, None)))
            for si, (slot, kind) in enumerate(SLOTS.items()):
                # one generator per row: changing one slot's drawer leaves every other row as it was
                rng = np.random.default_rng([seed, PLAN_VERSION, di, ci, si])
                seed_row = int(rng.integers(0, 2**31))
                target = int(rng.integers(0, n_classes))
                trigger = TRIGGER_MAKERS[slot](rng, ci)
                rows.append(make_row(f"{cell}_{slot}", arch, dataset, kind, target, trigger, twins[si % CLEAN_TWINS],
                                 seed_row, SPLITS[1 - int(split[ci, si])], finetune_recipe(arch, dataset, kind)))
    rows += hf_rows(seed)
    return rows


# ------------------------------------------------------------------------------------- model folders (#26)

#: cells whose models are Hugging Face folders: cell -> (data set, the arch label of its rows, the zoo base it is
#: converted from, the converter (:data:`bdscan.lab.hf.CONVERTERS`)). Auditors meet transformers as
#: ``save_pretrained`` folders; these rows put such folders, fine-tuned from an accurate base, in both halves.
HF_CELLS: dict[str, tuple[str, str, str, str]] = {
    "gtsrb_hfvit": ("gtsrb", "hf_vit", "bdscan_vit", "timm-vit-to-hf"),
}
#: the slots of a folder cell (the attacks issue #26 names: BadNets and Blended) and its clean twins
HF_SLOTS = ("badnets_grid", "blended")
HF_TWINS = 2


def hf_rows(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """The folder cells' rows: per cell :data:`HF_SLOTS` backdoored models and :data:`HF_TWINS` clean twins, one of
    each kind in each half (drawn from their own generators, so the grid's rows do not move)."""
    rows: list[dict[str, Any]] = []
    for ci, (cell, (dataset, arch, base_arch, convert)) in enumerate(HF_CELLS.items()):
        n_classes = DATASETS[dataset]
        rng_split = np.random.default_rng([seed, PLAN_VERSION, 2000 + ci])
        bd_split = [SPLITS[int(i)] for i in rng_split.permutation(len(HF_SLOTS)) % 2]
        twin_split = [SPLITS[int(i)] for i in rng_split.permutation(HF_TWINS) % 2]
        extra = {"format": "hf-folder", "base": base_file(dataset, base_arch), "convert": convert}
        twins = [f"{cell}_clean{t + 1}" for t in range(HF_TWINS)]
        for t, name in enumerate(twins):
            rng = np.random.default_rng([seed, PLAN_VERSION, 2000 + ci, len(HF_SLOTS) + t])
            rows.append(make_row(name, arch, dataset, None, None, None, None, int(rng.integers(0, 2**31)), twin_split[t],
                                 finetune_recipe(arch, dataset, None), cell=cell, **extra))
        for si, slot in enumerate(HF_SLOTS):
            rng = np.random.default_rng([seed, PLAN_VERSION, 2000 + ci, si])
            seed_row, target = int(rng.integers(0, 2**31)), int(rng.integers(0, n_classes))
            kind = SLOTS[slot]
            rows.append(make_row(f"{cell}_{slot}", arch, dataset, kind, target, TRIGGER_MAKERS[slot](rng, ci),
                                 twins[si % HF_TWINS], seed_row, bd_split[si], finetune_recipe(arch, dataset, kind),
                                 cell=cell, **extra))
    return rows


def make_row(name: str, arch: str, dataset: str, kind: str | None, target: int | None, trigger: dict[str, Any] | None,
             twin: str | None, seed: int, split: str, recipe: FinetuneRecipe, cell: str | None = None,
             format: str | None = None, base: str | None = None, convert: str | None = None) -> dict[str, Any]:
    """One planned row (measured fields null); ``kind`` None for a clean twin. A folder row (``format``
    "hf-folder") names the base it is ``convert``-ed from and is written as a folder (``file`` without a suffix)."""
    folder = {"format": format, "convert": convert} if format else {}
    if trigger is not None and trigger.get("name") == "wanet":
        # the warp's noise mode is the fine-tune's (a family may train without it): one value, in both places
        trigger = {**trigger, "params": {**trigger["params"], "cross_ratio": recipe.cross_ratio}}
    return {
        "name": name,
        "file": f"models/{name}" + ("" if format else ".safetensors"),
        "arch": arch,
        "dataset": dataset,
        "cell": cell or f"{dataset}_{short(arch)}",
        "attack": kind,
        "target": target,
        "trigger": trigger,
        "seed": seed,
        "split": split,
        "clean_twin": twin,
        "base": base or base_file(dataset, arch),
        "finetune": recipe.to_dict(),
        **folder,
        **{k: None for k in MEASURED},
    }


def planned_part(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its measured fields (what the plan decides)."""
    return {k: v for k, v in row.items() if k not in MEASURED}
