"""PyTorch weight files (``.pt``/``.pth``/``.bin``/``.ckpt``): ``torch.save`` zip archives or legacy pickles.

Two barriers stand between a hostile file and code execution:

1. the static scan (:func:`~bdscan.io.picklescan_io.scan_pickles`): a dangerous import refuses the file
   with an :class:`~bdscan.errors.UnsafeModelError`, a scan that cannot finish (corrupt archive,
   malformed pickle, tar or polyglot file) with a :class:`~bdscan.errors.ModelLoadError`, before
   anything is unpickled;
2. ``torch.load(weights_only=True)``: torch's allowlist unpickler, which builds tensors and containers
   only, whatever the scan missed.

A checkpoint may be a plain state dict or nest one (up to three levels) under ``"state_dict"``,
``"model_state_dict"``, ``"model"``, ``"net"``, ``"module"``, ``"ema"`` or ``"model_ema"``;
DataParallel's ``module.`` and ``torch.compile``'s ``_orig_mod.`` key prefixes are stripped
(:func:`~bdscan.io.build.extract_state_dict`, shared with the ``pickle`` loader). The file
names no architecture, so ``--arch`` (and ``--num-classes`` when the head cannot tell) is required.
A file that holds other pickled Python objects (a full ``nn.Module``, an ``argparse.Namespace``...)
fails the weights-only load: it is handed to the ``pickle`` loader when ``--trust-pickle`` was given,
refused with an explanation otherwise (:mod:`bdscan.io.pickle_module`).

Sniffing is by content: zip archives whose layout is TorchScript (``code/``, ``constants.pkl``) or
``torch.export`` (``archive_format``, ``models/*.json``) belong to those loaders; a zip with a
``data.pkl``, or a file starting with a pickle ``PROTO`` opcode, is a weight file; other files are
claimed by suffix only.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from bdscan.errors import ModelLoadError
from bdscan.io.base import LoadedModel, LoadOptions, guarded, one_line, register_loader
from bdscan.io.build import TORCH_SUFFIXES, build_from_state, extract_state_dict
from bdscan.io.pickle_module import PickleModuleLoader, untrusted_pickle_error
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.zipfile_sniff import ZIP_MAGIC, torch_zip_kind, zip_names

#: the name as torch prints it (up to its fixed text: a damaged name may hold spaces or control characters)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (.+?) was not an allowed global|Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


class PickledObjectsError(Exception):
    """torch's weights-only unpickler met a Python object that is not a tensor or a container."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def weights_only_load(path: Path, fmt: str = "PyTorch weights") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with bdscan's errors.

    Raises:
        PickledObjectsError: the file holds pickled Python objects beyond tensors (caller decides).
        ModelLoadError: anything else.
    """

    def _load() -> tuple[bool, Any]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return True, torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            m = _UNSUPPORTED_GLOBAL.search(text)
            ref = (m.group(1) or m.group(2)) if m else ""
            missing = missing_global(ref) if m else None
            if m and missing:  # e.g. torch.FloatStorage with a flipped bit: damage, not Python objects
                hint = ("the file is damaged: re-download or re-export it" if "not installed" not in missing else
                        "a damaged file (re-download it), or objects of code that is not installed here: save the model's "
                        "state_dict() as .safetensors where that code is (safetensors.torch.save_file)")
                raise ModelLoadError(f"{path.name}: its pickle names {one_line(ref, 120)}, {missing}", hint) from None
            if m:
                return False, ref
            w = _UNPICKLER_ERROR.search(text)
            if w:  # torch's long advice (to load with weights_only=False) is wrong for a damaged file
                raise pickle.UnpicklingError(f"not a valid weights pickle ({w.group(1).strip()[:150]})") from None
            raise

    ok, value = guarded(fmt, path, _load)
    if not ok:
        raise PickledObjectsError(value)
    return value


def not_a_checkpoint(path: Path) -> ModelLoadError | None:
    """A clear error for a file claimed only by its suffix that is neither a ``torch.save`` zip nor a binary
    pickle (a text file named ``model.pt``, an HTML error page saved as a download), else None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC) or head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = one_line(text.strip().splitlines()[0] if text.strip() else "", 40)
        what = f"a text file (it begins {first!r})" if first else "a text file"
    else:
        what = f"neither a zip archive nor a pickle (it begins with bytes {head[:4].hex(' ')})"
    return ModelLoadError(f"{path.name}: not a PyTorch checkpoint: torch.save writes a zip archive or a binary pickle, and this "
                          f"is {what}", "check the path, or re-download or re-export the model")


def missing_global(ref: str) -> str | None:
    """Why ``ref`` (``module.name``, from a pickle) cannot be imported here, or None if it can (or may).

    Imports nothing: an attribute is looked up only in modules already in ``sys.modules``, other modules are
    only searched for (``importlib.util.find_spec``), so a damaged name (``torch.FloatStoraoe``, ``torbh.LongStorage``)
    is told apart from a real class of an installed package.
    """
    parts = ref.split(".")
    if not all(p.isidentifier() for p in parts):
        return "which is not a Python name"
    if parts[0] == "__main__":
        return "defined in the script that saved it (__main__), which is not installed here"
    for i in range(len(parts) - 1, 0, -1):
        mod = sys.modules.get(".".join(parts[:i]))
        if mod is None:
            continue
        head = f"{mod.__name__}.{parts[i]}"
        if parts[i] in vars(mod) or head in sys.modules:
            return None
        if getattr(mod, "__path__", None) is not None:  # a package: the name may be a submodule not imported yet
            try:
                if importlib.util.find_spec(head) is not None:
                    return None
            except (ImportError, ValueError):
                pass
        return "which does not exist"
    try:
        found = importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"from module {parts[0]!r}, which is not installed"


@register_loader
class StateDictLoader:
    """Loads state-dict checkpoints: static scan, then ``torch.load(weights_only=True)``."""

    name = "state-dict"
    suffixes = TORCH_SUFFIXES

    def sniff(self, path: Path, head: bytes) -> bool:
        if head.startswith(ZIP_MAGIC):
            names = zip_names(path)
            kind = torch_zip_kind(names) if names is not None else None
            return kind == "state-dict" or (kind is None and path.suffix.lower() in TORCH_SUFFIXES)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return True
        return path.suffix.lower() in TORCH_SUFFIXES

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        scan = scan_pickles(path)  # first: a protocol-0 pickle with dangerous imports is text too, and a finding
        refuse_if_unsafe(path, scan, "a PyTorch checkpoint", "state-dict")
        try:
            obj = weights_only_load(path)
        except ModelLoadError as e:
            raise not_a_checkpoint(path) or e from None
        except PickledObjectsError as e:
            if options.trust_pickle:
                return PickleModuleLoader().load_scanned(path, options, scan)
            raise untrusted_pickle_error(path, e.detail) from None
        return build_from_state(extract_state_dict(obj, path), path, options, self.name, scan)
