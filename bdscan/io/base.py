"""The format registry: one entry per checkpoint format, holding its loader and, where bdscan can write the
format, its writer (modelscan-style plug-ins, registered timm-style by decorators in the format's own module).

A loader turns a file into a :class:`LoadedModel` (a :class:`~bdscan.models.ModelWrapper` plus what was
learnt while reading it: format, sha256, static pickle-scan findings, the original trigger of a lab
model). Loaders never execute code from the file: see each loader's docstring for how.

A writer saves a :class:`~bdscan.models.ModelWrapper` in its format and can run the written file with the
format's own runtime (:meth:`Writer.read_back`), so that a caller can prove the file computes what the model
in memory computes.

Adding a format is one module in :mod:`bdscan.io` that decorates its loader class with
:func:`register_loader` (and its writer class with :func:`register_writer`, under the same ``name``), plus
one import line in :mod:`bdscan.io`'s ``__init__`` (whose import order is the sniffing order).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from bdscan.errors import BdscanError, ModelLoadError, UsageError, first_line
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """What the user stated about a model on the command line (None = not stated).

    Attributes:
        arch: timm registry name, for weight-only formats without bdscan metadata.
        num_classes: number of classes.
        input_size: (C, H, W).
        mean: per-channel mean (after ``scale``).
        std: per-channel std.
        scale: 255 for models that take 0-255 pixels, else 1.
        patch_size: the token grid's patch size, when it cannot be found from the model.
        class_names: class names.
        trust_pickle: allow unpickling a full ``nn.Module`` (only after a clean static scan).
    """

    arch: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    patch_size: int | None = None
    class_names: tuple[str, ...] | None = None
    trust_pickle: bool = False


@dataclass(frozen=True)
class PickleFinding:
    """One import a pickle asks for that the scanner judged dangerous (``module.name``)."""

    module: str
    name: str
    severity: str  # "dangerous" | "suspicious"
    location: str  # file, or member of a zip archive

    @property
    def ref(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class PickleScan:
    """Result of the static pickle scan of a file (never executes the pickle)."""

    scanner: str
    scanned_files: int
    findings: tuple[PickleFinding, ...] = ()
    error: str | None = None

    @property
    def dangerous(self) -> bool:
        return any(f.severity == "dangerous" for f in self.findings) or self.error is not None


@dataclass
class LoadedModel:
    """A model as bdscan loaded it.

    Attributes:
        wrapper: the model behind bdscan's [0, 1]-in, logits-out interface.
        format: the loader's name ("safetensors", "state-dict", "torchscript", "torch-export", "onnx", "pickle").
        path: the file.
        sha256: hex digest of the file's bytes.
        pickle_scan: static scan result for pickle-based formats, else None.
        original_trigger: the trigger a lab model was poisoned with, when the file carries it.
        notes: things the loader decided that a user should see (e.g. "softmax output detected").
    """

    wrapper: ModelWrapper
    format: str
    path: Path
    sha256: str
    pickle_scan: PickleScan | None = None
    original_trigger: Trigger | None = None
    notes: list[str] = field(default_factory=list)


class Loader(Protocol):
    """How a checkpoint format is read."""

    name: str
    suffixes: tuple[str, ...]

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the file looks like this format (from its suffix and first bytes)."""

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        """Loads the file without executing code from it; raises a :class:`ModelLoadError` on failure."""


class Readback(NamedTuple):
    """What a written file computes, beside what the model in memory computes, on the same images."""

    written: np.ndarray
    expected: np.ndarray


class Writer(Protocol):
    """How a model is written in a format (registered under the same ``name`` as the format's loader)."""

    name: str
    #: the format's name in messages ("ONNX", "TorchScript")
    title: str
    #: the output suffixes this writer is chosen for
    suffixes: tuple[str, ...]

    def write(
        self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None, trigger: Trigger | None = None
    ) -> None:
        """Writes ``wrapper`` to ``path`` atomically, with bdscan's metadata.

        Args:
            wrapper: the model.
            path: the output file.
            extra: JSON-serialisable records stored with the metadata (e.g. ``{"provenance": {...}}``).
            trigger: an original trigger to store with the model, where the format has room for one.

        Raises:
            UsageError: the format cannot hold this model.
            BdscanError: the model cannot be written in this format.
        """

    def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
        """Runs the written file with the format's own runtime on images ``x`` (pixels in [0, 1]).

        Returns:
            the file's outputs, and the outputs ``wrapper`` computes for the same thing in memory.

        Raises:
            BdscanError: the written file cannot be read or run.
        """


@dataclass
class Format:
    """One entry of the registry: a format's loader and, when bdscan can write it, its writer."""

    name: str
    loader: Loader | None = None
    writer: Writer | None = None


_FORMATS: dict[str, Format] = {}
_T = TypeVar("_T", bound=type)


def _entry(name: str) -> Format:
    return _FORMATS.setdefault(name, Format(name))


def register_loader(cls: _T) -> _T:
    """Class decorator: registers one instance of a loader under its ``name``."""
    inst = cls()
    _entry(inst.name).loader = inst
    return cls


def register_writer(cls: _T) -> _T:
    """Class decorator: registers one instance of a writer under its ``name`` (the format's loader's name)."""
    inst = cls()
    _entry(inst.name).writer = inst
    return cls


def formats() -> dict[str, Format]:
    """The registry: format name -> :class:`Format`, in registration order."""
    return dict(_FORMATS)


def loaders() -> dict[str, Loader]:
    """Format name -> loader, in sniffing order."""
    return {name: f.loader for name, f in _FORMATS.items() if f.loader is not None}


def writers() -> dict[str, Writer]:
    """Format name -> writer, for the formats bdscan can write."""
    return {name: f.writer for name, f in _FORMATS.items() if f.writer is not None}


#: the "suffix" of a writer that writes model folders: chosen for an output path without a suffix
FOLDER_SUFFIX = "/"


def output_suffixes(exclude: str | None = None) -> tuple[str, ...]:
    """The suffixes some writer is chosen for (without those of the format named ``exclude``)."""
    # a model folder's "suffix" (FOLDER_SUFFIX: a path without one) is no suffix to name in a message
    return tuple(s for w in writers().values() if w.name != exclude for s in w.suffixes if s != FOLDER_SUFFIX)


def writer_for(path: Path) -> Writer:
    """The writer for ``path``'s suffix.

    Raises:
        UsageError: no writer writes that suffix.
    """
    suffix = Path(path).suffix.lower() or "/"  # a path without a suffix is a model folder (see FOLDER_SUFFIX)
    for w in writers().values():
        if suffix in w.suffixes:
            return w
    raise UsageError(f"cannot write a model as {Path(path).suffix or 'a file without suffix'!r}",
                     f"name the output with one of: {', '.join(output_suffixes())}")


def one_line(s: str, limit: int = 300) -> str:
    """``s`` without line breaks or control characters (names inside hostile files can hold anything)."""
    out = "".join(c if c.isprintable() else "?" for c in s)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file; of a model folder: sha256 over its top-level files' names and digests, in name order."""
    h = hashlib.sha256()
    if Path(path).is_dir():  # any change to weights, config or preprocessor config changes it
        for p in sorted(Path(path).iterdir()):
            if p.is_file():
                h.update(p.name.encode("utf-8", "surrogateescape") + b"\0" + sha256_file(p).encode() + b"\n")
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_loader(path: Path, fmt: str | None = None) -> Loader:
    """The loader for ``path``: the one named by ``fmt``, else by content sniffing, else by suffix."""
    registered = loaders()
    if fmt:
        if fmt not in registered:
            raise UsageError(f"unknown format {fmt!r}", f"use one of: {', '.join(sorted(registered))}")
        if path.is_dir() != bool(getattr(registered[fmt], "folder", False)):
            raise UsageError(f"{path.name} is {'a folder' if path.is_dir() else 'a file'}; the {fmt} loader reads "
                             f"{'model folders' if path.is_dir() is False else 'files'}", "leave out --format, or give the right path")
        return registered[fmt]
    if path.is_dir():  # model folders (Hugging Face, timm): only loaders that declare ``folder = True`` look at them
        for loader in registered.values():
            if getattr(loader, "folder", False) and loader.sniff(path, b""):
                return loader
        raise ModelLoadError(f"{path.name}: a folder that holds no model bdscan reads",
                             "give a model file, or a Hugging Face or timm model folder (config.json + model.safetensors)")
    with open(path, "rb") as f:
        head = f.read(64)
    for loader in registered.values():
        if loader.sniff(path, head):
            return loader
    raise ModelLoadError(
        f"{path.name}: not a model format bdscan reads",
        "use .safetensors, .pt/.pth (state dict or TorchScript), .pt2 (torch.export) or .onnx",
    )


def load_model(path: str | Path, options: LoadOptions | None = None, fmt: str | None = None) -> LoadedModel:
    """Loads a checkpoint safely with the registered loader that fits it.

    Raises:
        ModelLoadError: missing, unreadable, corrupt or mismatching file.
        UnsafeModelError: a pickle-based file whose static scan found dangerous imports.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file", "check the model path")
    if not p.is_file() and not p.is_dir():
        raise ModelLoadError(f"{p}: not a file", "give the path of a model file")
    if p.is_file() and p.stat().st_size == 0:
        raise ModelLoadError(f"{p.name}: the file is empty", "re-export or re-download the model")
    loader = pick_loader(p, fmt)
    log.info("loading %s with the %s loader", p, loader.name)
    return loader.load(p, options or LoadOptions())


def guarded(fmt: str, path: Path, fn: Callable[[], Any]) -> Any:
    """Runs a third-party parser and turns any exception into a one-line :class:`ModelLoadError`.

    Parsers of hostile files fail in every way imaginable (struct.error, RuntimeError, protobuf
    DecodeError, MemoryError); the user needs one line that says the file is damaged, not a traceback.
    """
    try:
        return fn()
    except BdscanError:
        raise
    except MemoryError as e:
        raise ModelLoadError(f"{path.name}: the {fmt} file asks for more memory than exists", "the file is corrupt or hostile") from e
    except Exception as e:
        raise ModelLoadError(
            f"{path.name}: cannot read it as {fmt}: {first_line(e)}",
            "the file is truncated or corrupt; re-export or re-download it",
        ) from e
