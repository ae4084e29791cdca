"""Static pickle scan: which imports a pickle-based checkpoint asks for, found without unpickling it.

The scan disassembles every pickle stream with `picklescan <https://github.com/mmaitre314/picklescan>`_
(``pickletools.genops``, nothing is executed) and judges each ``module.name`` import twice:

1. picklescan's own lists: its denylist (os/posix/nt/subprocess/sys, builtins.eval/exec/getattr/compile/open,
   runpy, pty, socket, shutil, webbrowser, pickle/_pickle, functools.partial, operator.attrgetter/
   itemgetter/methodcaller, numpy.f2py, numpy.testing._private.utils, torch.serialization.load,
   torch._inductor.codecache.compile_file, pip, pydoc, pkgutil.resolve_name, ...) -> "dangerous";
   its allowlist (tensor rebuilds, storages, OrderedDict) -> clean; anything else -> "suspicious".
2. bdscan's extra denylist (:data:`EXTRA_DENY`, :data:`ALLOW_ONLY`, :data:`DANGEROUS_SEGMENTS`), for
   gadgets that picklescan 1.0.5 only calls "suspicious" or misses, learnt from its advisories and issue
   tracker (GHSA-vvpj-8cmc-gx39 ``pkgutil.resolve_name``, issue #66 importlib/attribute chains, PR #74
   importlib/marshal, PR #69 mailcap.findmatch) and from reading torch's own loaders:

   * ``builtins``/``__builtin__``: picklescan flags eval/exec/getattr/compile/open/apply/breakpoint only;
     ``__import__``, ``setattr``, ``globals``, ``vars``, ``input``, ``type``... are equally useful to an
     attacker, so only plain data types are allowed (``set``, ``list``, ``dict``, ``slice``, ``bytes``...).
   * whole modules instead of single names where picklescan lists one function: ``operator``/
     ``_operator`` (``operator.call``), ``functools`` (``reduce``, ``partialmethod``), ``types``
     (``FunctionType``), ``copyreg`` except the reconstructors (``copyreg.add_extension`` makes EXT
     opcodes resolve to any import the scan cannot see), ``codecs`` except ``encode``, ``logging``
     (``logging.config`` evaluates strings).
   * module families picklescan does not list: ``importlib``, ``imp``, ``zipimport``, ``marshal``,
     ``_posixsubprocess``, ``_ctypes``, ``multiprocessing``, ``threading``/``_thread``, ``signal``,
     ``platform``, ``code``/``codeop``, ``io``/``_io``/``pathlib``/``tempfile``/``fileinput`` (file writes:
     ``pathlib.Path.write_text``), archives (``zipfile``, ``tarfile``, ``gzip``...), network clients
     (``http``, ``urllib``, ``ftplib``, ``smtplib``, ...), ``mailcap``, ``inspect``, ``gc``, ``atexit``,
     ``unittest`` (``mock._importer``), ``site``, ``setuptools``/``distutils``/``pkg_resources``, other
     serialisers (``dill``, ``cloudpickle``, ``joblib``, ``shelve``, ``yaml``, ``pandas.read_pickle``).
   * torch: ``torch.hub`` (``torch.hub.load(..., source="local")`` runs a hubconf.py), ``torch.load``/
     ``torch.save``/``torch.from_file``, the whole ``torch.serialization``, ``torch._inductor``,
     ``torch._dynamo``, ``torch.jit``, ``torch.fx`` (GraphModule's reducer execs Python source),
     ``torch.package``, ``torch.utils.cpp_extension`` (``load_inline`` compiles and loads C++),
     ``torch.utils.benchmark`` (``Timer`` execs statements), ``torch.storage._load_from_bytes`` (a
     nested ``torch.load(weights_only=False)``), ``torch._utils`` except the ``_rebuild_*`` helpers
     (``_import_dotted_name`` imports anything), ``torch._C``, ``torch.ops``/``torch.library``,
     ``torch.distributed``, ``torch.multiprocessing``, ``torch.testing``.
   * numpy: ``numpy.load`` and ``numpy.lib.format`` (``allow_pickle``), ``numpy.distutils``
     (``exec_command``), ``numpy.ctypeslib``, ``numpy.testing``, ``numpy.memmap`` and ``numpy.save*``.
   * model-zoo code that downloads or loads other files: ``timm.create_model``, ``timm.models._hub``/
     ``_builder``/``_helpers``, and bdscan's own I/O (``bdscan.atomic`` writes files).
   * attribute chains: with protocol >= 4 ``find_class`` follows dotted names, so ``torch`` +
     ``"os.system"`` reaches ``os.system`` (torch imports os) and ``six.moves.builtins`` + ``"eval"``
     reaches eval; any *segment* named like a dangerous module (``os``, ``sys``, ``builtins``,
     ``subprocess``, ``pickle``, ``importlib``...) or any dunder segment (``__globals__``,
     ``__builtins__``, ``__import__``...) is dangerous.

   The extra check also walks the opcodes itself and treats ``EXT1``/``EXT2``/``EXT4`` (imports through
   the copyreg extension registry, invisible to a name scan) as dangerous.

Containers: a file starting with ``PK\\x03\\x04`` is a zip archive (``torch.save``, TorchScript,
``torch.export``); every member is read through picklescan's ``RelaxedZipFile`` (which, like torch's
reader, ignores CRCs and flag bits) by its central-directory entry, so duplicate names cannot hide a
member; members ending in ``.pkl`` or starting with a pickle ``PROTO`` opcode are scanned, nested zip
archives (``torch.export`` keeps ``torch.save`` archives inside) are scanned recursively, TorchScript
``code/`` is searched for file-touching operators (``aten::from_file``, ``aten::save``,
``debugprims::load_tensor``), and native libraries (``.so``/``.dll``/``.dylib``, AOTInductor packages)
are dangerous. Any other file is read as torch's legacy format: its first five pickles (magic number,
protocol, system info, object, storage keys: everything ``torch.load`` unpickles) are scanned; a file
that is *also* a zip archive (a polyglot) has both readings scanned. Tar archives (torch's oldest
format, which its legacy loader still tries on every non-zip file) are refused.

Scanner errors never raise: they land in :attr:`PickleScan.error`, which counts as dangerous.

Limits: a denylist cannot be complete. For weight files bdscan additionally loads with
``torch.load(weights_only=True)``, whose allowlist unpickler is the real barrier; the denylist is the only
barrier for ``--trust-pickle``, which is why that flag exists.
"""

from __future__ import annotations

import io
import logging
import pickletools
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO

from picklescan.relaxed_zipfile import RelaxedZipFile
from picklescan.scanner import SafetyLevel, scan_pickle_bytes

from bdscan.errors import ModelLoadError, UnsafeModelError, first_line
from bdscan.io.base import PickleFinding, PickleScan, one_line
from bdscan.io.zipfile_sniff import ZIP_MAGIC

log = logging.getLogger(__name__)
# picklescan logs every import it dislikes as a warning; bdscan reports the scan itself, once.
logging.getLogger("picklescan").setLevel(logging.CRITICAL)

_PICKLE_PROTOS = tuple(bytes([0x80, v]) for v in range(1, 6))
#: how deep nested zip archives are followed (torch.export keeps torch.save archives inside its own)
MAX_ZIP_DEPTH = 3
#: members of one archive; a model has a few thousand at most
MAX_MEMBERS = 200_000
#: torch's legacy format: magic number, protocol version, sys info, the object, storage keys
LEGACY_PICKLES = 5
#: TorchScript code is text; refuse to search more than this per member
MAX_CODE_BYTES = 64 * 1024 * 1024
#: a pickle member is read into memory to be scanned; real ones are a few MB (tensor data lives elsewhere)
MAX_PICKLE_BYTES = 1024 * 1024 * 1024

#: names allowed in modules where everything else is dangerous
ALLOW_ONLY: dict[str, frozenset[str]] = {
    "builtins": frozenset(
        {"set", "frozenset", "list", "dict", "tuple", "bytes", "bytearray", "int", "float", "complex", "bool", "str",
         "slice", "range", "object", "NoneType", "Ellipsis", "NotImplemented"}
    ),
    "copyreg": frozenset({"_reconstructor", "__newobj__", "__newobj_ex__"}),
    "_codecs": frozenset({"encode"}),
    "codecs": frozenset({"encode"}),
}
ALLOW_ONLY["__builtin__"] = ALLOW_ONLY["builtins"]
ALLOW_ONLY["copy_reg"] = ALLOW_ONLY["copyreg"]

#: dotted prefixes (a module, or ``module.name``) that are dangerous with everything under them
EXTRA_DENY: frozenset[str] = frozenset(
    {
        # code execution, imports, processes
        "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "runpy", "pty", "importlib", "imp",
        "zipimport", "pkgutil", "marshal", "types", "code", "codeop", "ctypes", "_ctypes", "cffi", "operator",
        "_operator", "functools", "multiprocessing", "_multiprocessing", "threading", "_thread", "signal",
        "platform", "asyncio", "selectors", "inspect", "gc", "atexit", "pdb", "bdb", "pydoc", "trace", "timeit",
        "profile", "cProfile", "unittest", "doctest", "test", "ensurepip", "pip", "setuptools", "distutils",
        "pkg_resources", "site", "venv", "idlelib", "lib2to3", "tkinter", "turtle", "readline", "rlcompleter",
        "antigravity", "webbrowser", "mailcap", "uuid", "_osx_support", "_aix_support", "_pyrepl", "IPython",
        "click", "typer", "jinja2", "logging", "builtins.__import__",
        # other serialisers (a pickle inside the pickle)
        "pickle", "_pickle", "shelve", "dbm", "dill", "cloudpickle", "joblib", "yaml", "pandas.read_pickle",
        "pandas.io", "copyreg", "copy_reg",
        # files and archives
        "io", "_io", "pathlib", "tempfile", "fileinput", "shutil", "zipfile", "tarfile", "gzip", "bz2", "lzma",
        "sqlite3", "glob", "linecache", "mmap",
        # network
        "socket", "_socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
        "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc", "socketserver", "fsspec", "huggingface_hub",
        # torch
        "torch.hub", "torch.load", "torch.save", "torch.from_file", "torch.serialization", "torch._inductor",
        "torch._dynamo", "torch.compile", "torch.compiler", "torch.jit", "torch._jit_internal", "torch.fx",
        "torch.package", "torch.utils.cpp_extension", "torch.utils.benchmark", "torch.utils.model_zoo",
        "torch.utils._config_module", "torch.utils.bottleneck", "torch.utils.collect_env", "torch.utils.data",
        "torch.storage._load_from_bytes", "torch._C", "torch.ops", "torch._ops", "torch.library", "torch._library",
        "torch._classes", "torch.classes", "torch.distributed", "torch.multiprocessing", "torch.testing",
        "torch.export", "torch._export", "torch.onnx", "torch._higher_order_ops",
        # numpy
        "numpy.load", "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.f2py",
        "numpy.distutils", "numpy.ctypeslib", "numpy.testing", "numpy.memmap", "numpy.core.memmap",
        "numpy._core.memmap", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
        "numpy.DataSource", "numpy.lib._datasource",
        # model zoos and our own file writers
        "timm.create_model", "timm.models.create_model", "timm.models._hub", "timm.models._builder",
        "timm.models._helpers", "timm.models._factory", "bdscan.io", "bdscan.cli", "bdscan.lab", "bdscan.report",
        "bdscan.data", "bdscan.detect", "bdscan.repair", "safetensors", "onnx", "onnxruntime", "onnx2torch",
        "matplotlib", "PIL.ImageShow", "PIL.ImageGrab", "PIL.EpsImagePlugin",
    }
)

#: a dotted path with one of these segments reaches a dangerous module through an attribute or alias
DANGEROUS_SEGMENTS: frozenset[str] = frozenset(
    {"os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "builtins", "__builtin__", "runpy", "pty",
     "socket", "shutil", "pickle", "_pickle", "marshal", "importlib", "ctypes", "_ctypes", "webbrowser",
     "multiprocessing", "pydoc", "pdb", "hub", "serialization"}
)

#: TorchScript operators that touch the file system (aten::from_file maps a file, shared=True writes it)
_TS_FILE_OPS = re.compile(r"\b(from_file|save|load_tensor|_load_for_lite_interpreter)\s*\(")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_STORAGE_RECORD = re.compile(r"(^|/)data/\d+$")


def scanner_name() -> str:
    try:
        v = version("picklescan")
    except PackageNotFoundError:  # pragma: no cover - picklescan is a dependency
        v = "?"
    return f"picklescan {v} + bdscan denylist"


def extra_verdict(module: str, name: str) -> str | None:
    """Why bdscan's extra denylist calls ``module.name`` dangerous, or None when it does not."""
    full = f"{module}.{name}"
    if module in ALLOW_ONLY:
        if name in ALLOW_ONLY[module]:
            return None
        return f"{module} allows only plain data types"
    if module == "torch.jit._pickle" and name.isidentifier():  # TorchScript's list builders (C++ maps them)
        return None
    if module == "torch._utils" and not name.startswith("_rebuild_"):
        return "torch._utils beyond the tensor rebuild helpers (e.g. _import_dotted_name)"
    for prefix in EXTRA_DENY:
        if full == prefix or full.startswith(prefix + ".") or module == prefix or module.startswith(prefix + "."):
            return f"{prefix} is on bdscan's denylist"
    for seg in module.split(".")[1:] + name.split("."):
        if seg.startswith("__") and seg.endswith("__") and len(seg) > 4:
            return f"attribute chain through {seg}"
        if seg in DANGEROUS_SEGMENTS:
            return f"attribute chain through the {seg} module"
    return None


@dataclass
class _State:
    files: int = 0
    findings: dict[tuple[str, str, str], PickleFinding] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, module: str, name: str, severity: str, location: str) -> None:
        key = (module, name, location)
        old = self.findings.get(key)
        if old is None or (old.severity != "dangerous" and severity == "dangerous"):
            self.findings[key] = PickleFinding(module, name, severity, location)

    def error(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)


def scan_pickles(path: str | Path) -> PickleScan:
    """Statically scans every pickle in ``path`` (a raw/legacy pickle file or a zip archive).

    Never executes the pickle and never raises: unreadable files come back with :attr:`PickleScan.error`.
    """
    p = Path(path)
    st = _State()
    try:
        with open(p, "rb") as f:
            _scan_file(f, p.name, st, depth=0)
    except Exception as e:  # the scanner must answer, whatever the file does to the parsers
        st.error(f"{p.name}: {first_line(e)}")
    findings = tuple(sorted(st.findings.values(), key=lambda f: (f.severity != "dangerous", f.location, f.ref)))
    error = "; ".join(st.errors[:3]) if st.errors else None
    return PickleScan(scanner_name(), st.files, findings, error)


def _scan_file(f: IO[bytes], loc: str, st: _State, depth: int) -> None:
    head = f.read(4)
    f.seek(0)
    if head.startswith(ZIP_MAGIC):
        _scan_zip(f, loc, st, depth)
        return
    if _is_tar(f):
        st.error(f"{loc}: a tar archive (torch's pre-1.6 format); bdscan does not read it")
        return
    _scan_legacy(f, loc, st)
    f.seek(0)
    try:
        polyglot = zipfile.is_zipfile(f)
    except Exception:
        polyglot = False
    f.seek(0)
    if polyglot:
        st.error(f"{loc}: the file is both a pickle and a zip archive (a polyglot)")
        _scan_zip(f, loc, st, depth)


def _is_tar(f: IO[bytes]) -> bool:
    """Whether torch's legacy loader would read ``f`` as a tar archive (it tries ``tarfile.open(mode="r:")``)."""
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except Exception:
        return False
    finally:
        f.seek(0)


def _expected(module: str, name: str) -> bool:
    """Imports every checkpoint of a kind has, not worth a "suspicious" line in a report."""
    if module in ALLOW_ONLY:
        return name in ALLOW_ONLY[module]
    # TorchScript's compiled classes and list builders (resolved by its C++ unpickler, never imported)
    return module.startswith("__torch__.") or module == "__torch__" or module == "torch.jit._pickle" or (
        module == "torch._utils" and name.startswith("_rebuild_")
    )


def _judge(result, loc: str, st: _State) -> None:  # result: picklescan ScanResult
    for g in result.globals:
        verdict = extra_verdict(g.module, g.name)
        if g.safety == SafetyLevel.Dangerous or verdict is not None:
            st.add(g.module, g.name, "dangerous", loc)
        elif g.safety == SafetyLevel.Suspicious and not _expected(g.module, g.name):
            st.add(g.module, g.name, "suspicious", loc)


def _scan_pickle_stream(data: bytes, loc: str, st: _State, *, strict_parse: bool) -> None:
    """Scans one pickle member (whole bytes): picklescan's globals plus bdscan's opcode checks."""
    st.files += 1
    result = scan_pickle_bytes(io.BytesIO(data), loc, multiple_pickles=True)
    _judge(result, loc, st)
    if result.scan_err:
        st.error(f"{loc}: the pickle is malformed after its imports")
    _opcode_checks(io.BytesIO(data), loc, st, strict_parse=strict_parse, multiple=True)


def _walk(f: IO[bytes], loc: str, st: _State) -> bool:
    """Walks one pickle's opcodes from the current position; flags EXT opcodes; True if it ends in STOP."""
    try:
        for op, _arg, _pos in pickletools.genops(f):
            if op.name in ("EXT1", "EXT2", "EXT4"):
                st.add("copyreg", f"extension registry ({op.name})", "dangerous", loc)
        return True
    except Exception:
        return False


def _opcode_checks(f: IO[bytes], loc: str, st: _State, *, strict_parse: bool, multiple: bool) -> None:
    while True:
        if not _walk(f, loc, st):
            if strict_parse:
                st.error(f"{loc}: not a valid pickle")
            return
        if not multiple or not f.read(1):
            return
        f.seek(-1, 1)


def _scan_legacy(f: IO[bytes], loc: str, st: _State) -> None:
    """torch's legacy (non-zip) format, or a plain pickle: the pickles at its start, in sequence."""
    st.files += 1
    for i in range(LEGACY_PICKLES):
        start = f.tell()
        if not f.read(1):
            return
        f.seek(start)
        ok = _walk(f, loc, st)
        end = f.tell()
        f.seek(start)
        result = scan_pickle_bytes(f, loc, multiple_pickles=False)
        _judge(result, loc, st)
        if result.scan_err:
            st.error(f"{loc}: pickle {i + 1} is malformed after its imports")
        if not ok:
            return
        f.seek(end)


def _scan_zip(f: IO[bytes], loc: str, st: _State, depth: int) -> None:
    if depth > MAX_ZIP_DEPTH:
        st.error(f"{loc}: zip archives nested more than {MAX_ZIP_DEPTH} deep")
        return
    try:
        z = RelaxedZipFile(f, "r")
    except Exception as e:
        st.error(f"{loc}: not a readable zip archive ({first_line(e)})")
        return
    with z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            st.error(f"{loc}: {len(infos)} archive members")
            return
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            st.error(f"{loc}: duplicate archive member {dup!r} (loaders and scanners could read different copies)")
        for info in infos:
            if info.is_dir():
                continue
            _scan_member(z, info, f"{loc}:{info.filename}", st, depth)


def _read_capped(z: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, loc: str) -> bytes:
    if info.file_size > cap:
        raise ValueError(f"member of {info.file_size} bytes")
    with z.open(info, "r") as m:
        data = m.read(cap + 1)
    if len(data) > cap:  # the directory lied about the size (a zip bomb)
        raise ValueError("member larger than its directory entry says")
    return data


def _scan_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, loc: str, st: _State, depth: int) -> None:
    name = info.filename
    low = name.lower()
    if low.endswith(_NATIVE_SUFFIXES) or "/aotinductor/" in low or low.startswith("aotinductor/"):
        st.add("<native code>", name.rsplit("/", 1)[-1], "dangerous", loc)
        return
    try:
        with z.open(info, "r") as m:
            head = m.read(8)
        if "/code/" in name and low.endswith(".py"):
            text = _read_capped(z, info, MAX_CODE_BYTES, loc).decode("utf-8", "replace")
            for hit in sorted(set(_TS_FILE_OPS.findall(text))):
                st.add("torchscript", hit, "dangerous", loc)
            return
        is_pkl = low.endswith(".pkl")
        if head.startswith(ZIP_MAGIC) and not _STORAGE_RECORD.search(name):
            with z.open(info, "r") as m:  # seekable view: nested archives are not copied into memory
                _scan_zip(m, loc, st, depth + 1)
        elif is_pkl or (head.startswith(_PICKLE_PROTOS) and not _STORAGE_RECORD.search(name)):
            _scan_pickle_stream(_read_capped(z, info, MAX_PICKLE_BYTES, loc), loc, st, strict_parse=is_pkl)
    except Exception as e:
        st.error(f"{loc}: cannot read the member ({first_line(e)})")


def refs(scan: PickleScan, severity: str = "dangerous") -> list[str]:
    """``module.name`` of the findings with ``severity``, de-duplicated, in order."""
    out: list[str] = []
    for f in scan.findings:
        if f.severity == severity and f.ref not in out:
            out.append(f.ref)
    return out


def refuse_if_unsafe(path: Path, scan: PickleScan, fmt: str, loader: str) -> None:
    """Raises when the scan found a dangerous import (:class:`UnsafeModelError`) or could not finish.

    A scan that could not finish (corrupt archive, malformed pickle) is refused with a
    :class:`ModelLoadError`: the file was not unpickled, and it is damaged or built to confuse scanners.
    ``fmt`` names the format in words for the message, ``loader`` is the refusing loader's name (reports).
    """
    bad = refs(scan)
    if bad:
        shown = one_line(", ".join(bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UnsafeModelError(
            f"{one_line(path.name)}: the static pickle scan found dangerous imports: {shown}; the file was not loaded",
            findings=bad,
            hint="do not load this file; ask its publisher for a .safetensors export",
            fmt=loader, scanner=scanner_name(),
        )
    if scan.error is not None:
        raise ModelLoadError(
            f"{one_line(path.name)}: cannot read it as {fmt}: the pickle scan could not finish ({one_line(scan.error)})",
            "the file is truncated, corrupt or built to confuse scanners; it was not unpickled",
        )
