"""ONNX models: read with ``onnx``, converted to a differentiable torch module with onnx2torch.

ONNX is protobuf: parsing runs no code. What the loader guards against:

* external data: tensors may live in side files named by a ``location`` entry. A location that is
  absolute, contains ``..``, or resolves (through symlinks) outside the model's folder is refused
  *before* any external data is read (the model is parsed with ``load_external_data=False`` first).
* converter code generation: onnx2torch names FX submodules after ONNX node names, and FX pastes
  non-identifier names into generated Python source inside quotes; a hostile node name could break out.
  Nodes are renamed ``n<i>_<op>`` before conversion.
* silent conversion errors: the converted module and onnxruntime (``CPUExecutionProvider``) run the same
  4 random inputs; a max absolute difference above :data:`PARITY_TOL` is a :class:`ModelLoadError`.

Conversion help: Constant nodes and Identity nodes over initializers (the legacy exporter's
de-duplicated BatchNorm-folded biases) become initializers, because onnx2torch reads Conv/Gemm
weights from initializers only. Operators onnx2torch has no converter for are listed by name
(queried from its registry, ``onnx2torch.node_converters.registry.get_converter``) in the error.

Input size: the graph input's static (N, C, H, W) shape, else ``--input-size``, else the metadata, else
3×32×32; a static batch dimension makes bdscan feed the model slices of that size.

:func:`export_onnx` writes the *raw network* (``wrapper.net``): the graph takes normalised input like the
original network did, so it drops into any pipeline that already normalises. The normalisation
(mean/std/scale), class names, the source architecture and the token grid travel as ``bdscan.*``
``metadata_props`` (JSON values, as in the safetensors convention), from which the loader rebuilds the
[0, 1]-pixel wrapper. It uses torch's legacy TorchScript-based exporter (``dynamo=False``), which
handles all six bdscan architectures, with a dynamic batch axis. :class:`OnnxWriter` is the format's registered
writer: :func:`export_onnx`, and onnxruntime to run the written file back.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bdscan.atomic import atomic_write_bytes
from bdscan.errors import BdscanError, ModelLoadError, first_line
from bdscan.io.base import (
    LoadedModel,
    LoadOptions,
    Readback,
    guarded,
    one_line,
    register_loader,
    register_writer,
    sha256_file,
)
from bdscan.io.selfdescribing import bdscan_meta, describe, net_outputs, parse_meta
from bdscan.models.grid import find_token_grid
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

# onnx is imported inside the functions that use it: importing it is slow and most scans load no ONNX file.
# tests/io/test_io_formats.py checks that bdscan.io does not import it.
if TYPE_CHECKING:
    import onnx

#: max |logit difference| allowed between the converted module and onnxruntime
PARITY_TOL = 1e-3
PARITY_SAMPLES = 4
META_PREFIX = "bdscan."
_SAFE = re.compile(r"[^0-9A-Za-z_]")


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    import onnx
    out = [graph]
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    out += _graphs(g)
    return out


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    import onnx
    out: list[onnx.TensorProto] = []
    for g in _graphs(model.graph):
        out += list(g.initializer)
        out += [s.values for s in g.sparse_initializer]
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out.append(a.t)
                elif a.type == onnx.AttributeProto.TENSORS:
                    out += list(a.tensors)
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    out.append(a.sparse_tensor.values)
    return out


def check_external_data(model: onnx.ModelProto, path: Path) -> bool:
    """Refuses external-data locations outside the model's folder; True when the model has external data."""
    from onnx import TensorProto
    base = path.parent.resolve()
    found = False
    for t in _tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        found = True
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        parts = re.split(r"[\\/]+", loc)
        outside = (
            not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", loc) is not None
            or ".." in parts or "\x00" in loc
        )
        target = (base / loc).resolve() if not outside else None
        if target is not None and base not in target.parents:
            outside = True
        if outside:
            raise ModelLoadError(
                f"{one_line(path.name)}: tensor {one_line(t.name, 60)!r} keeps its data at {one_line(loc, 80)!r}, "
                "outside the model's folder",
                "external data must sit next to the .onnx file; a model pointing elsewhere is corrupt or hostile",
            )
        if target is None or not target.is_file():
            raise ModelLoadError(f"{one_line(path.name)}: external data file {one_line(loc, 80)!r} is missing",
                                 "copy the model's data files next to it")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        except ValueError as e:
            raise ModelLoadError(f"{one_line(path.name)}: malformed external data entry", "the model is corrupt") from e
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ModelLoadError(f"{one_line(path.name)}: external data of {one_line(t.name, 60)!r} lies beyond the end "
                                 f"of {one_line(loc, 80)!r}", "the data file is truncated or corrupt")
    return found


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """``domain::OpType`` of the nodes onnx2torch has no converter for, sorted."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    bad: set[str] = set()
    for node in model.graph.node:
        domain = node.domain or ""
        label = f"{domain + '::' if domain else ''}{node.op_type}"
        if domain not in opsets:
            bad.add(label)
            continue
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=opsets[domain])
        except NotImplementedError:
            bad.add(f"{label} (opset {opsets[domain]})")
    return sorted(bad)


def prepare_for_conversion(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with safe node names and Constant/Identity-of-initializer nodes turned into initializers."""
    import onnx
    m = copy.deepcopy(model)
    g = m.graph
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        out = node.output[0] if len(node.output) == 1 else None
        if out and out not in outputs and node.op_type == "Identity" and node.input and node.input[0] in inits:
            t = copy.deepcopy(inits[node.input[0]])
            t.name = out
            g.initializer.append(t)
            inits[out] = t
        elif (out and out not in outputs and node.op_type == "Constant" and len(node.attribute) == 1
              and node.attribute[0].name == "value" and node.attribute[0].type == onnx.AttributeProto.TENSOR):
            t = copy.deepcopy(node.attribute[0].t)
            t.name = out
            g.initializer.append(t)
            inits[out] = t
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    for i, node in enumerate(g.node):
        node.name = f"n{i}_{_SAFE.sub('_', node.op_type)[:40]}"
    return m


def _image_input(model: onnx.ModelProto, path: Path) -> tuple[str, int | None, tuple[int, int, int] | None]:
    from onnx import TensorProto
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelLoadError(f"{one_line(path.name)}: the ONNX graph has {len(inputs)} inputs; bdscan needs one image input",
                             "export the classifier with a single (N, C, H, W) input")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT:
        raise ModelLoadError(
            f"{one_line(path.name)}: the ONNX input is {TensorProto.DataType.Name(tt.elem_type)}, not float32",
            "export the model with a float32 image input",
        )
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if tt.HasField("shape") and len(dims) != 4:
        raise ModelLoadError(f"{one_line(path.name)}: the ONNX input has {len(dims)} dimensions, expected (N, C, H, W)",
                             "export the model with an image input of shape (N, C, H, W)")
    if len(dims) != 4:
        return inp.name, None, None
    chw = tuple(dims[1:]) if all(d is not None for d in dims[1:]) else None
    return inp.name, dims[0], chw  # type: ignore[return-value]


def read_meta(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for p in model.metadata_props:
        if isinstance(p.key, bytes) or isinstance(p.value, bytes):  # protobuf hands back bytes for non-UTF-8 strings
            raise ModelLoadError(f"{one_line(path.name)}: its metadata is not valid UTF-8", "the file is corrupt; re-export it")
        if p.key.startswith(META_PREFIX):
            try:
                raw[p.key[len(META_PREFIX) :]] = json.loads(p.value)
            except json.JSONDecodeError:
                raw[p.key[len(META_PREFIX) :]] = p.value
    return parse_meta(raw, path) if raw else {}


def ort_session(model: onnx.ModelProto | bytes) -> Any:
    """A CPU onnxruntime session for ``model`` with torch's thread count; used by loading and by export checks."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # fatal only: a failing kernel raises anyway, its log line would only add to stderr
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def _ort_run(sess: Any, name: str, x: np.ndarray, batch: int | None) -> np.ndarray:
    if not batch:
        return np.asarray(sess.run(None, {name: x})[0])
    n = x.shape[0]
    pad = (-n) % batch
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    outs = [np.asarray(sess.run(None, {name: x[i : i + batch]})[0]) for i in range(0, x.shape[0], batch)]
    return np.concatenate(outs)[:n]


def check_parity(net: nn.Module, model: onnx.ModelProto, input_name: str, input_size: tuple[int, int, int],
                 batch: int | None, path: Path) -> float:
    """Max |difference| between ``net`` and onnxruntime on 4 random inputs; raises above :data:`PARITY_TOL`."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand((PARITY_SAMPLES, *input_size), generator=g)
    sess = guarded("ONNX", path, lambda: ort_session(model))
    ref = guarded("ONNX", path, lambda: _ort_run(sess, input_name, x.numpy(), batch))
    with torch.no_grad():
        out = net(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    got = out.detach().cpu().numpy()
    if ref.shape != got.shape:
        raise ModelLoadError(
            f"{one_line(path.name)}: the converted model returns {got.shape}, onnxruntime {ref.shape}",
            "the ONNX model uses an operator onnx2torch converts wrongly; export TorchScript or torch.export instead",
        )
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    if not np.isfinite(diff) or diff > PARITY_TOL:
        raise ModelLoadError(
            f"{one_line(path.name)}: the converted model differs from onnxruntime by {diff:.3g} (max |logit difference| "
            f"on {PARITY_SAMPLES} random inputs, tolerance {PARITY_TOL:g})",
            "onnx2torch converts one of its operators wrongly; export TorchScript or torch.export instead",
        )
    return diff


@register_loader
class OnnxLoader:
    """Loads ``.onnx`` files into differentiable torch modules (see the module docstring)."""

    name = "onnx"
    suffixes = (".onnx",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.suffix.lower() == ".onnx":
            return True
        if path.suffix.lower() in (".safetensors", ".pt", ".pth", ".pt2", ".bin", ".ckpt", ".pkl") or head[8:9] == b"{":
            return False
        # ModelProto starts with ir_version (field 1, varint), then producer/graph/opset fields
        return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 20 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x3A, 0x42)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        import onnx
        model = guarded("ONNX", path, lambda: onnx.load(str(path), load_external_data=False))
        if check_external_data(model, path):
            guarded("ONNX", path, lambda: onnx.load_external_data_for_model(model, str(path.parent)))
        guarded("ONNX", path, lambda: onnx.checker.check_model(model))
        input_name, batch, chw = _image_input(model, path)
        bad = unsupported_ops(model)
        if bad:
            raise ModelLoadError(
                f"{one_line(path.name)}: onnx2torch cannot convert these ONNX operators: {one_line(', '.join(bad))}",
                "export the model as TorchScript or torch.export (.pt2) instead, or re-export ONNX with other operators",
            )
        from onnx2torch import convert

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = convert(prepare_for_conversion(model))
        except Exception as e:
            raise ModelLoadError(
                f"{one_line(path.name)}: onnx2torch cannot convert it: {one_line(first_line(e))}",
                "export the model as TorchScript or torch.export (.pt2) instead",
            ) from e
        meta = read_meta(model, path)
        notes: list[str] = []
        wrapper = describe(net, "onnx", path, options, meta, notes, declared_input=chw, static_batch=batch,
                           grid_fn=find_token_grid)
        diff = check_parity(wrapper.net, model, input_name, wrapper.input_size, batch, path)
        notes.append(f"converted with onnx2torch; max |logit difference| to onnxruntime {diff:.2g}")
        return LoadedModel(wrapper, self.name, path, sha256_file(path), None, None, notes)


def export_onnx(wrapper: ModelWrapper, path: str | Path, opset: int = 17, extra: dict[str, Any] | None = None) -> None:
    """Writes ``wrapper.net`` (normalised input, see the module docstring) as ONNX, atomically.

    Args:
        wrapper: the model.
        path: the output file.
        opset: the ONNX opset to export to.
        extra: JSON-serialisable records added to the metadata (each as ``bdscan.<key>``).

    Raises:
        BdscanError: the network cannot be exported.
    """
    import onnx
    p = Path(path)
    net = wrapper.net
    was_training = net.training
    net.eval()
    dummy = torch.zeros((1, *wrapper.input_size))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (dummy,), buf, opset_version=opset, dynamo=False, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
            )
    except Exception as e:
        raise BdscanError(f"cannot export {wrapper.info.arch} to ONNX: {first_line(e)}",
                          "export TorchScript or torch.export instead") from e
    finally:
        net.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    meta = bdscan_meta(wrapper)
    meta["input"] = "normalised"
    meta.update(extra or {})
    for k, v in meta.items():
        prop = model.metadata_props.add()
        prop.key = META_PREFIX + k
        prop.value = json.dumps(v)
    atomic_write_bytes(p, model.SerializeToString())


@register_writer
class OnnxWriter:
    """Writes the raw network as ONNX (:func:`export_onnx`) and runs it back with onnxruntime."""

    name = "onnx"
    title = "ONNX"
    suffixes = (".onnx",)

    def write(
        self, wrapper: ModelWrapper, path: Path, extra: dict[str, Any] | None = None, trigger: Trigger | None = None
    ) -> None:
        """:func:`export_onnx` with ``extra`` in the metadata; ``trigger`` is not stored."""
        export_onnx(wrapper, path, extra=extra)

    def read_back(self, path: Path, wrapper: ModelWrapper, x: torch.Tensor) -> Readback:
        """Runs the written file with onnxruntime on ``x`` normalised as ``wrapper`` normalises."""
        with torch.no_grad():
            xn = wrapper.normalise(x).float().cpu().numpy()
        try:
            sess = ort_session(Path(path).read_bytes())
            got = np.asarray(sess.run(None, {sess.get_inputs()[0].name: xn})[0])
        except Exception as e:
            raise ModelLoadError(f"onnxruntime cannot run the exported model: {first_line(e)}") from e
        return Readback(got, net_outputs(wrapper, x))
