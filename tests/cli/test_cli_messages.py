"""One clear line for the ordinary mistakes of issue #27 item 10 (the rest of item 10 is in test_cli_scan.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from bdscan.cli import app
from tests.cli.test_cli_scan import assert_one_line_error
from tests.conftest import CLASSES, SIZE
from tests.synth import train_tiny

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_a_patch_size_that_overrides_the_model_s_grid_warns_and_says_which_grid_ran(tmp_path: Path) -> None:
    from bdscan.io import save_safetensors

    vit = train_tiny("bdscan_vit", CLASSES, SIZE, None, epochs=1, n=4 * CLASSES)
    assert vit.wrapper.token_grid is not None and vit.wrapper.token_grid.stride == 4
    save_safetensors(vit.wrapper, tmp_path / "vit.safetensors")
    np.savez(tmp_path / "d.npz", x=(vit.data.x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8), y=vit.data.y.numpy())
    args = ["scan", tmp_path / "vit.safetensors", "--data", tmp_path / "d.npz", "--budget", "smoke", "--steps", "1",
            "--levels", "patch", "--no-activations", "--fail-on", "never"]
    code, output = run(*args, "--patch-size", "5", "-q")
    assert code == 0, output
    line = next(ln for ln in output.splitlines() if ln.startswith("warning:"))  # shown even with --quiet
    assert "--patch-size 5 overrides the token grid found in the model (4×4 tokens of 4 pixels" in line
    assert "runs on a 3×3 grid of 5×5-pixel patches" in line
    code, output = run(*args, "--patch-size", "5")
    assert "token grid: 3×3, stride 5 (--patch-size 5)" in output  # the plan names the grid that ran
    code, output = run(*args, "--patch-size", "4", "-q")
    assert code == 0 and "warning" not in output  # stating the model's own grid is not an override


def test_data_that_is_not_images_says_so(tiny_bd, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the model\nsecond line\n")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    np.save(tmp_path / "single.npy", np.zeros((2, 3)))
    for path, words in ((notes, "notes.txt: not clean images: it is a text file"),
                        (broken, "broken.npz: cannot read it as .npz (BadZipFile"),
                        (tmp_path / "empty.npz", "empty.npz: no arrays named x and y"),
                        (tmp_path / "single.npy", "single.npy: a single numpy array")):
        code, output = run("scan", tiny_bd.model, "--data", path, "-q")
        assert code == 3, (path, output)
        assert_one_line_error(output)
        assert words in output and "pickled" not in output and "allow_pickle" not in output, output
        assert "one sub-folder of images per class" in output or "save images as x" in output  # what to give instead


def test_a_text_file_named_like_a_checkpoint_says_so(tmp_path: Path) -> None:
    fake = tmp_path / "model.pt"
    fake.write_text("hello, these are my notes\n")
    code, output = run("inspect", fake)
    assert code == 3
    assert_one_line_error(output)
    assert "model.pt: not a PyTorch checkpoint" in output and "a text file (it begins 'hello, these are my notes')" in output
    fake.write_bytes(b"\x01\x02\x03\x04binary")
    code, output = run("inspect", fake)
    assert code == 3 and "neither a zip archive nor a pickle (it begins with bytes 01 02 03 04)" in output


def test_unwritable_outputs_fail_before_the_model_is_even_loaded(tiny_bd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue #27 item 4: `--out /proc/x` exits 2 with one line before any work (so before any inversion)."""
    import bdscan.io
    import bdscan.pipeline

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(bdscan.pipeline, "load_model", never)
    monkeypatch.setattr(bdscan.io, "load_model", never)
    for args in (["scan", tiny_bd.model, "--data", tiny_bd.data, "--out", "/proc/bdscan-x"],
                 ["scan", tiny_bd.model, "--data", tiny_bd.data, "--report", "/proc/bdscan-x.html"],
                 ["repair", tiny_bd.model, "--data", tiny_bd.data, "--out", "/proc/bdscan-x.safetensors"]):
        code, output = run(*args)
        assert code == 2, (args, output)
        assert_one_line_error(output)
        assert "cannot write /proc/bdscan-x" in output
