"""Determinism through the CLI: the same model, data and --seed give the same JSON apart from ``timings`` (and
``invocation``: the paths given) at both levels with activation statistics (tests/cli covers the pixel level without them), and the same triggers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.hardening.clirun import bdscan

BOTH = ["--budget", "smoke", "--steps", "4", "--samples", "40", "--levels", "both", "--activations", "-q", "--seed", "7"]


def _run(model: Path, data: Path, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    r = bdscan("scan", model, "--data", data, *BOTH, "--out", out, "--json", out.with_suffix(".json"))
    assert r.code in (0, 1), r.text
    doc = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert json.loads((out / "scan.json").read_text(encoding="utf-8")) == doc
    with np.load(out / "triggers.npz") as z:
        arrays = {k: z[k] for k in z.files}
    doc.pop("timings")
    assert doc.pop("invocation")["scan_folder"] == str(out)  # where the outputs went: the other key that may differ
    return doc, arrays


def test_same_seed_same_json_both_levels_with_activations(tiny_bd, tmp_path: Path) -> None:
    (a, ta), (b, tb) = (_run(tiny_bd.model, tiny_bd.data, tmp_path / f"run{i}") for i in range(2))
    assert set(a["modes"]) == {"pixel", "patch"} and a["activations"], "both levels and activations must be in the document"
    assert a["seed"] == 7 and a["config"]["inversion"]["seed"] == 7
    assert a == b
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
