"""Loader registry: one loader per checkpoint format (modelscan-style plug-ins).

A loader turns a file into a :class:`LoadedModel` (a :class:`~bdscan.models.ModelWrapper` plus what was
learnt while reading it: format, sha256, static pickle-scan findings, the original trigger of a lab
model). Loaders never execute code from the file: see each loader's docstring for how.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bdscan.errors import ModelLoadError, UsageError
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
    """A checkpoint format."""

    name: str
    suffixes: tuple[str, ...]

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the file looks like this format (from its suffix and first bytes)."""

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        """Loads the file without executing code from it; raises a :class:`ModelLoadError` on failure."""


_LOADERS: dict[str, Loader] = {}


def register_loader(cls: type) -> type:
    """Class decorator: registers one instance of a loader under its ``name``."""
    inst = cls()
    _LOADERS[inst.name] = inst
    return cls


def loaders() -> dict[str, Loader]:
    return dict(_LOADERS)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_loader(path: Path, fmt: str | None = None) -> Loader:
    """The loader for ``path``: the one named by ``fmt``, else by content sniffing, else by suffix."""
    if fmt:
        if fmt not in _LOADERS:
            raise UsageError(f"unknown format {fmt!r}", f"use one of: {', '.join(sorted(_LOADERS))}")
        return _LOADERS[fmt]
    with open(path, "rb") as f:
        head = f.read(64)
    for loader in _LOADERS.values():
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
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a file", "give the path of a model file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p.name}: the file is empty", "re-export or re-download the model")
    loader = pick_loader(p, fmt)
    log.info("loading %s with the %s loader", p, loader.name)
    return loader.load(p, options or LoadOptions())


def guarded(fmt: str, path: Path, fn: Callable[[], Any]) -> Any:
    """Runs a third-party parser and turns any exception into a one-line :class:`ModelLoadError`.

    Parsers of hostile files fail in every way imaginable (struct.error, RuntimeError, protobuf
    DecodeError, MemoryError); the user needs one line that says the file is damaged, not a traceback.
    """
    from bdscan.errors import BdscanError

    try:
        return fn()
    except BdscanError:
        raise
    except MemoryError as e:
        raise ModelLoadError(f"{path.name}: the {fmt} file asks for more memory than exists", "the file is corrupt or hostile") from e
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{path.name}: cannot read it as {fmt}: {msg}",
            "the file is truncated or corrupt; re-export or re-download it",
        ) from e
