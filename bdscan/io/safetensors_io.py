"""``.safetensors``: weights plus bdscan's metadata convention in the header.

The header's ``__metadata__`` (string -> string) carries, JSON-encoded:

========================  =====================================================
``bdscan.arch``           timm registry name, e.g. ``"bdscan_vit"``
``bdscan.num_classes``    int
``bdscan.input_size``     [C, H, W]
``bdscan.mean``           per-channel mean (applied after ``scale``)
``bdscan.std``            per-channel std
``bdscan.scale``          1 or 255
``bdscan.class_names``    list of names
``bdscan.arch_kwargs``    object: extra architecture arguments (e.g. ``{"width": 16}``)
``bdscan.output``         ``"logits"`` or ``"probs"``
``bdscan.extra``          object: training accuracy, dataset, provenance, ...
``bdscan.trigger``        object: the original trigger of a lab model (attack, target, params)
========================  =====================================================

The original trigger's tensors are stored beside the weights as ``bdscan.trigger.mask`` (H, W) and
``bdscan.trigger.pattern`` (C, H, W). Safetensors holds no code, so loading never executes anything;
the header is bounds-checked before the library parses it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bdscan.atomic import atomic_write_with
from bdscan.errors import BdscanError, ModelLoadError, UsageError
from bdscan.io.base import (
    LoadedModel,
    LoadOptions,
    Readback,
    guarded,
    load_model,
    register_loader,
    register_writer,
    sha256_file,
)
from bdscan.io.build import create_net, finalize, infer_num_classes, load_state_into
from bdscan.io.selfdescribing import parse_meta
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from bdscan.trigger import Trigger

#: refuse headers above this size before parsing (safetensors' own limit is 100 MB)
MAX_HEADER_BYTES = 100 * 1024 * 1024
TRIGGER_PREFIX = "bdscan.trigger."
_FIELDS = ("arch", "num_classes", "input_size", "mean", "std", "scale", "class_names", "output", "arch_kwargs")


def _check_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path.name}: too short to be a safetensors file", "the file is truncated")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ModelLoadError(
                f"{path.name}: the safetensors header claims {n} bytes but the file has {size - 8}",
                "the file is truncated, corrupt or hostile",
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path.name}: the safetensors header is not valid JSON", "the file is corrupt") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: the safetensors header is not an object", "the file is corrupt")
    return header


def read_metadata(path: Path) -> dict[str, Any]:
    """The decoded ``bdscan.*`` metadata of a safetensors file (keys without the prefix)."""
    header = _check_header(path)
    meta = header.get("__metadata__") or {}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k.startswith("bdscan."):
            try:
                out[k[len("bdscan.") :]] = json.loads(v)
            except (TypeError, json.JSONDecodeError):
                out[k[len("bdscan.") :]] = v
    return out


def _checked(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """``meta`` with every field the loader uses of the type it needs; a damaged header is a ModelLoadError."""
    out = dict(meta)
    out.update(parse_meta({k: meta[k] for k in _FIELDS if k in meta and k not in ("output", "arch_kwargs")}, path))
    for k, kind in (("arch_kwargs", dict), ("extra", dict), ("trigger", dict), ("input_size", list), ("mean", list),
                    ("std", list), ("class_names", list)):
        if meta.get(k) is not None and not isinstance(meta[k], kind):
            raise ModelLoadError(f"{path.name}: its bdscan metadata is malformed ({k} is not a JSON {kind.__name__})",
                                 "the file is damaged: re-export it")
    if meta.get("output", "logits") not in ("logits", "probs"):
        raise ModelLoadError(f"{path.name}: its bdscan metadata is malformed (output)", "the file is damaged: re-export it")
    return out


@register_loader
class SafetensorsLoader:
    """Loads ``.safetensors`` (no code can run: the format is a JSON header plus raw tensor bytes)."""

    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.suffix == ".safetensors":
            return True
        if len(head) >= 9:
            (n,) = struct.unpack("<Q", head[:8])
            return 0 < n < MAX_HEADER_BYTES and head[8:9] == b"{"
        return False

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        meta = read_metadata(path)
        tensors: dict[str, torch.Tensor] = guarded("safetensors", path, lambda: load_file(str(path)))
        trig = {k[len(TRIGGER_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(TRIGGER_PREFIX)}
        meta = _checked(meta, path)
        arch = options.arch or meta.get("arch")
        if not arch:
            if meta:  # bdscan wrote this header, and bdscan always names the architecture: the header is damaged
                raise ModelLoadError(f"{path.name}: its bdscan metadata names no architecture",
                                     "the file is damaged: re-export it, or state --arch (see `bdscan models`)")
            raise UsageError(
                f"{path.name} has no bdscan metadata naming its architecture",
                "state it with --arch (see `bdscan models`), plus --num-classes if needed",
            )
        if not options.arch and not timm.is_model(arch):
            raise ModelLoadError(f"{path.name}: its metadata names architecture {arch!r}, which bdscan does not know",
                                 "the file is damaged or from a newer bdscan: re-export it, or state --arch (see `bdscan models`)")
        num_classes = options.num_classes or meta.get("num_classes") or infer_num_classes(tensors)
        if not num_classes:
            raise UsageError(f"cannot tell how many classes {path.name} has", "state it with --num-classes")
        input_size = tuple(options.input_size or meta.get("input_size") or (3, 32, 32))
        names = meta.get("class_names") or []
        if names and len(names) != num_classes:
            raise ModelLoadError(
                f"{path.name}: metadata lists {len(names)} class names for {num_classes} classes",
                "fix the metadata or pass --num-classes",
            )
        info = ModelInfo(
            arch=arch,
            num_classes=int(num_classes),
            input_size=input_size,  # type: ignore[arg-type]
            mean=tuple(meta.get("mean", (0.0,) * input_size[0])),
            std=tuple(meta.get("std", (1.0,) * input_size[0])),
            scale=float(meta.get("scale", 1.0)),
            class_names=tuple(names),
            metadata=meta.get("extra", {}),
            arch_kwargs=dict(meta.get("arch_kwargs") or {}) if not options.arch else {},
        )
        net = create_net(arch, int(num_classes), input_size, info.arch_kwargs)  # type: ignore[arg-type]
        load_state_into(net, tensors, arch)
        notes: list[str] = []
        wrapper = finalize(net, info, options, notes)
        trigger = None
        if "mask" in trig and "pattern" in trig:
            t = meta.get("trigger") if isinstance(meta.get("trigger"), dict) else {}
            trigger = Trigger(trig["mask"].float(), trig["pattern"].float(), t.get("target"), t.get("attack", "original"), t)
        return LoadedModel(wrapper, self.name, path, sha256_file(path), None, trigger, notes)


def save_safetensors(
    wrapper: ModelWrapper,
    path: Path,
    extra: dict[str, Any] | None = None,
    trigger: Trigger | None = None,
) -> None:
    """Saves ``wrapper`` as safetensors with bdscan's metadata convention, atomically.

    Args:
        wrapper: the model; its :class:`ModelInfo` becomes the metadata.
        path: output file (written through a temp file and renamed).
        extra: merged into ``bdscan.extra`` (accuracy, provenance, ...).
        trigger: an original trigger to store with the model (lab models).
    """
    info = wrapper.info
    meta = {f"bdscan.{k}": json.dumps(getattr(info, k)) for k in _FIELDS}
    meta["bdscan.format_version"] = json.dumps(1)
    meta["bdscan.extra"] = json.dumps({**info.metadata, **(extra or {})}, default=str)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in wrapper.net.state_dict().items()}
    if trigger is not None:
        tensors[TRIGGER_PREFIX + "mask"] = trigger.mask.detach().cpu().float().contiguous()
        tensors[TRIGGER_PREFIX + "pattern"] = trigger.pattern.detach().cpu().float().contiguous()
        meta["bdscan.trigger"] = json.dumps({"attack": trigger.kind, "target": trigger.target, **trigger.params}, default=str)
    atomic_write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@register_writer
class SafetensorsWriter:
    """Writes weights plus bdscan's metadata (:func:`save_safetensors`); read back with the safetensors loader."""

    name = "safetensors"
    title = "safetensors"
    suffixes = (".safetensors",)

    def write(
        self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None, trigger: Trigger | None = None
    ) -> None:
        """:func:`save_safetensors`; the model must have a registry architecture to be rebuilt from its weights."""
        if not timm.is_model(wrapper.info.arch):
            raise UsageError(
                f"this model was loaded from {wrapper.info.arch} and has no registry architecture, so it cannot be "
                "saved as safetensors",
                "write it in a self-describing format (ONNX or TorchScript) instead",
            )
        save_safetensors(wrapper, path, extra, trigger)

    def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
        """Loads the written file with the safetensors loader and runs both wrappers on ``x``."""
        try:
            reloaded = load_model(path, fmt=self.name).wrapper
        except BdscanError as e:
            raise ModelLoadError(f"the written safetensors file does not load back: {e.message}") from e
        with torch.no_grad():
            return Readback(reloaded.eval()(x).double().numpy(), wrapper.eval()(x).double().numpy())


def open_metadata(path: Path) -> dict[str, str]:
    """Raw ``__metadata__`` through the library (used by tests to check the convention)."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
