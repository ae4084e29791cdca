"""timm model folders, as timm's ``save_for_hf``/``push_to_hf_hub`` write them.

``config.json`` holds ``architecture`` (a timm registry name), ``num_classes``, optional ``model_args`` (keyword
arguments the model was built with) and ``pretrained_cfg`` (``input_size`` [C, H, W], ``mean``, ``std``,
``label_names``); the weights are ``model.safetensors`` (or ``pytorch_model.bin``, sharded safetensors: read by
:func:`bdscan.io.folder_weights.read_folder_weights`, with the same static pickle scan and weights-only load as
a ``.pt`` state dict). The model is built with ``timm.create_model(architecture, pretrained=False)``, so nothing
is downloaded and no code comes from the folder; the token grid is found from the built module (timm's
``PatchEmbed``), as for bdscan's own safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file

from bdscan.errors import ModelLoadError, UsageError
from bdscan.io.base import LoadedModel, LoadOptions, one_line, register_loader, sha256_file
from bdscan.io.build import create_net, finalize, load_state_into
from bdscan.io.folder_weights import CONFIG, SAFE_WEIGHTS, peek_config, read_folder_weights, read_json
from bdscan.models.wrapper import ModelInfo, ModelWrapper


def _floats(v: Any, c: int, default: float, what: str, folder: Path) -> tuple[float, ...]:
    if v is None:
        return (default,) * c
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    try:
        return tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{folder.name}/config.json: pretrained_cfg.{what} is not a list of numbers", "the file is damaged") from None


@register_loader
class TimmFolderLoader:
    """Loads a timm hub folder (config.json with ``architecture`` + ``pretrained_cfg``, and its weights)."""

    name = "timm-folder"
    suffixes = ()
    folder = True

    def sniff(self, path: Path, head: bytes) -> bool:
        cfg = peek_config(path) if path.is_dir() else None
        return cfg is not None and "architecture" in cfg and "pretrained_cfg" in cfg

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        cfg = read_json(path / CONFIG, "timm")
        arch = options.arch or cfg.get("architecture")
        if not isinstance(arch, str) or not timm.is_model(arch):
            raise ModelLoadError(f"{path.name}: config.json names architecture {one_line(str(arch), 80)!r}, which this timm "
                                 f"{timm.__version__} does not know", "upgrade timm, or state --arch")
        pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
        kwargs = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
        num_classes = options.num_classes or cfg.get("num_classes") or pre.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise UsageError(f"{path.name}: config.json gives no class count", "state --num-classes")
        size = options.input_size or pre.get("input_size") or (3, 224, 224)
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ModelLoadError(f"{path.name}/config.json: pretrained_cfg.input_size is not [C, H, W]", "the file is damaged")
        input_size = (int(size[0]), int(size[1]), int(size[2]))
        c = input_size[0]
        names = pre.get("label_names") or cfg.get("label_names") or []
        names = [str(n) for n in names] if isinstance(names, list) and len(names) == num_classes else []
        state, scan, _ = read_folder_weights(path, self.name)
        net = create_net(arch, num_classes, input_size, kwargs)
        load_state_into(net, state, arch)
        info = ModelInfo(arch=arch, num_classes=num_classes, input_size=input_size,
                         mean=_floats(pre.get("mean"), c, 0.0, "mean", path), std=_floats(pre.get("std"), c, 1.0, "std", path),
                         class_names=tuple(names), arch_kwargs=dict(kwargs))
        notes: list[str] = []
        wrapper = finalize(net, info, options, notes)
        return LoadedModel(wrapper, self.name, path, sha256_file(path), scan, None, notes)


def write_timm_folder(wrapper: ModelWrapper, folder: Path) -> None:
    """Writes ``wrapper`` (a timm-registry model) as timm's hub folder: config.json + model.safetensors.

    Raises:
        UsageError: the model has no timm-registry architecture (it came from ONNX, TorchScript, torchvision...).
    """
    info = wrapper.info
    if not timm.is_model(info.arch):
        raise UsageError(f"this model ({info.arch}) has no timm or Hugging Face architecture, so it cannot be written as a model folder",
                         "write it as .onnx or .pt (TorchScript) instead")
    if info.scale != 1.0:
        raise UsageError("a timm folder cannot say that a model takes 0-255 pixels", "write it as .safetensors instead")
    pre = {"input_size": list(info.input_size), "mean": list(info.mean), "std": list(info.std), "num_classes": info.num_classes,
           "interpolation": "bilinear", "crop_pct": 1.0}
    if info.class_names:
        pre["label_names"] = list(info.class_names)
    cfg = {"architecture": info.arch, "num_classes": info.num_classes, "model_args": dict(info.arch_kwargs), "pretrained_cfg": pre}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in wrapper.net.state_dict().items()}
    save_file(tensors, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(cfg, indent=1), encoding="utf-8")


__all__ = ["TimmFolderLoader", "write_timm_folder"]
