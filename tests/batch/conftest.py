"""Fixtures of the batch tests: a registry folder of tiny models (two scannable, a corrupt file, a hostile
pickle), and one local Ray per test module (2 CPUs, bound to 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.batch.helpers import corrupt_safetensors
from tests.io.helpers import payloads

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Registry:
    dir: Path
    data: Path
    marker: Path  # the hostile pickle's payload would create it


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """One embedded Ray for the module: 2 CPUs on 127.0.0.1; its workers can import the tests' helpers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        from bdscan.batch.engine import start_local_ray

        ray = start_local_ray(num_cpus=2)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture
def registry(tiny_bd, tiny_clean, tmp_path: Path) -> Registry:
    """``reg/``: bd.safetensors, clean.safetensors, sub/corrupt.safetensors, sub/hostile.pt, notes.txt, .git/."""
    d = tmp_path / "reg"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    shutil.copy(tiny_bd.model, d / "bd.safetensors")
    shutil.copy(tiny_clean.model, d / "clean.safetensors")
    corrupt_safetensors(d / "sub" / "corrupt.safetensors")
    marker = tmp_path / "PWNED"
    evil = next(p for p in payloads(tmp_path, marker) if p.name == "os.system (reduce)")
    (d / "sub" / "hostile.pt").write_bytes(evil.data)
    (d / "notes.txt").write_text("not a model\n")
    return Registry(d, tiny_bd.data, marker)
