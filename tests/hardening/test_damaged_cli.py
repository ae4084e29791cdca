"""Damaged and lying checkpoints through the command line: exit 3 with one line, never a traceback or exit 4.

Loader-level twins live in tests/io/test_io_corrupt.py; here the whole CLI path runs (``inspect`` and a tiny
``scan``), including the output formatting a damaged file might break.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.hardening.clirun import TINY_SCAN, bdscan, bdscan_process, lines, no_crash, one_line
from tests.io import helpers as h
from tests.io.helpers import Checkpoints
from tests.io.test_io_corrupt import _safetensors
from tests.io.test_io_formats import external_data_outside

# ----------------------------------------------------------------------------------------------------------
# lying safetensors headers, ONNX external data outside the model's folder


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict, body: bytes, declared: int | None = None) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if declared is None else declared) + hb + body


def _lies(src: Path) -> dict[str, bytes]:
    header, body = _header(src)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, last = names[0], names[-1]
    big = next(k for k in names if header[k]["shape"])  # not a 0-d tensor, whose shape cannot lie by doubling

    def edit(fn) -> bytes:  # type: ignore[no-untyped-def]
        hd = json.loads(json.dumps(header))
        fn(hd)
        return _with_header(hd, body)

    def past_end(hd: dict) -> None:
        hd[last]["data_offsets"] = [len(body) + 64, len(body) + 64 + 4 * 128]

    def overlap(hd: dict) -> None:
        hd[names[1]]["data_offsets"] = list(hd[first]["data_offsets"])
        hd[names[1]]["shape"] = list(hd[first]["shape"])
        hd[names[1]]["dtype"] = hd[first]["dtype"]

    def shape_lies(hd: dict) -> None:
        hd[big]["shape"] = [s * 2 for s in hd[big]["shape"]]

    def size_lies(hd: dict) -> None:
        a, b = hd[big]["data_offsets"]
        hd[big]["data_offsets"] = [a, b + 4]

    return {
        "offsets past the end": edit(past_end),
        "overlapping tensors": edit(overlap),
        "shape larger than its bytes": edit(shape_lies),
        "size off by 4 bytes": edit(size_lies),
        "huge declared header (2**63)": _with_header(header, body, declared=1 << 63),
        "huge declared header (1 TiB)": _with_header(header, body, declared=1 << 40),
        "declared header past the end": _with_header(header, body, declared=len(body) + 10_000),
        "declared header too short": _with_header(header, body, declared=10),
        "synthetic: data beyond the end": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
        "synthetic: 2**40 elements": _safetensors({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}},
                                                  b"\0" * 16),
        "synthetic: reversed offsets": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, b"\0" * 16),
    }


LIE_NAMES = [
    "offsets past the end", "overlapping tensors", "shape larger than its bytes", "size off by 4 bytes",
    "huge declared header (2**63)", "huge declared header (1 TiB)", "declared header past the end",
    "declared header too short", "synthetic: data beyond the end", "synthetic: 2**40 elements", "synthetic: reversed offsets",
]


@pytest.mark.parametrize("lie", LIE_NAMES)
def test_lying_safetensors_header_exit_3(ckpts: Checkpoints, npz4: Path, tmp_path: Path, lie: str) -> None:
    f = tmp_path / "lies.safetensors"
    f.write_bytes(_lies(ckpts.files["safetensors"])[lie])
    t = time.monotonic()
    one_line(bdscan("inspect", f), 3)
    one_line(bdscan("scan", f, "--data", npz4, *TINY_SCAN, "--json", tmp_path / "s.json"), 3)
    assert time.monotonic() - t < 60
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../../w.bin", "link.bin"])
def test_onnx_external_data_outside_folder_exit_3(npz4: Path, tmp_path: Path, location: str) -> None:
    p = external_data_outside(tmp_path, location)
    for args in (["inspect", p], ["scan", p, "--data", npz4, *TINY_SCAN]):
        line = one_line(bdscan(*args), 3)
        assert "outside the model's folder" in line, line


# ----------------------------------------------------------------------------------------------------------
# regressions found by the property tests below


@pytest.mark.parametrize(("old", "new", "says"), [
    (b"ctorch\nFloatStorage\n", b"ctorch\nFloatStoraoe\n", "torch.FloatStoraoe, which does not exist"),
    (b"ctorch\nFloatStorage\n", b"ctorbh\nFloatStorage\n", "torbh.FloatStorage, from module 'torbh', which is not installed"),
    (b"ctorch._utils\n", b"ctorch/_utils\n", "torch/_utils._rebuild_tensor_v2, which is not a Python name"),
    (b"ccollections\n", b"cc\x7fllections\n", "c?llections.OrderedDict, which is not a Python name"),
    # not damage, but just as unloadable here (even with --trust-pickle): a model class of the script that saved it
    (b"ccollections\nOrderedDict\n", b"c__main__\nNet\n", "__main__.Net, defined in the script that saved it"),
], ids=["name", "module", "slash", "control character", "__main__"])
def test_flipped_bit_in_a_pickle_global_is_damage_not_a_pickled_model(ckpts: Checkpoints, tmp_path: Path, old: bytes, new: bytes,
                                                                      says: str) -> None:
    """torch.FloatStorage -> torch.FloatStoraoe was reported as "a full pickled model" (exit 2): it is damage (exit 3)."""
    src = ckpts.files["state-dict"]
    with zipfile.ZipFile(src) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert old in pkl
    f = h.rewrite_zip(src, tmp_path / "flipped.pt", {"data.pkl": pkl.replace(old, new)})
    for trust in ([], ["--trust-pickle"]):
        line = one_line(bdscan("inspect", f, "--arch", "bdscan_cnn6", "--num-classes", "4", *trust), 3)
        assert says in line, line
    # a real Python object in a weights file is still the documented usage error (exit 2: pass --trust-pickle)
    g = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, g)
    line = one_line(bdscan("inspect", g, "--arch", "bdscan_cnn6", "--num-classes", "4"), 2)
    assert "argparse.Namespace" in line and "--trust-pickle" in line, line


def _drop_member(src: Path, dst: Path, suffix: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith(suffix):
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_damaged_pt2_console_script_one_line(ckpts: Checkpoints, tmp_path: Path) -> None:
    """torch.export.load logged the damaged archive's traceback to stderr before bdscan's line ("check the warnings
    above"); now the real process prints one line naming torch's own error."""
    f = _drop_member(ckpts.files["torch-export"], tmp_path / "missing_weight.pt2", "data/weights/weight_3")
    r = bdscan_process("inspect", f)
    assert r.code == 3, r.err
    errs = lines(r.err)
    assert len(errs) == 1 and errs[0].startswith("bdscan error:"), r.err
    assert "Traceback" not in r.err and "warnings above" not in r.err and "weight_3" in errs[0], r.err
    line = one_line(bdscan("inspect", f), 3)  # and in-process
    assert "weight_3" in line


META_DAMAGE = {  # bdscan.<key> -> damaged raw value; each was exit 2 ("unknown architecture", "--std ...") or 4
    "arch": '"cdscan_cnn6"', "input_size": "[3, 32, <2]", "scale": "1.p", "num_classes": "4x", "mean": "[0.5, 0.4, 0.3, 0.1]",
    "std": "[0.25, 0.0, 0.3]", "arch_kwargs": "x", "class_names": '"abcd"', "output": '"lofits"',
}


@pytest.mark.parametrize("key", [*META_DAMAGE, "no arch"])
def test_damaged_safetensors_metadata_exit_3(ckpts: Checkpoints, npz4: Path, tmp_path: Path, key: str) -> None:
    header, body = _header(ckpts.files["safetensors"])
    meta = header["__metadata__"]
    if key == "no arch":
        del meta["bdscan.arch"]
    else:
        meta[f"bdscan.{key}"] = META_DAMAGE[key]
    f = tmp_path / "meta.safetensors"
    f.write_bytes(_with_header(header, body))
    line = one_line(bdscan("inspect", f), 3)
    assert "metadata" in line or "does not know" in line, line
    one_line(bdscan("scan", f, "--data", npz4, *TINY_SCAN), 3)


def test_bad_options_and_plain_safetensors_stay_usage_errors(ckpts: Checkpoints, tmp_path: Path) -> None:
    good = ckpts.files["safetensors"]
    assert "--std" in one_line(bdscan("inspect", good, "--std", "0.2,0,0.3"), 2)
    assert "--mean" in one_line(bdscan("inspect", good, "--mean", "0.5,0.5"), 2)
    assert "unknown architecture" in one_line(bdscan("inspect", good, "--arch", "no_such_net"), 2)
    header, body = _header(good)
    del header["__metadata__"]  # a plain safetensors file (e.g. from the hub): the user must name the architecture
    f = tmp_path / "plain.safetensors"
    f.write_bytes(_with_header(header, body))
    assert "--arch" in one_line(bdscan("inspect", f), 2)
    assert bdscan("inspect", f, "--arch", "bdscan_cnn6").code == 0


def test_onnx_metadata_that_is_not_utf8_exit_3(ckpts: Checkpoints, tmp_path: Path) -> None:
    """protobuf hands back bytes for a non-UTF-8 string: ``key.startswith(str)`` / ``json.loads`` raised (exit 4)."""
    data = bytearray(ckpts.files["onnx"].read_bytes())
    for key in (b"bdscan.mean", b"bdscan.arch"):
        i = data.rindex(key)
        for pos in (i + 2, i + len(key) + 4):  # inside the key, inside its value
            bad = bytearray(data)
            bad[pos] ^= 0x80
            f = tmp_path / "meta.onnx"
            f.write_bytes(bytes(bad))
            line = one_line(bdscan("inspect", f), 3)
            assert "UTF-8" in line, line


def test_onnxruntime_errors_do_not_reach_stderr(ckpts: Checkpoints, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime logged a failing kernel straight to file descriptor 2, beside bdscan's one line."""
    m = onnx.load(str(ckpts.files["onnx"]))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "kernel_shape").ints[:] = [5, 4]
    f = tmp_path / "kernel.onnx"
    onnx.save(m, str(f))
    capfd.readouterr()
    line = one_line(bdscan("inspect", f), 3)
    assert "kernel_shape" in line, line
    assert "onnxruntime" not in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# property tests: truncation, bit flips and resizing of real tiny checkpoints of every format

CNN = ["--input-size", "3,16,16"]  # the CNN's weights do not depend on the input size; 16×16 keeps each scan tiny
WEIGHTS = ["--arch", "bdscan_cnn6", "--num-classes", "4"]
ARGS = {"safetensors": CNN, "state-dict": WEIGHTS + CNN, "torchscript": [], "torch-export": [], "onnx": []}
MAX_SECONDS = 60.0

_pos = st.floats(0.0, 1.0, exclude_max=True)
damage = st.one_of(
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("flip"), st.lists(st.tuples(_pos, st.integers(0, 7)), min_size=1, max_size=8)),
    # one flip past the headers: often harmless, so the damaged model also gets scanned
    st.tuples(st.just("flip"), st.tuples(st.tuples(st.floats(0.3, 1.0, exclude_max=True), st.integers(0, 7)))),
    # headers, pickles and the first zip entries sit in the first bytes: flip there too, not only in tensor data
    st.tuples(st.just("flip-head"), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 7)), min_size=1, max_size=3)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 512)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=256)),
)


def damaged(data: bytes, how: tuple) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return data[: int(len(data) * how[1])]
    if kind in ("flip", "flip-head"):
        buf = bytearray(data)
        for pos, bit in how[1]:
            i = int(len(buf) * pos) if kind == "flip" else pos % len(buf)
            buf[i] ^= 1 << bit
        return bytes(buf)
    if kind == "insert":
        i = int(len(data) * how[1])
        return data[:i] + how[2] + data[i:]
    if kind == "delete":
        i = int(len(data) * how[1])
        return data[:i] + data[i + how[2] :]
    return data + how[1]


def check_damaged(ckpts: Checkpoints, npz4: Path, tmp_path: Path, key: str, how: tuple) -> None:
    src = ckpts.files[key]
    f = tmp_path / f"damaged{src.suffix}"
    f.write_bytes(damaged(src.read_bytes(), how))
    for cmd in (["inspect", f], ["scan", f, "--data", npz4, *TINY_SCAN, "--samples", "8"]):
        t = time.monotonic()
        r = bdscan(*cmd, *ARGS[key])
        assert time.monotonic() - t < MAX_SECONDS, (cmd[0], how)
        no_crash(r)
        assert r.code in (0, 1, 3), (cmd[0], how, r.code, r.text)
        event(f"{cmd[0]} exit {r.code}")
        if r.code == 3:
            one_line(r, 3)


_settings = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", list(ARGS))
@_settings
@given(how=damage)
def test_damage_never_escapes_the_cli(ckpts: Checkpoints, npz4: Path, tmp_path: Path, key: str, how: tuple) -> None:
    check_damaged(ckpts, npz4, tmp_path, key, how)

