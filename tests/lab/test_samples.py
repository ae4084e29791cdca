"""The bundled sample models (:mod:`bdscan.lab.samples`): copies of evaluation-zoo rows with the sample metadata,
tensors unchanged, refused when a row's file does not match it, checked against the bundle; and the repository's
own bundle is exactly what its zoo rows give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from bdscan.errors import UsageError
from bdscan.io import load_model
from bdscan.io.base import sha256_file
from bdscan.lab import zoo
from bdscan.lab.evalzoo import read_rows, save_model, write_rows
from bdscan.lab.evalzoo_finetune import FinetuneRecipe
from bdscan.lab.evalzoo_plan import make_row
from bdscan.lab.samples import DEMO, DEMO_TWIN, SAMPLE_SET, SampleModel, check_samples_folder, write_samples_folder
from bdscan.pipeline import resolve_data

ROOT = Path(__file__).resolve().parents[2]
SET = (SampleModel("synth_cnn6_badnets", "synth_badnets.safetensors", "a backdoored one"),
       SampleModel("synth_cnn6_clean1", "synth_clean.safetensors", "its twin"))


@pytest.fixture()
def tiny_zoo(lab_tiny, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A manifest with two measured rows whose files are a tiny model; and an output folder with a sample set."""
    wrapper, _ = lab_tiny
    root = tmp_path / "zoo"
    (root / "models").mkdir(parents=True)
    recipe = FinetuneRecipe(steps=1)
    rows = [make_row("synth_cnn6_clean1", "bdscan_cnn6", "synth", None, None, None, None, 1, "calibration", recipe),
            make_row("synth_cnn6_badnets", "bdscan_cnn6", "synth", "badnets_small", 2,
                     {"name": "badnets", "params": {"size": 4, "position": [4, 4]}}, "synth_cnn6_clean1", 2, "calibration", recipe)]
    for r, acc, asr in zip(rows, (0.81, 0.80), (None, 0.97), strict=True):
        f = root / r["file"]
        save_model(wrapper, f, None)
        r.update(sha256=sha256_file(f), clean_acc=acc, asr=asr, size_bytes=f.stat().st_size)
    write_rows(root / "manifest.json", rows)
    out = tmp_path / "samples"
    out.mkdir()
    np.savez(out / "synth_samples.npz", x=np.zeros((4, 16, 16, 3), np.uint8), y=np.arange(4))
    return root / "manifest.json", out


def test_copies_carry_the_sample_metadata_and_the_row_s_tensors(tiny_zoo: tuple[Path, Path]) -> None:
    manifest, out = tiny_zoo
    written = write_samples_folder(out, manifest, SET)
    assert sorted(p.name for p in written) == ["synth_badnets.safetensors", "synth_clean.safetensors"]
    rows = {r["name"]: r for r in read_rows(manifest)}
    for s in SET:
        src = manifest.parent / rows[s.row]["file"]
        got, want = load_file(str(out / s.file)), load_file(str(src))
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
        lm = load_model(out / s.file)
        md = lm.wrapper.info.metadata
        assert md["sample_of"] == s.row and md["zoo_sha256"] == rows[s.row]["sha256"] and md["samples"] == "synth_samples.npz"
        assert resolve_data(None, lm) == out / "synth_samples.npz"  # a scan finds its clean data with no --data
    readme = (out / "README.md").read_text()
    assert "| `synth_badnets.safetensors` | a backdoored one | bdscan_cnn6 | synth | badnets_small," in readme
    assert "| 80.00 % | 81.00 % | 97.00 % | synth_cnn6_badnets (calibration) |" in readme
    assert check_samples_folder(out, manifest, SET) == []
    assert write_samples_folder(out, manifest, SET) == []  # unchanged files are not rewritten


def test_a_drifted_or_missing_copy_is_reported(tiny_zoo: tuple[Path, Path]) -> None:
    manifest, out = tiny_zoo
    write_samples_folder(out, manifest, SET)
    (out / "synth_clean.safetensors").unlink()
    raw = bytearray((out / "synth_badnets.safetensors").read_bytes())
    raw[-1] ^= 1
    (out / "synth_badnets.safetensors").write_bytes(bytes(raw))
    problems = check_samples_folder(out, manifest, SET)
    assert len(problems) == 2 and "differs from what row synth_cnn6_badnets gives" in problems[0] and "missing" in problems[1]


def test_a_row_whose_file_changed_is_refused_before_anything_is_written(tiny_zoo: tuple[Path, Path]) -> None:
    manifest, out = tiny_zoo
    rows = read_rows(manifest)
    f = manifest.parent / rows[0]["file"]
    f.write_bytes(f.read_bytes() + b" ")
    with pytest.raises(UsageError) as e:
        write_samples_folder(out, manifest, SET)
    assert "is not the row's" in str(e.value) and "build --only synth_cnn6_clean1" in (e.value.hint or "")
    assert not (out / "synth_badnets.safetensors").exists() and not (out / "README.md").exists()
    with pytest.raises(UsageError, match="no such row"):
        write_samples_folder(out, manifest, (SampleModel("nope", "n.safetensors", ""),))
    rows[1]["sha256"] = None
    write_rows(manifest, rows)
    with pytest.raises(UsageError, match="not built yet"):
        write_samples_folder(out, manifest, SET[:1])


def test_the_command_line_writes_checks_and_reports_errors(tiny_zoo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, out = tiny_zoo
    args = ["samples", "--manifest", str(manifest), "--out", str(out)]
    assert zoo.main(args) == 2  # the repository's SAMPLE_SET names rows this manifest does not have
    monkeypatch.setattr("bdscan.lab.samples.SAMPLE_SET", SET)
    assert zoo.main([*args, "--check"]) == 1  # nothing bundled yet
    assert zoo.main(args) == 0 and zoo.main([*args, "--check"]) == 0
    (out / SET[1].file).unlink()
    assert zoo.main([*args, "--check"]) == 1


def test_the_repository_s_bundle_is_what_its_zoo_rows_give() -> None:
    """Every bundled sample model is its evaluation-zoo row's file with the sample metadata, nothing else."""
    assert check_samples_folder(ROOT / "sample_models") == []
    assert len({s.file for s in SAMPLE_SET}) == len(SAMPLE_SET)
    first = f"bdscan scan sample_models/{DEMO.file} --out scan-out --report report.html"
    assert first in (ROOT / "README.md").read_text() and first in (ROOT / "sample_models" / "README.md").read_text()
    assert f"sample_models/{DEMO.file}" in (ROOT / "Dockerfile").read_text()  # its usage line scans the demo too
    rows = {r["name"]: r for r in read_rows(ROOT / "benchmarks" / "zoo" / "manifest.json")}
    assert all(rows[s.row]["split"] == "calibration" for s in SAMPLE_SET)  # the evaluation half stays unseen
    # the demo is a backdoored transformer, its twin a clean model of the same cell
    assert rows[DEMO.row]["attack"] is not None and rows[DEMO.row]["arch"] not in ("bdscan_cnn6", "bdscan_resnet18")
    assert rows[DEMO_TWIN.row]["attack"] is None and rows[DEMO_TWIN.row]["cell"] == rows[DEMO.row]["cell"]
