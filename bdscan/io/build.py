"""Building a wrapped model from an architecture name and a state dict, with actionable mismatch errors.

Shared by the weight-only loaders (safetensors, state dict, a pickled checkpoint under ``--trust-pickle``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import bdscan.models  # noqa: F401  (registers bdscan architectures with timm)
from bdscan.errors import ModelLoadError, NumericalError, UsageError, first_line
from bdscan.io.base import LoadedModel, LoadOptions, PickleScan, sha256_file
from bdscan.models.grid import find_token_grid, grid_from_patch_size
from bdscan.models.wrapper import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, ModelWrapper, TokenGrid, check_model_output

log = logging.getLogger(__name__)

#: suffixes of ``torch.save`` files (the state-dict and pickle loaders)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
#: keys under which training scripts nest the state dict, in the order they are tried
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")
#: key prefixes added by wrappers, stripped when every key has them
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: head weight names, for inferring the class count of a weight-only checkpoint
_HEAD_KEYS = ("head.weight", "fc.weight", "classifier.weight", "head.fc.weight", "last_linear.weight")


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    for k in _HEAD_KEYS:
        if k in state and state[k].dim() == 2:
            return int(state[k].shape[0])
    return None


#: ``--arch PREFIX:name`` builders besides timm's registry (torchvision's classification models by name)
TORCHVISION_PREFIX = "torchvision:"


def _torchvision_net(name: str, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise UsageError(f"unknown torchvision architecture {name!r}", "use a torchvision.models classification name, e.g. torchvision:resnet50")
    return tvm.get_model(name, weights=None, num_classes=num_classes)


def create_net(arch: str, num_classes: int, input_size: tuple[int, int, int], arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model`` for bdscan's and timm's own architectures (or torchvision's by ``torchvision:NAME``), never with
    pretrained weights."""
    if arch.startswith(TORCHVISION_PREFIX):
        return _torchvision_net(arch[len(TORCHVISION_PREFIX):], num_classes)
    if not timm.is_model(arch):
        raise UsageError(
            f"unknown architecture {arch!r}",
            "run `bdscan models` for bdscan's architectures; any timm model name also works",
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": input_size[0], **(arch_kwargs or {})}
    if arch.startswith("bdscan_") or "vit" in arch or "deit" in arch or "convit" in arch:
        kwargs["img_size"] = input_size[1]
    try:
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError:
            kwargs.pop("img_size", None)
            return timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot build {arch!r} with {kwargs}: {first_line(e, 150)}",
                             "check the architecture arguments in the metadata or on the command line") from e


def load_state_into(net: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Strictly loads ``state`` into ``net``; names the first missing, unexpected or mismatching tensor."""
    own = net.state_dict()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ModelLoadError(f"entry {k!r} of the state dict is a {type(v).__name__}, not a tensor",
                                 "pass a plain state dict of tensors")
        if k not in own:
            raise ModelLoadError(
                f"the weights do not fit architecture {arch!r}: unexpected tensor {k!r}",
                "check --arch (or the checkpoint's metadata)",
            )
        if tuple(own[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"the weights do not fit architecture {arch!r}: {k!r} is {tuple(v.shape)}, "
                f"expected {tuple(own[k].shape)}",
                "check --arch, --num-classes and --input-size",
            )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelLoadError(
            f"the weights do not fit architecture {arch!r}: missing tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
            "check --arch (or the checkpoint's metadata)",
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NumericalError(f"tensor {bad[0]!r} holds NaN or inf values", "the checkpoint is broken; retrain or re-export it")
    net.load_state_dict(state, strict=False)


def _stated_grid(net: nn.Module, info: ModelInfo, patch: int, notes: list[str] | None) -> TokenGrid:
    """The grid ``--patch-size`` states; a note (shown as a warning by the CLI) when it overrides a different grid
    found in the model, saying which grid the patch level runs on."""
    stated = grid_from_patch_size(patch, info.input_size)
    try:
        found = info.token_grid or find_token_grid(net, info.input_size)
    except Exception:  # discovery is best effort; the stated grid is used either way
        found = None
    if found is not None and (found.stride, found.footprint) != (stated.stride, stated.footprint) and notes is not None:
        notes.append(f"--patch-size {patch} overrides the token grid found in the model ({found.grid[0]}×{found.grid[1]} tokens of "
                     f"{found.stride} pixels, from {found.source}): the patch level runs on a {stated.grid[0]}×{stated.grid[1]} "
                     f"grid of {patch}×{patch}-pixel patches; leave --patch-size out to use the model's grid")
    return stated


def finalize(net: nn.Module, info: ModelInfo, options: LoadOptions, notes: list[str] | None = None) -> ModelWrapper:
    """Applies CLI overrides, finds the token grid, wraps the net and checks its output contract."""
    over: dict[str, Any] = {}
    for name in ("mean", "std", "scale", "class_names"):
        v = getattr(options, name)
        if v is not None:
            over[name] = tuple(v) if isinstance(v, (list, tuple)) else v
    if over:
        info = info.with_(**over)
    if options.patch_size:
        info = info.with_(token_grid=_stated_grid(net, info, options.patch_size, notes))
    elif info.token_grid is None:
        info = info.with_(token_grid=find_token_grid(net, info.input_size))
    c = info.input_size[0]
    for name in ("mean", "std"):
        vals = getattr(info, name)
        if len(vals) not in (1, c):
            if getattr(options, name) is None:  # from the file: damaged metadata, not a bad option
                raise ModelLoadError(f"the model's metadata has {len(vals)} {name} values for {c} channels",
                                     f"the file is damaged: re-export it, or state --{name} with 1 or {c} values")
            raise UsageError(f"--{name} has {len(vals)} values but the model takes {c} channels", f"give 1 or {c} values")
    if any(s == 0 for s in info.std):
        if options.std is None:
            raise ModelLoadError("the model's metadata has a std of 0", "the file is damaged: re-export it, or state --std")
        raise UsageError("--std contains 0", "give the per-channel standard deviations the model was trained with")
    net.eval()
    wrapper = ModelWrapper(net, info)
    output = check_model_output(wrapper)
    if output == "probs":
        if notes is not None:
            notes.append("the model ends in a softmax; bdscan optimises on log-probabilities")
        wrapper.info = info.with_(output="probs")
    wrapper.requires_grad_(False)
    return wrapper


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object.

    A checkpoint may be a plain state dict or nest one (up to three levels) under one of :data:`NESTED_KEYS`;
    the key prefixes of :data:`WRAPPER_PREFIXES` (DataParallel's ``module.``, ``torch.compile``'s
    ``_orig_mod.``) are stripped when every key has them.
    """
    if not isinstance(obj, dict):
        raise ModelLoadError(
            f"{path.name} holds a {type(obj).__name__}, not a state dict",
            "save the model's state_dict() (or export it to .safetensors)",
        )
    for _ in range(3):  # {"model": {"state_dict": {...}}} happens
        if _all_tensors(obj):
            break
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise ModelLoadError(
            f"{path.name}: no tensors found (top-level keys: {keys})",
            f"nest the weights under one of {', '.join(NESTED_KEYS[:4])} or save a plain state dict",
        )
    if not all(isinstance(k, str) for k in obj):
        raise ModelLoadError(f"{path.name}: the state dict has non-string keys", "save model.state_dict()")
    state: dict[str, Any] = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def build_from_state(
    state: dict[str, Any], path: Path, options: LoadOptions, fmt: str, scan: PickleScan | None
) -> LoadedModel:
    """Builds ``--arch`` and loads ``state`` into it (shared by the state-dict and pickle loaders)."""
    arch = options.arch
    if not arch:
        raise UsageError(
            f"{path.name} is a bare state dict: it does not say which architecture it holds",
            "pass --arch (see `bdscan models`) and --num-classes",
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    num_classes = options.num_classes or infer_num_classes(tensors)
    if not num_classes:
        raise UsageError(f"cannot tell how many classes {path.name} has", "pass --num-classes")
    tv = arch.startswith(TORCHVISION_PREFIX)  # torchvision's classifiers are ImageNet models: 224 and its statistics
    input_size = tuple(options.input_size or ((3, 224, 224) if tv else (3, 32, 32)))
    c = input_size[0]
    info = ModelInfo(arch=arch, num_classes=int(num_classes), input_size=input_size,  # type: ignore[arg-type]
                     mean=IMAGENET_MEAN if tv and c == 3 else (0.0,) * c, std=IMAGENET_STD if tv and c == 3 else (1.0,) * c)
    net = create_net(arch, int(num_classes), input_size)  # type: ignore[arg-type]
    load_state_into(net, state, arch)
    notes: list[str] = []
    wrapper = finalize(net, info, options, notes)
    return LoadedModel(wrapper, fmt, path, sha256_file(path), scan, None, notes)
