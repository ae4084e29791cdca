"""TorchScript archives (``torch.jit.save``): loaded after a static scan, and written from any model.

A TorchScript archive carries its own architecture as TorchScript code; it is executed by TorchScript's
interpreter, which has no Python (``os``, ``eval``, imports) to reach. Its pickles (``data.pkl``,
``constants.pkl``) are read by TorchScript's C++ unpickler, which only builds tensors and TorchScript
classes. bdscan still scans the archive first (:func:`~bdscan.io.picklescan_io.scan_pickles`): dangerous
pickle imports, native libraries, or code calling file-touching operators (``aten::from_file`` maps a
file into a tensor and, with ``shared=True``, writes it back; ``aten::save``) refuse the file before
``torch.jit.load`` runs. Model information is read like every self-describing format's
(:func:`bdscan.io.selfdescribing.describe`), from the ``extra/bdscan.json`` metadata file.

Token grid of a TorchScript module: :func:`bdscan.models.grid.find_token_grid` works where attributes
survive scripting (CCT's tokenizer keeps ``footprint``/``stride``/``offset``). Otherwise the first
submodule whose ``original_name`` is ``Conv2d`` is inspected: kernel from its weight's shape; stride and
padding from its attributes (``torch.jit.script`` keeps Conv2d's constants) or, for traced modules, from
the constant arguments of the ``aten::_convolution``/``aten::conv2d`` node in its graph. A first
convolution with kernel == stride > 1 and no padding cuts the image into non-overlapping patches (ViT,
DeiT, ConViT). Models without a Conv2d submodule get no grid (``--patch-size`` states one).

:class:`TorchScriptWriter` writes the raw network (normalised input) as TorchScript: a ``ScriptModule`` as
it is, anything else through ``torch.jit.trace`` on two random images, with bdscan's metadata in
``extra/bdscan.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdscan.atomic import atomic_write_with
from bdscan.errors import BdscanError, ModelLoadError, first_line
from bdscan.io.base import LoadedModel, LoadOptions, Readback, guarded, register_loader, register_writer, sha256_file
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.selfdescribing import META_FILE, bdscan_meta, conv_grid, describe, net_outputs, parse_meta
from bdscan.io.zipfile_sniff import ZIP_MAGIC, torch_zip_kind, zip_names
from bdscan.models.grid import find_token_grid
from bdscan.models.wrapper import ModelWrapper, TokenGrid
from bdscan.trigger import Trigger


def _node_list(node: Any, i: int) -> Any:
    inputs = list(node.inputs())
    if i >= len(inputs):
        return None
    v = inputs[i]
    val = v.toIValue()
    if val is not None:
        return list(val) if isinstance(val, (list, tuple)) else val
    src = v.node()
    if src.kind() == "prim::ListConstruct":
        vals = [x.toIValue() for x in src.inputs()]
        return vals if all(isinstance(x, int) for x in vals) else None
    return None


def script_token_grid(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    """Token grid of a TorchScript module (see the module docstring for how)."""
    grid = find_token_grid(net, input_size)
    if grid is not None:
        return grid
    for _, m in net.named_modules():
        if getattr(m, "original_name", type(m).__name__) != "Conv2d":
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            return None
        kernel = tuple(int(v) for v in w.shape[-2:])
        stride = getattr(m, "stride", None) if hasattr(m, "stride") else None
        padding = getattr(m, "padding", None) if hasattr(m, "padding") else None
        if stride is None:
            graph = getattr(m, "graph", None)
            for node in graph.nodes() if graph is not None else ():
                if node.kind() in ("aten::_convolution", "aten::conv2d"):
                    stride, padding = _node_list(node, 3), _node_list(node, 4)
                    break
        return conv_grid(kernel, stride, padding, input_size, "TorchScript graph")
    return None


@register_loader
class TorchScriptLoader:
    """Loads TorchScript archives after a static scan; see the module docstring."""

    name = "torchscript"
    suffixes = (".pt", ".pth", ".ts", ".torchscript", ".jit")

    def sniff(self, path: Path, head: bytes) -> bool:
        if not head.startswith(ZIP_MAGIC):
            return False
        names = zip_names(path)
        return names is not None and torch_zip_kind(names) == "torchscript"

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        scan = scan_pickles(path)
        refuse_if_unsafe(path, scan, "TorchScript", "torchscript")
        extra: dict[str, Any] = {META_FILE: ""}

        def _load() -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.load(str(path), map_location="cpu", _extra_files=extra)

        net = guarded("TorchScript", path, _load)
        meta = parse_meta(extra.get(META_FILE), path)
        notes: list[str] = []
        wrapper = describe(net, "torchscript", path, options, meta, notes, grid_fn=script_token_grid)
        return LoadedModel(wrapper, self.name, path, sha256_file(path), scan, None, notes)


@register_writer
class TorchScriptWriter:
    """Writes the raw network as TorchScript with bdscan's metadata (see the module docstring)."""

    name = "torchscript"
    title = "TorchScript"
    suffixes = (".pt",)

    def write(
        self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None, trigger: Trigger | None = None
    ) -> None:
        """Writes ``wrapper.net`` atomically; ``extra`` joins the metadata, ``trigger`` is not stored."""
        net = wrapper.net.eval()
        meta = bdscan_meta(wrapper)
        meta["input"] = "normalised"
        meta.update(extra or {})
        files = {META_FILE: json.dumps(meta)}
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            example = wrapper.normalise(torch.rand((2, *wrapper.input_size), generator=g))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = net if isinstance(net, torch.jit.ScriptModule) else torch.jit.trace(
                    net, example, check_trace=False, strict=False)
                atomic_write_with(Path(path), lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=files))
        except BdscanError:
            raise
        except Exception as e:
            raise BdscanError(f"cannot export {wrapper.info.arch} as TorchScript: {first_line(e)}",
                              "export ONNX or safetensors instead") from e

    def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
        """Runs the written file with ``torch.jit.load`` on ``x`` normalised as ``wrapper`` normalises."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"the written TorchScript file does not load back: {first_line(e)}") from e
        try:
            with torch.no_grad():
                out = loaded(wrapper.normalise(x))
        except Exception as e:  # a trace that baked in its example's batch size; TorchScript's last line says why
            text = str(e).strip()
            msg = text.splitlines()[-1][:200] if text else type(e).__name__
            raise ModelLoadError(f"the traced TorchScript model does not run on {len(x)} images: {msg}") from e
        if isinstance(out, (tuple, list)):
            out = out[0]
        return Readback(out.double().numpy(), net_outputs(wrapper, x))
