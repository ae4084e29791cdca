"""``torch.export`` programs (``.pt2`` from ``torch.export.save``).

What ``torch.export.load`` (torch 2.14, ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``) does with a file, and what bdscan does about each step:

* weights: raw tensor records, or ``torch.save`` archives nested in the zip when a weight's config says
  ``use_pickle``; those are read with ``torch.load(..., weights_only=False)``. Sample inputs (and the
  legacy weights/constants files) go through ``deserialize_torch_artifact``, which tries
  ``weights_only=True`` and *falls back to* ``weights_only=False``. "Opaque" constants are read with plain
  ``pickle.loads``. -> every pickle, at any zip nesting depth, is scanned first
  (:func:`~bdscan.io.picklescan_io.scan_pickles`); then, during loading, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
  forces every ``torch.load`` to the weights-only unpickler and the archive reader's ``pickle.loads`` is
  replaced by torch's weights-only unpickler too.
* AOTInductor packages (``data/aotinductor/``) are compiled native libraries that get ``dlopen``-ed. ->
  refused (the scan reports native code).
* the program (``models/<name>.json``) is JSON, but: symbolic expressions (``expr_str``) go to
  ``sympy.sympify``, which calls ``eval``; node targets are resolved with ``getattr`` chains from the
  ``torch``, ``operator`` and ``math`` modules (``"torch.os.system"`` would resolve); ``guards_code``
  strings are pasted into Python source and ``exec``-ed by ``.module()``; node and argument names become
  identifiers in the Python code FX generates. -> before loading, the JSON is validated
  (:func:`validate_program`): targets must be ATen/prims operators (file-touching ones excluded) or
  a short list of ``operator``/``math``/``torch.sym_*`` functions; expressions and guards must parse to
  a small arithmetic grammar (no attributes beyond ``size``/``stride``, no calls beyond sympy's
  arithmetic functions, no dunders); names must be identifiers and module paths dotted identifiers; no
  string may contain a carriage return, or a line break outside stack traces.

Then ``ep.module()`` gives an ``nn.Module`` (gradients flow; its graph was fixed at export, so it is
wrapped so that ``.eval()`` is a no-op instead of an error). Model information is inferred like every
self-describing format's (:func:`bdscan.io.selfdescribing.describe`): the declared input shape and a static
batch size come from the exported input placeholder, the token grid from the first ``aten.conv2d``/
``aten.convolution`` node (kernel == stride > 1, no padding).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from picklescan.relaxed_zipfile import RelaxedZipFile
from torch import nn

from bdscan.errors import ModelLoadError, UnsafeModelError
from bdscan.io.base import LoadedModel, LoadOptions, guarded, one_line, register_loader, sha256_file
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.selfdescribing import META_FILE, conv_grid, describe, parse_meta
from bdscan.io.zipfile_sniff import ZIP_MAGIC, torch_zip_kind, zip_names
from bdscan.models.wrapper import TokenGrid

#: the JSON program is read into memory; refuse absurd sizes first
MAX_PROGRAM_BYTES = 512 * 1024 * 1024

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_OP_TARGET = re.compile(r"^torch\.ops\.(aten|prims)\.([A-Za-z0-9_]+)(\.[A-Za-z0-9_]+)?$")
#: ATen operators that touch files (from_file maps one, shared=True writes it)
_DENIED_OPS = frozenset({"from_file", "save", "load", "_load_for_lite_interpreter"})
_PY_TARGETS = frozenset(
    {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "eq",
                                "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")}
    | {f"math.{n}" for n in ("ceil", "floor", "sqrt", "trunc")}
    | {f"torch.{n}" for n in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "_sym_sqrt")}
)
#: names an expression or guard may use (sympy arithmetic, torch's sympy functions, guard helpers)
_EXPR_NAMES = frozenset(
    {"Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
     "Not", "Mod", "Pow", "Mul", "Add", "floor", "ceiling", "sqrt", "Piecewise", "oo", "zoo", "nan", "pi", "E", "True",
     "False", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
     "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
     "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and",
     "BitwiseFn_bitwise_or", "L", "math", "inf", "isnan"}
)
_SYMBOL = re.compile(r"^[a-z]{1,6}\d+$")
_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "isnan"})
_EXPR_KWARGS = frozenset({"positive", "integer", "real", "nonnegative", "finite", "negative", "nonzero"})
_AST_OK = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Constant, ast.Name, ast.Load, ast.Call,
    ast.keyword, ast.Subscript, ast.Attribute, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)


def _check_expr(text: str, *, guard: bool) -> str | None:
    """None when ``text`` is plain symbolic arithmetic, else why not."""
    if len(text) > 10_000 or "__" in text or "\n" in text or "\r" in text:
        return "unexpected characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return "not an expression"
    for node in ast.walk(tree):
        if not isinstance(node, _AST_OK):
            return f"{type(node).__name__} is not allowed"
        if isinstance(node, ast.Name) and node.id not in _EXPR_NAMES and not _SYMBOL.match(node.id):
            return f"name {node.id!r} is not allowed"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _IDENT.match(node.value):
            return "string constant is not an identifier"
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            return "constant type is not allowed"
        if isinstance(node, ast.Attribute) and not (guard and node.attr in _GUARD_ATTRS):
            return f"attribute {node.attr!r} is not allowed"
        if isinstance(node, ast.Subscript) and not guard:
            return "subscripts are not allowed"
        if isinstance(node, ast.keyword) and node.arg not in _EXPR_KWARGS:
            return f"keyword {node.arg!r} is not allowed"
        if isinstance(node, ast.Call):
            f = node.func
            ok = (isinstance(f, ast.Name) and f.id in _EXPR_NAMES) or (
                guard and isinstance(f, ast.Attribute) and f.attr in _GUARD_ATTRS
            )
            if not ok:
                return "call is not allowed"
    return None


def _check_target(target: str) -> str | None:
    m = _OP_TARGET.match(target)
    if m:
        return f"operator {m.group(2)} touches files" if m.group(2) in _DENIED_OPS else None
    if target in _PY_TARGETS:
        return None
    return "not an ATen operator"


def validate_program(program: Any) -> list[str]:
    """Problems that make a serialised ExportedProgram unsafe to deserialise (see the module doc); [] if none."""
    problems: list[str] = []
    if not isinstance(program, dict):
        return ["the program is not a JSON object"]
    stack: list[tuple[Any, str | None, bool]] = [(program, None, False)]
    while stack and len(problems) < 20:
        value, key, in_meta = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("target"), str) and "inputs" in value and not in_meta:
                why = _check_target(value["target"])
                if why:
                    problems.append(f"node target {one_line(value['target'], 80)} ({why})")
            for k, v in value.items():
                stack.append((v, k, in_meta or k == "metadata"))
        elif isinstance(value, list):
            stack.extend((v, key, in_meta) for v in value)
        elif isinstance(value, str):
            if "\r" in value or ("\n" in value and key != "stack_trace"):
                problems.append(f"line break in {key!r}")
            elif in_meta:
                continue
            elif key in ("name", "as_name", "forward_arg_names") and not _IDENT.match(value):
                problems.append(f"{key} {one_line(value, 60)!r} is not an identifier")
            elif key is not None and (key.endswith("_name") or key == "fqn") and value and (
                not _FQN.match(value) or any(s.startswith("__") for s in value.split("."))
            ):
                problems.append(f"{key} {one_line(value, 60)!r} is not a module path")
            elif key == "expr_str":
                why = _check_expr(value, guard=False)
                if why:
                    problems.append(f"symbolic expression {one_line(value, 60)!r} ({why})")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        problems.append("guards_code is not a list")
    else:
        for g in guards:
            why = _check_expr(g, guard=True) if isinstance(g, str) else "not a string"
            if why:
                problems.append(f"guard {one_line(str(g), 60)!r} ({why})")
    rc = program.get("range_constraints") or {}
    if isinstance(rc, dict) and any(not _SYMBOL.match(str(k)) for k in rc):
        problems.append("range constraint on something that is not a symbol")
    return problems


def _program_members(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with open(path, "rb") as f, RelaxedZipFile(f, "r") as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            is_model = len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json")
            if is_model or info.filename == "serialized_exported_program.json":
                if info.file_size > MAX_PROGRAM_BYTES:
                    raise ModelLoadError(f"{path.name}: the exported program is {info.file_size} bytes",
                                         "the file is corrupt or hostile")
                with z.open(info) as m:
                    out[info.filename] = m.read(MAX_PROGRAM_BYTES + 1)
    return out


def check_programs(path: Path) -> None:
    """Validates every serialised program in the archive; raises UnsafeModelError or ModelLoadError."""
    members = guarded("torch.export", path, lambda: _program_members(path))
    if not members:
        raise ModelLoadError(f"{path.name}: no exported program (models/*.json) in the archive",
                             "save the program with torch.export.save")
    for name, raw in members.items():
        program = guarded("torch.export", path, lambda raw=raw: json.loads(raw))
        problems = validate_program(program)
        if problems:
            raise UnsafeModelError(
                f"{one_line(path.name)}: the exported program {one_line(name, 80)} holds code bdscan will not run: "
                f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                findings=problems,
                hint="do not load this file; re-export the model with torch.export.save from a trusted source",
                fmt="torch-export", scanner="bdscan exported-program validator",
            )


class _LogCatcher(logging.Filter):
    """Drops a logger's records, keeping the exceptions they carry."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
        return False


class _WeightsOnlyPickle:
    """Stands in for the ``pickle`` module inside torch's archive reader: weights-only ``loads``."""

    @staticmethod
    def loads(data: bytes, **_: Any) -> Any:
        from torch._weights_only_unpickler import Unpickler

        return Unpickler(io.BytesIO(data), encoding="utf-8").load()


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Forces weights-only unpickling for everything ``torch.export.load`` unpickles (process-wide, briefly)."""
    from torch.export.pt2_archive import _package

    with _ENV_LOCK:
        yield from _forced(_package)


def _forced(_package: Any) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    old_pickle = getattr(_package, "pickle", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    _package.pickle = _WeightsOnlyPickle  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _package.pickle = old_pickle  # type: ignore[attr-defined]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ExportedModule(nn.Module):
    """An ``ep.module()`` whose mode is fixed by its graph: ``train()``/``eval()`` do not reach it."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.gm(x)


def fx_token_grid(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    """Token grid from the first convolution node of an FX graph (exported or converted models)."""
    gm = getattr(net, "gm", net)
    graph = getattr(gm, "graph", None)
    if graph is None:
        return None
    convs = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default, torch.ops.aten._convolution.default}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in convs:
            continue
        args = list(node.args)
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        weight = _attr(gm, w.target) if getattr(w, "op", None) == "get_attr" else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            return None
        stride = args[3] if len(args) > 3 else node.kwargs.get("stride", 1)
        padding = args[4] if len(args) > 4 else node.kwargs.get("padding", 0)
        return conv_grid(tuple(weight.shape[-2:]), stride, padding, input_size, "exported graph")
    return None


def _attr(mod: nn.Module, target: str) -> Any:
    obj: Any = mod
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _input_shape(ep: Any) -> tuple[int | None, tuple[int, int, int] | None]:
    """(static batch or None, declared (C, H, W) or None) of the program's single image input."""
    try:
        names = list(ep.graph_signature.user_inputs)
        if len(names) != 1:
            return None, None
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == names[0])
        shape = list(node.meta["val"].shape)
    except Exception:
        return None, None
    if len(shape) != 4:
        return None, None
    batch = shape[0] if isinstance(shape[0], int) else None
    chw = tuple(shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else None
    return batch, chw  # type: ignore[return-value]


@register_loader
class TorchExportLoader:
    """Loads ``torch.export`` programs after scanning pickles and validating the program (see module doc)."""

    name = "torch-export"
    suffixes = (".pt2",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if not head.startswith(ZIP_MAGIC):
            return False
        names = zip_names(path)
        kind = torch_zip_kind(names) if names is not None else None
        return kind == "torch-export" or (kind is None and path.suffix.lower() == ".pt2")

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        scan = scan_pickles(path)
        refuse_if_unsafe(path, scan, "a torch.export program", "torch-export")
        check_programs(path)
        extra: dict[str, Any] = {META_FILE: ""}

        def _load() -> Any:
            # torch.export.load logs a damaged archive's traceback and raises "check the warnings above":
            # keep the log off stderr and raise its error instead
            caught = _LogCatcher()
            logging.getLogger("torch.export").addFilter(caught)
            try:
                with warnings.catch_warnings(), weights_only_unpickling():
                    warnings.simplefilter("ignore")
                    return torch.export.load(str(path), extra_files=extra)
            except RuntimeError as e:
                if caught.errors:
                    raise caught.errors[-1] from e
                raise
            finally:
                logging.getLogger("torch.export").removeFilter(caught)

        ep = guarded("torch.export", path, _load)
        if not hasattr(ep, "module"):
            raise ModelLoadError(f"{path.name}: the archive holds no exported program", "save it with torch.export.save")
        meta = parse_meta(extra.get(META_FILE), path)
        batch, chw = _input_shape(ep)

        def _module() -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ExportedModule(ep.module())

        net = guarded("torch.export", path, _module)
        notes: list[str] = []
        wrapper = describe(net, "torch-export", path, options, meta, notes, declared_input=chw, static_batch=batch,
                           grid_fn=fx_token_grid)
        return LoadedModel(wrapper, self.name, path, sha256_file(path), scan, None, notes)
