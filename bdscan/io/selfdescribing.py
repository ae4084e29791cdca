"""What every self-describing format shares: formats that carry their own architecture (TorchScript,
``torch.export``, ONNX, full pickled modules), so that bdscan needs no ``--arch`` to read them.

Reading, by :func:`describe`:

* input size: ``--input-size``, else the file's bdscan metadata, else the format's own declaration
  (ONNX graph input, ``torch.export`` placeholder), else 3x32x32;
* number of classes: a probe forward on 2 random images (``--num-classes`` is checked against it);
* a model that only runs at a fixed batch size (exported with a static batch) is wrapped by
  :class:`StaticBatch`, which feeds it slices of that size;
* mean/std/scale/class names: options, else the file's bdscan metadata (:data:`META_FILE` in TorchScript and
  ``torch.export`` archives, ``metadata_props`` in ONNX; parsed by :func:`parse_meta`), else 0/1/1;
* token grid: ``--patch-size``, else the metadata, else found from the model itself (each format passes its
  own finder; :func:`conv_grid` reads a patchifying first convolution).

Writing: a self-describing export holds the *raw network* (it takes normalised input, like the original
network did, so it drops into any pipeline that already normalises) plus :func:`bdscan_meta`, from which the
loader rebuilds the [0, 1]-pixel wrapper; :func:`net_outputs` is what such a file computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bdscan.errors import BdscanError, ModelLoadError, UsageError, first_line
from bdscan.io.base import LoadOptions, guarded
from bdscan.io.build import finalize
from bdscan.models.wrapper import ModelInfo, ModelWrapper, TokenGrid

#: name of the bdscan metadata file inside TorchScript and torch.export archives (``_extra_files``)
META_FILE = "bdscan.json"
DEFAULT_INPUT = (3, 32, 32)
#: fields of the metadata (same meaning as the safetensors ``bdscan.*`` convention)
META_FIELDS = ("arch", "num_classes", "input_size", "mean", "std", "scale", "class_names", "token_grid")


def bdscan_meta(wrapper: ModelWrapper) -> dict[str, Any]:
    """The metadata dict a self-describing export of ``wrapper`` carries (JSON-serialisable)."""
    info = wrapper.info
    return {
        "arch": info.arch,
        "num_classes": info.num_classes,
        "input_size": list(info.input_size),
        "mean": list(info.mean),
        "std": list(info.std),
        "scale": info.scale,
        "class_names": list(info.class_names),
        "token_grid": info.token_grid.to_dict() if info.token_grid else None,
        "format_version": 1,
    }


def parse_meta(raw: Any, path: Path) -> dict[str, Any]:
    """Validated metadata from a JSON text (or bytes, or dict); {} when absent. Bad metadata is a ModelLoadError."""
    if raw in (None, "", b""):
        return {}
    try:
        meta = json.loads(raw) if isinstance(raw, (str, bytes, bytearray)) else raw
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name}: its bdscan metadata is not valid JSON", "re-export the model") from e
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path.name}: its bdscan metadata is not a JSON object", "re-export the model")
    out: dict[str, Any] = {}
    try:
        if meta.get("input_size") is not None:
            size = tuple(int(v) for v in meta["input_size"])
            if len(size) != 3 or min(size) < 1 or max(size) > 8192:
                raise ValueError("input_size")
            out["input_size"] = size
        for k in ("mean", "std"):
            if meta.get(k) is not None:
                out[k] = tuple(float(v) for v in meta[k])
        if meta.get("scale") is not None:
            out["scale"] = float(meta["scale"])
        if meta.get("class_names"):
            out["class_names"] = tuple(str(v) for v in meta["class_names"])
        if meta.get("num_classes") is not None:
            out["num_classes"] = int(meta["num_classes"])
        if meta.get("arch") is not None:
            out["arch"] = str(meta["arch"])
        if meta.get("token_grid"):
            g = meta["token_grid"]
            out["token_grid"] = TokenGrid(
                (int(g["grid"][0]), int(g["grid"][1])), int(g["stride"]), int(g["footprint"]), int(g.get("offset", 0)),
                str(g.get("source", "bdscan metadata")),
            )
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path.name}: its bdscan metadata is malformed", "re-export the model") from e
    return out


class StaticBatch(nn.Module):
    """Runs a model exported for a fixed batch size on any batch, in slices of that size.

    The last slice is padded by repeating its final image; padded outputs are dropped. Gradients flow.
    """

    def __init__(self, net: nn.Module, batch: int) -> None:
        super().__init__()
        self.net = net
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b = x.shape[0], self.batch
        if n == b:
            return self.net(x)
        pad = (-n) % b
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        outs = [self.net(x[i : i + b]) for i in range(0, x.shape[0], b)]
        if isinstance(outs[0], (tuple, list)):
            return tuple(torch.cat([o[j] for o in outs])[:n] for j in range(len(outs[0])))  # type: ignore[return-value]
        return torch.cat(outs)[:n]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


@torch.no_grad()
def _probe(net: nn.Module, input_size: tuple[int, int, int], batch: int) -> Any:
    g = torch.Generator().manual_seed(0)
    return net(torch.rand((batch, *input_size), generator=g))


def fit_batch(
    net: nn.Module, input_size: tuple[int, int, int], path: Path, fmt: str, static_batch: int | None, notes: list[str]
) -> tuple[nn.Module, torch.Tensor]:
    """Makes ``net`` run on any batch size; returns it and its output on a probe batch of 2."""
    net.eval()
    if static_batch and static_batch > 0:
        wrapped: nn.Module = StaticBatch(net, static_batch)
        notes.append(f"the {fmt} model has a fixed batch size of {static_batch}; bdscan feeds it slices")
        return wrapped, _first(_call(wrapped, input_size, 2, path, fmt))
    try:
        return net, _first(_probe(net, input_size, 2))
    except BdscanError:
        raise
    except Exception as e:
        first_error = e
    try:
        _probe(net, input_size, 1)
    except Exception:
        raise _run_error(path, fmt, input_size, first_error) from first_error
    notes.append(f"the {fmt} model only runs one image at a time; bdscan feeds it slices")
    wrapped = StaticBatch(net, 1)
    return wrapped, _first(_call(wrapped, input_size, 2, path, fmt))


def _call(net: nn.Module, input_size: tuple[int, int, int], batch: int, path: Path, fmt: str) -> Any:
    try:
        return _probe(net, input_size, batch)
    except BdscanError:
        raise
    except Exception as e:
        raise _run_error(path, fmt, input_size, e) from e


def _run_error(path: Path, fmt: str, input_size: tuple[int, int, int], e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{path.name}: the {fmt} model does not run on {input_size[0]}x{input_size[1]}x{input_size[2]} images: "
        f"{first_line(e)}",
        "state the input size with --input-size C H W",
    )


def describe(
    net: nn.Module,
    fmt: str,
    path: Path,
    options: LoadOptions,
    meta: dict[str, Any],
    notes: list[str],
    *,
    declared_input: tuple[int, int, int] | None = None,
    static_batch: int | None = None,
    grid_fn: Callable[[nn.Module, tuple[int, int, int]], TokenGrid | None] | None = None,
    arch: str | None = None,
) -> ModelWrapper:
    """Wraps a self-describing model: input size, class count by probing, metadata, token grid (see module doc)."""
    if options.input_size is not None and declared_input is not None and tuple(options.input_size) != declared_input:
        raise UsageError(
            f"--input-size {'x'.join(map(str, options.input_size))} contradicts {path.name}, "
            f"which declares {'x'.join(map(str, declared_input))}",
            "leave --input-size out for this model",
        )
    input_size: tuple[int, int, int] = tuple(  # type: ignore[assignment]
        options.input_size or declared_input or meta.get("input_size") or DEFAULT_INPUT
    )
    grid = meta.get("token_grid")
    if grid is None and grid_fn is not None:  # also with --patch-size: a grid it overrides is worth a warning
        try:
            grid = grid_fn(net, input_size)
        except Exception:  # grid discovery is best effort; a model without one is scanned pixel-level
            grid = None
    net, out = fit_batch(net, input_size, path, fmt, static_batch, notes)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            f"{path.name}: the {fmt} model returns {shape} for 2 images, expected (2, classes)",
            "export the model so that it returns class scores (N, classes)",
        )
    k = int(out.shape[1])
    if options.num_classes is not None and options.num_classes != k:
        raise UsageError(f"--num-classes {options.num_classes} contradicts {path.name}, which outputs {k} classes",
                         "leave --num-classes out for this model")
    names = meta.get("class_names") or ()
    if names and len(names) != k:
        raise ModelLoadError(f"{path.name}: its metadata lists {len(names)} class names for {k} classes",
                             "fix the metadata or pass --class-names")
    c = input_size[0]
    metadata: dict[str, Any] = {}
    if meta.get("arch"):
        metadata["source_arch"] = meta["arch"]
    info = ModelInfo(
        arch=arch or fmt,
        num_classes=k,
        input_size=input_size,
        mean=tuple(meta.get("mean", (0.0,) * c)),
        std=tuple(meta.get("std", (1.0,) * c)),
        scale=float(meta.get("scale", 1.0)),
        class_names=tuple(names),
        token_grid=grid,
        metadata=metadata,
    )
    return guarded(fmt, path, lambda: finalize(net, info, options, notes))


def _ints(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v):
        return tuple(v)
    return None


def conv_grid(kernel: Any, stride: Any, padding: Any, input_size: tuple[int, int, int], source: str) -> TokenGrid | None:
    """The grid of a first convolution that patchifies (kernel == stride > 1, no padding), else None."""
    k, s, p = _ints(kernel), _ints(stride), _ints(padding)
    if not k or not s or p is None or len(set(k)) != 1 or len(set(s)) != 1 or any(p):
        return None
    if k[0] != s[0] or k[0] < 2:
        return None
    return TokenGrid((input_size[1] // s[0], input_size[2] // s[0]), s[0], k[0], 0,
                     f"{source}: first convolution has kernel = stride = {k[0]}")


@torch.no_grad()
def net_outputs(wrapper: ModelWrapper, x: torch.Tensor) -> np.ndarray:
    """The raw network's output on ``x`` (pixels in [0, 1]), as a self-describing export of it computes it."""
    wrapper.eval()
    out = wrapper.net(wrapper.normalise(x))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().cpu().double().numpy()
