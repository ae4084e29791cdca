"""Damaged files: every format fails with a one-line ModelLoadError, and random damage never escapes bdscan's errors."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdscan.errors import BdscanError, ModelLoadError
from bdscan.io import load_model
from tests.io.helpers import Checkpoints

FORMATS = ["safetensors", "state-dict", "legacy", "torchscript", "torch-export", "onnx"]


def _single_line(err: BaseException) -> None:
    assert "\n" not in str(err) and "\r" not in str(err), str(err)


@pytest.mark.parametrize("key", FORMATS)
@pytest.mark.parametrize("cut", [0.5, 0.9, 16])
def test_truncated(ckpts: Checkpoints, tmp_path: Path, key: str, cut: float) -> None:
    data = ckpts.files[key].read_bytes()
    n = int(len(data) * cut) if cut < 1 else int(cut)
    f = tmp_path / ckpts.files[key].name
    f.write_bytes(data[:n])
    with pytest.raises(ModelLoadError) as e:
        load_model(f, ckpts.options[key])
    _single_line(e.value)


@pytest.mark.parametrize("key", FORMATS)
def test_garbage_with_the_right_name(ckpts: Checkpoints, tmp_path: Path, key: str) -> None:
    f = tmp_path / ckpts.files[key].name
    f.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError) as e:
        load_model(f, ckpts.options[key], fmt=None if key != "legacy" else "state-dict")
    _single_line(e.value)


def _safetensors(header: dict, body: bytes, declared: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + body


@pytest.mark.parametrize(
    "data",
    [
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),  # data beyond the end
        _safetensors({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 16]}}, b"\0" * 16),  # shape lies
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, b"\0" * 16),  # reversed offsets
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, declared=1 << 40),
        _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, declared=99_000_000),
        _safetensors({"w": {"dtype": "XX", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),  # unknown dtype
        struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 16,  # header is not an object
    ],
    ids=["beyond-end", "shape-lies", "reversed", "huge-header", "header-past-eof", "dtype", "not-object"],
)
def test_lying_safetensors_headers(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "lies.safetensors"
    f.write_bytes(data)
    with pytest.raises(ModelLoadError) as e:
        load_model(f)
    _single_line(e.value)


# ----------------------------------------------------------------------------------------------------------
# property tests: truncation and bit flips of real tiny checkpoints

MAX_SECONDS = 30.0
damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=8)),
)


def _damage(data: bytes, how: tuple) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    buf = bytearray(data)
    for pos, bit in arg:
        buf[int(len(buf) * pos)] ^= 1 << bit
    return bytes(buf)


def _check(ckpts: Checkpoints, tmp_path: Path, key: str, how: tuple) -> None:
    src = ckpts.files[key]
    f = tmp_path / f"damaged{src.suffix}"
    f.write_bytes(_damage(src.read_bytes(), how))
    t = time.monotonic()
    try:
        load_model(f, ckpts.options[key])
    except BdscanError as e:
        _single_line(e)
    assert time.monotonic() - t < MAX_SECONDS


_slow = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_fast = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("key", ["safetensors", "state-dict", "legacy", "torchscript"])
@_fast
@given(how=damage)
def test_damage_never_escapes(ckpts: Checkpoints, tmp_path: Path, key: str, how: tuple) -> None:
    _check(ckpts, tmp_path, key, how)


@pytest.mark.parametrize("key", ["torch-export", "onnx"])
@_slow
@given(how=damage)
def test_damage_never_escapes_slow_formats(ckpts: Checkpoints, tmp_path: Path, key: str, how: tuple) -> None:
    _check(ckpts, tmp_path, key, how)
