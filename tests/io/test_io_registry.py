"""The format registry: every format's loader and writer in one place, and a writer per writable format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bdscan.errors import UsageError
from bdscan.io import base, formats, load_model, loaders, output_suffixes, writer_for, writers
from bdscan.io.base import LoadedModel, LoadOptions, Readback, register_loader, register_writer
from bdscan.io.safetensors_io import read_metadata
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger
from tests.io.helpers import Checkpoints


def test_loaders_and_writers_share_one_registry() -> None:
    assert list(writers()) == ["safetensors", "torchscript", "onnx", "hf-folder"]
    assert set(writers()) <= set(loaders()) == set(formats())
    for name, fmt in formats().items():
        assert fmt.loader is not None and fmt.loader.name == name
        assert fmt.writer is None or fmt.writer.name == name
    assert set(output_suffixes()) == {".safetensors", ".onnx", ".pt"}
    assert output_suffixes(exclude="onnx") == (".safetensors", ".pt")


def test_the_writer_is_chosen_by_suffix() -> None:
    assert writer_for(Path("out/m.safetensors")).name == "safetensors"
    assert writer_for(Path("m.ONNX")).name == "onnx"
    assert writer_for(Path("m.pt")).name == "torchscript"
    with pytest.raises(UsageError, match=r"'\.h5'.*one of: \.safetensors"):
        writer_for(Path("m.h5"))
    assert writer_for(Path("model")).name == "hf-folder"  # a path without a suffix is a model folder (issue #26)


@pytest.mark.parametrize("name", ["safetensors", "torchscript", "onnx"])
def test_every_writer_round_trips(ckpts: Checkpoints, tmp_path: Path, name: str) -> None:
    w = writers()[name]
    out = tmp_path / f"m{w.suffixes[0]}"
    w.write(ckpts.cnn, out, {"note": {"why": "test"}})
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written atomically: no temp file left
    back = w.read_back(out, ckpts.cnn, torch.rand(5, 3, 32, 32))
    assert back.written.shape == back.expected.shape == (5, 4)
    assert np.abs(back.written - back.expected).max() < 1e-4
    assert load_model(out).format == name
    if name == "safetensors":
        assert read_metadata(out)["extra"]["note"] == {"why": "test"}


def test_safetensors_needs_a_registry_architecture(ckpts: Checkpoints, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no registry architecture"):
        writers()["safetensors"].write(ckpts.patch, tmp_path / "p.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_new_format_is_one_module_of_registrations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(base, "_FORMATS", dict(base._FORMATS))

    @register_loader
    class ToyLoader:
        name = "toy"
        suffixes = (".toy",)

        def sniff(self, path: Path, head: bytes) -> bool:
            return head.startswith(b"TOY")

        def load(self, path: Path, options: LoadOptions) -> LoadedModel:
            raise NotImplementedError

    @register_writer
    class ToyWriter:
        name = "toy"
        title = "toy"
        suffixes = (".toy",)

        def write(self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None,
                  trigger: Trigger | None = None) -> None:
            path.write_bytes(b"TOY")

        def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
            raise NotImplementedError

    fmt = formats()["toy"]
    assert isinstance(fmt.loader, ToyLoader) and isinstance(fmt.writer, ToyWriter)
    assert writer_for(Path("m.toy")) is fmt.writer and ".toy" in output_suffixes()
    f = tmp_path / "m.dat"
    f.write_bytes(b"TOY and more")
    assert base.pick_loader(f).name == "toy"
