"""Hugging Face ``transformers`` model folders, as ``save_pretrained`` writes them (needs ``pip install 'bdscan[hf]'``).

What is read, and how:

* ``config.json``: parsed as data. A config with ``auto_map`` (custom modelling code shipped with the model) is
  refused before anything else (:class:`~bdscan.errors.ModelLoadError`, exit code 3): bdscan never runs code from
  a model folder and never passes ``trust_remote_code``. Its ``model_type`` must be one of transformers' own image
  classification architectures (ViT, DeiT, BEiT, Swin, ConvNeXt, ResNet, ... :data:`IMAGE_CLASSIFICATION` below);
  the model class is the one the config's ``architectures`` names when it is such a class of ``transformers``
  itself (DeiT's ``...WithTeacher``), else the auto mapping's first.
* the weights: :func:`bdscan.io.folder_weights.read_folder_weights` (safetensors, sharded safetensors, or
  ``pytorch_model.bin`` through the static pickle scan and a weights-only load). The tensors are handed to
  ``from_pretrained(None, config=..., state_dict=...)``, which reads no file and applies transformers' own
  checkpoint-key conversions (transformers 5 renames legacy keys on load); every missing, unexpected or
  mismatching tensor is an error.
* ``preprocessor_config.json``: input size (``size``: height/width or shortest edge), ``image_mean``/``image_std``
  and ``rescale_factor`` (bdscan feeds [0, 1] pixels, so the model's own scaling happens inside the wrapper);
  without it the config's ``image_size`` and no normalisation are assumed (and said in the notes).
* ``id2label``: the class names (transformers' placeholder names ``LABEL_k`` are dropped).
* ``bdscan.json`` / ``bdscan_trigger.safetensors``: what bdscan's writer adds (provenance; a lab model's trigger).

The token grid comes from the config (:data:`GRIDS`): ViT/DeiT/BEiT/Data2Vec/DINOv2 cut the image into
``patch_size`` patches; Swin embeds 4-pixel patches (``patch_size``) and attends within windows of
``window_size`` tokens, merging them into 8-, 16- and 32-pixel tokens deeper down: the patch level works on the
embedding's grid, the finest units the model sees (a trigger cell is one embedded patch; a window is 7×7 of them);
ConvNeXt's stem (a ``patch_size`` convolution with stride = kernel) gives a CNN grid of that stride; other
architectures (ResNet) have none, and the patch level lays its default grid over the image.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bdscan.errors import BdscanError, ModelLoadError, UsageError, first_line
from bdscan.io.base import (
    FOLDER_SUFFIX,
    LoadedModel,
    LoadOptions,
    Readback,
    guarded,
    load_model,
    one_line,
    register_loader,
    register_writer,
    sha256_file,
)
from bdscan.io.build import finalize
from bdscan.io.folder_weights import CONFIG, SAFE_WEIGHTS, peek_config, read_folder_weights, read_json
from bdscan.models.wrapper import ModelInfo, ModelWrapper, TokenGrid
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

PREPROCESSOR = "preprocessor_config.json"
BDSCAN_JSON = "bdscan.json"
TRIGGER_FILE = "bdscan_trigger.safetensors"
HF_HINT = "pip install 'bdscan[hf]'"
#: model types whose image-classification class bdscan is tested with (others of transformers' mapping also load)
IMAGE_CLASSIFICATION = ("vit", "deit", "beit", "swin", "convnext", "resnet")


def require_transformers() -> Any:
    """The ``transformers`` module, quietened (no progress bars or load reports on the console).

    Raises:
        UsageError: transformers is not installed (one line naming the extra).
    """
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("reading a Hugging Face model folder needs the transformers package, which is not installed",
                         f"run: {HF_HINT}")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# --- token grids from the config -------------------------------------------------------------------------------

GridRule = Callable[[dict[str, Any], tuple[int, int, int]], "TokenGrid | None"]


def _patches(what: str) -> GridRule:
    def rule(cfg: dict[str, Any], size: tuple[int, int, int]) -> TokenGrid | None:
        p = cfg.get("patch_size")
        p = p[0] if isinstance(p, (list, tuple)) and p else p
        if not isinstance(p, int) or p < 1:
            return None
        return TokenGrid((size[1] // p, size[2] // p), p, p, 0, f"Hugging Face config: {cfg.get('model_type')} patch_size {p} ({what})")

    return rule


def _swin(cfg: dict[str, Any], size: tuple[int, int, int]) -> TokenGrid | None:
    g = _patches("patch embedding")(cfg, size)
    if g is None:
        return None
    w = cfg.get("window_size", 7)
    return TokenGrid(g.grid, g.stride, g.footprint, 0, f"{g.source[:-1]}; attention in {w}×{w}-token windows)")


#: model_type -> how its token grid follows from the config
GRIDS: dict[str, GridRule] = {
    "vit": _patches("ViT patch embedding"),
    "deit": _patches("ViT patch embedding"),
    "beit": _patches("ViT patch embedding"),
    "data2vec-vision": _patches("ViT patch embedding"),
    "dinov2": _patches("ViT patch embedding"),
    "swin": _swin,
    "swinv2": _swin,
    "convnext": _patches("stem stride as the CNN grid"),
    "convnextv2": _patches("stem stride as the CNN grid"),
}


# --- preprocessing -----------------------------------------------------------------------------------------------

def _size(pre: dict[str, Any], cfg: dict[str, Any]) -> tuple[int, int] | None:
    s = pre.get("crop_size") if pre.get("do_center_crop") and pre.get("crop_size") else pre.get("size")
    if isinstance(s, int):
        return s, s
    if isinstance(s, dict):
        if isinstance(s.get("height"), int) and isinstance(s.get("width"), int):
            return s["height"], s["width"]
        if isinstance(s.get("shortest_edge"), int):
            return s["shortest_edge"], s["shortest_edge"]
    img = cfg.get("image_size")
    if isinstance(img, int):
        return img, img
    if isinstance(img, (list, tuple)) and len(img) == 2:
        return int(img[0]), int(img[1])
    return None


def input_spec(folder: Path, cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Input size (C, H, W), mean, std and scale from ``preprocessor_config.json`` (and the config)."""
    pre = read_json(folder / PREPROCESSOR, "Hugging Face") if (folder / PREPROCESSOR).is_file() else {}
    if not pre:
        notes.append(f"no {PREPROCESSOR}: input size from config.json, no normalisation assumed (state --mean/--std)")
    c = cfg.get("num_channels", 3)
    hw = _size(pre, cfg)
    if hw is None:
        notes.append("no input size in the folder: 224×224 assumed (state --input-size)")
        hw = (224, 224)
    c = c if isinstance(c, int) and c > 0 else 3
    mean, std = (0.0,) * c, (1.0,) * c
    if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
        mean = tuple(float(v) for v in _listed(pre["image_mean"], c))
        std = tuple(float(v) for v in _listed(pre.get("image_std", 1.0), c))
    rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
    return {"input_size": (c, int(hw[0]), int(hw[1])), "mean": mean, "std": std, "scale": round(255.0 * rescale, 9)}


def _listed(v: Any, c: int) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * c


def _class_names(cfg: dict[str, Any], n: int) -> tuple[str, ...]:
    id2 = cfg.get("id2label")
    if not isinstance(id2, dict):
        return ()
    try:
        names = [str(id2.get(str(i), id2.get(i, i))) for i in range(n)]  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return ()
    return () if all(s == f"LABEL_{i}" for i, s in enumerate(names)) else tuple(names)


class HFLogits(nn.Module):
    """A transformers image classifier as a plain module: normalised images (N, C, H, W) -> logits (N, K)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def model_class(transformers: Any, cfg: dict[str, Any], folder: Path) -> Any:
    """transformers' own image-classification class for the config (never a class from the folder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in names:
        raise ModelLoadError(f"{folder.name}: config.json's model_type {one_line(str(mt), 60)!r} is not an image classifier "
                             "transformers knows", "bdscan reads transformers' own image-classification models (ViT, DeiT, "
                             "BEiT, Swin, ConvNeXt, ResNet, ...); export others to ONNX")
    allowed = (names[mt],) if isinstance(names[mt], str) else tuple(names[mt])
    archs = cfg.get("architectures") or []
    name = next((a for a in archs if isinstance(a, str) and a in allowed), allowed[0])
    cls = getattr(transformers, name, None)
    if cls is None or not str(getattr(cls, "__module__", "")).startswith("transformers.models."):
        raise ModelLoadError(f"{folder.name}: transformers {transformers.__version__} has no class {name}", f"upgrade: {HF_HINT} -U")
    return cls


def refuse_custom_code(cfg: dict[str, Any], folder: Path) -> None:
    """Raises for a config that asks for modelling code from the folder or the hub (``auto_map``)."""
    if cfg.get("auto_map") is not None or cfg.get("trust_remote_code"):
        what = ", ".join(map(str, cfg["auto_map"])) if isinstance(cfg.get("auto_map"), dict) else "custom code"
        raise ModelLoadError(f"{folder.name}: config.json asks for the model's own Python code (auto_map: {one_line(what, 120)}); "
                             "bdscan never runs code from a model folder",
                             "export the model to ONNX or to a standard transformers architecture, then scan that")


@register_loader
class HFFolderLoader:
    """Loads a Hugging Face ``save_pretrained`` folder (see the module docstring); executes nothing from it."""

    name = "hf-folder"
    suffixes = ()
    folder = True

    def sniff(self, path: Path, head: bytes) -> bool:
        cfg = peek_config(path) if path.is_dir() else None
        return cfg is not None and "pretrained_cfg" not in cfg and any(k in cfg for k in ("model_type", "architectures", "auto_map"))

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        cfg = read_json(path / CONFIG, "Hugging Face")
        refuse_custom_code(cfg, path)
        transformers = require_transformers()
        cls = model_class(transformers, cfg, path)
        config = guarded("a Hugging Face config", path / CONFIG, lambda: cls.config_class.from_dict(cfg))
        state, scan, weights = read_folder_weights(path, self.name)
        net = _build(cls, config, state, path / weights)
        notes: list[str] = []
        spec = input_spec(path, cfg, notes)
        if options.input_size is not None:
            spec["input_size"] = tuple(options.input_size)
        n = int(config.num_labels)
        if options.num_classes is not None and options.num_classes != n:
            raise UsageError(f"--num-classes {options.num_classes}, but {path.name}'s config has {n} labels", "leave --num-classes out")
        side = read_json(path / BDSCAN_JSON, "bdscan") if (path / BDSCAN_JSON).is_file() else {}
        rule = GRIDS.get(str(cfg.get("model_type")))
        info = ModelInfo(arch=f"hf:{cls.__name__}", num_classes=n, class_names=_class_names(cfg, n),
                         token_grid=rule(cfg, spec["input_size"]) if rule else None,
                         metadata=side.get("extra") if isinstance(side.get("extra"), dict) else {}, **spec)
        wrapper = finalize(HFLogits(net), info, options, notes)
        return LoadedModel(wrapper, self.name, path, sha256_file(path), scan, _trigger(path, side), notes)


def _build(cls: Any, config: Any, state: dict[str, torch.Tensor], src: Path) -> nn.Module:
    def make() -> tuple[nn.Module, dict[str, Any]]:
        return cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True, dtype=torch.float32)

    model, report = guarded("Hugging Face weights", src, make)
    for key, what in (("missing_keys", "misses tensor"), ("unexpected_keys", "has an unexpected tensor"),
                      ("mismatched_keys", "has a tensor of the wrong shape")):
        bad = sorted(str(k) for k in (report.get(key) or ()))
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise ModelLoadError(f"{src.name} does not fit its config.json ({cls.__name__}): it {what} {one_line(bad[0], 100)!r}{more}",
                                 "the folder's weights and config disagree: re-download or re-export the model")
    bad_t = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad_t:
        from bdscan.errors import NumericalError

        raise NumericalError(f"tensor {bad_t[0]!r} holds NaN or inf values", "the checkpoint is broken; retrain or re-export it")
    return model.float().eval()


def _trigger(folder: Path, side: dict[str, Any]) -> Trigger | None:
    t = side.get("trigger")
    if not isinstance(t, dict) or not (folder / TRIGGER_FILE).is_file():
        return None
    tensors = guarded("safetensors", folder / TRIGGER_FILE, lambda: load_file(str(folder / TRIGGER_FILE)))
    if "mask" not in tensors or "pattern" not in tensors:
        return None
    return Trigger(tensors["mask"].float(), tensors["pattern"].float(), t.get("target"), str(t.get("attack", "original")), t)


# --- writing -----------------------------------------------------------------------------------------------------

def preprocessor_config(info: ModelInfo) -> dict[str, Any]:
    """A ``preprocessor_config.json`` that feeds the model what bdscan's wrapper feeds it."""
    c, h, w = info.input_size
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": 2, "do_rescale": True, "rescale_factor": info.scale / 255.0, "do_normalize": True,
            "image_mean": list(_listed(info.mean, c))[:c], "image_std": list(_listed(info.std, c))[:c]}


def write_side(folder: Path, extra: dict[str, Any] | None, trigger: Trigger | None, info: ModelInfo) -> None:
    """bdscan's additions to a model folder: ``bdscan.json`` (metadata, provenance) and the original trigger."""
    side: dict[str, Any] = {"format_version": 1, "extra": {**info.metadata, **(extra or {})}}
    if trigger is not None:
        side["trigger"] = {"attack": trigger.kind, "target": trigger.target, **trigger.params}
        save_file({"mask": trigger.mask.detach().cpu().float().contiguous(),
                   "pattern": trigger.pattern.detach().cpu().float().contiguous()}, str(folder / TRIGGER_FILE))
    (folder / BDSCAN_JSON).write_text(json.dumps(side, indent=1, default=str), encoding="utf-8")


def _fresh_folder(path: Path) -> Path:
    # the export writes to a temporary *file* next to the output (bdscan.atomic.atomic_path); a folder takes its place
    path = Path(path)
    if path.is_file():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


@register_writer
class ModelFolderWriter:
    """Writes a model folder: a Hugging Face model as ``save_pretrained`` does (config.json, model.safetensors) plus
    preprocessor_config.json; a timm model as timm's ``save_for_hf`` does (:mod:`bdscan.io.timm_folder`).

    Chosen for an output path without a suffix. bdscan's metadata and provenance go to ``bdscan.json``.
    """

    name = "hf-folder"
    title = "model folder"
    suffixes = (FOLDER_SUFFIX,)

    def write(self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None, trigger: Trigger | None = None) -> None:
        if isinstance(wrapper.net, HFLogits):
            folder = _fresh_folder(path)
            guarded("a Hugging Face folder", folder, lambda: wrapper.net.model.save_pretrained(str(folder), safe_serialization=True))
            (folder / PREPROCESSOR).write_text(json.dumps(preprocessor_config(wrapper.info), indent=1), encoding="utf-8")
        else:
            from bdscan.io.timm_folder import write_timm_folder

            write_timm_folder(wrapper, _fresh_folder(path))
            folder = Path(path)
        write_side(folder, extra, trigger, wrapper.info)

    def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
        """A Hugging Face folder is run by transformers itself (``from_pretrained``, local files, no remote code) on
        ``x`` scaled as the written preprocessor config says; a timm folder is loaded back with bdscan's loader."""
        path = Path(path)
        with torch.no_grad():
            expected = wrapper.eval()(x).double().numpy()
            if not isinstance(wrapper.net, HFLogits):
                try:
                    return Readback(load_model(path).wrapper.eval()(x).double().numpy(), expected)
                except BdscanError as e:
                    raise ModelLoadError(f"the written model folder does not load back: {e.message}") from e
            transformers = require_transformers()
            pre = read_json(path / PREPROCESSOR, "Hugging Face")
            try:
                model = transformers.AutoModelForImageClassification.from_pretrained(
                    str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True).eval()
            except Exception as e:
                raise ModelLoadError(f"transformers cannot load the written folder: {first_line(e)}") from e
            c = x.shape[1]
            mean = torch.tensor(_listed(pre["image_mean"], c), dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(_listed(pre["image_std"], c), dtype=x.dtype).view(1, -1, 1, 1)
            got = model(pixel_values=(x * 255.0 * float(pre["rescale_factor"]) - mean) / std).logits
            return Readback(got.double().numpy(), expected)


__all__ = ["BDSCAN_JSON", "GRIDS", "PREPROCESSOR", "SAFE_WEIGHTS", "HFFolderLoader", "HFLogits", "ModelFolderWriter"]
