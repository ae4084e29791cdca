"""Awkward clean data and awkward models through ``bdscan scan``: what is accepted scans, what is not gives exit 3
with one line that says what to do. (Empty/missing/non-npz data and class-count mismatches: tests/cli.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from bdscan.io.safetensors_io import open_metadata
from tests.hardening.clirun import TINY_SCAN, bdscan, no_crash, one_line

SCAN = [*TINY_SCAN, "--samples", "20", "-q"]


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _scans(r) -> None:  # type: ignore[no-untyped-def]
    """The scan ran to a verdict (exit 0 or 1 with a verdict line)."""
    no_crash(r)
    assert r.code in (0, 1), r.text
    assert r.out.startswith(("CLEAN", "BACKDOOR SUSPECTED", "INCONCLUSIVE")), r.text


@pytest.mark.filterwarnings("error:The given NumPy array is not writable:UserWarning")  # was printed on stderr
def test_folder_with_non_image_files_grey_and_rgba_images_scans(tiny_bd, tmp_path: Path) -> None:
    d = tmp_path / "clean"
    imgs = _images(20)
    for k in range(10):
        c = d / str(k)
        c.mkdir(parents=True)
        Image.fromarray(imgs[2 * k]).save(c / "a.png")
        Image.fromarray(imgs[2 * k + 1][..., 0]).save(c / "grey.png")  # mode L: replicated to RGB
        Image.fromarray(np.dstack([imgs[2 * k + 1], np.full((16, 16), 255, np.uint8)])).save(c / "alpha.png")  # RGBA
        Image.fromarray(imgs[2 * k]).resize((24, 20)).save(c / "other_size.jpg")  # resized to the model's input
        (c / "README.txt").write_text("not an image")
        (c / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (c / "labels.json").write_text("{}")
    (d / "notes.md").write_text("a file beside the class folders")
    _scans(bdscan("scan", tiny_bd.model, "--data", d, *SCAN))


def test_file_with_an_image_suffix_that_is_not_an_image_exit_3(tiny_bd, tmp_path: Path) -> None:
    c = tmp_path / "clean" / "0"
    c.mkdir(parents=True)
    Image.fromarray(_images(1)[0]).save(c / "ok.png")
    (c / "broken.png").write_text("this is text")
    line = one_line(bdscan("scan", tiny_bd.model, "--data", tmp_path / "clean", *SCAN), 3)
    assert "broken.png" in line and "not a readable image" in line and "remove or replace" in line, line


def test_class_folder_that_names_no_class_exit_3(tiny_bd, tmp_path: Path) -> None:
    c = tmp_path / "clean" / "cats"
    c.mkdir(parents=True)
    Image.fromarray(_images(1)[0]).save(c / "a.png")
    line = one_line(bdscan("scan", tiny_bd.model, "--data", tmp_path / "clean", *SCAN), 3)
    assert "'cats'" in line and "class index" in line, line


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("layout", ["uint8 NHWC", "float NCHW"])
def test_two_channel_images_exit_3(tiny_bd, tmp_path: Path, layout: str) -> None:
    x = _images(20)[..., :2]
    if layout == "float NCHW":
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    p = _npz(tmp_path / "two.npz", x, np.arange(20) % 10)
    line = one_line(bdscan("scan", tiny_bd.model, "--data", p, *SCAN), 3)
    assert "2 channels" in line and "3-channel" in line, line


@pytest.mark.parametrize("layout", ["uint8 NHW", "float N1HW"])
def test_grey_images_are_replicated_and_scanned(tiny_bd, tmp_path: Path, layout: str) -> None:
    x = _images(40)[..., 0]
    if layout == "float N1HW":
        x = x[:, None].astype(np.float32) / 255
    p = _npz(tmp_path / "grey.npz", x, np.arange(40) % 10)
    _scans(bdscan("scan", tiny_bd.model, "--data", p, *SCAN))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_images_with_nan_or_inf_exit_3(tiny_bd, tmp_path: Path, bad: float) -> None:
    x = _images(20).transpose(0, 3, 1, 2).astype(np.float32) / 255
    x[3, 1, 2, 2] = bad
    p = _npz(tmp_path / "nan.npz", x, np.arange(20) % 10)
    line = one_line(bdscan("scan", tiny_bd.model, "--data", p, *SCAN), 3)
    assert "NaN or inf" in line, line


@pytest.mark.parametrize("labels", ["float", "2-D", "negative", "strings"])
def test_bad_labels_exit_3(tiny_bd, tmp_path: Path, labels: str) -> None:
    y = np.arange(20) % 10
    ys = {"float": y.astype(np.float32), "2-D": y[:, None], "negative": y - 1, "strings": y.astype(str)}[labels]
    p = _npz(tmp_path / "labels.npz", _images(20), ys)
    line = one_line(bdscan("scan", tiny_bd.model, "--data", p, *SCAN), 3)
    expect = {"float": "integer label", "2-D": "integer label", "negative": "labels include -1", "strings": "integer label"}
    assert expect[labels] in line, line


class _Out3D(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((2, 3)), x.amax((2, 3))], -1)  # (N, 3, 2)


class _Out1D(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((1, 2, 3))  # (N,)


@pytest.mark.parametrize(("net", "shape"), [(_Out3D, "(2, 3, 2)"), (_Out1D, "(2,)")], ids=["(N, classes, 2)", "(N,)"])
def test_model_output_not_n_by_classes_exit_3(tiny_bd, tmp_path: Path, net: type[nn.Module], shape: str) -> None:
    f = tmp_path / "odd.pt"
    torch.jit.save(torch.jit.script(net()), str(f))
    for args in (["inspect", f], ["scan", f, "--data", tiny_bd.data, *SCAN]):
        line = one_line(bdscan(*args), 3)
        assert shape in line and "(N, classes)" in line, line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_exit_3(tiny_bd, tmp_path: Path, bad: float) -> None:
    tensors = load_file(str(tiny_bd.model))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 4 and not k.startswith("bdscan."))
    tensors[key].view(-1)[5] = bad
    f = tmp_path / "broken.safetensors"
    save_file(tensors, str(f), metadata=open_metadata(tiny_bd.model))
    for args in (["inspect", f], ["scan", f, "--data", tiny_bd.data, *SCAN]):
        line = one_line(bdscan(*args), 3)
        assert "NaN or inf" in line and key in line, line
