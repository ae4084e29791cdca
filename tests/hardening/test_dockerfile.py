"""The Dockerfile, read with dockerfile_parse (no container engine runs here): slim Python base, CPU-only torch from
the PyTorch CPU index before ``pip install .``, a non-root user before the ``bdscan`` entry point, the sample models
under the final WORKDIR (so ``docker run IMAGE scan sample_models/...`` works), no secrets, and a .dockerignore
that keeps the repository's clutter out of the build context but nothing the build copies."""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from bdscan.lab.samples import DEMO

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def steps() -> list[dict]:
    p = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [s for s in p.structure if s["instruction"] != "COMMENT"]


def _index(steps: list[dict], instruction: str, pred=lambda v: True) -> list[int]:  # type: ignore[no-untyped-def]
    return [i for i, s in enumerate(steps) if s["instruction"] == instruction and pred(s["value"])]


def test_base_image_is_slim_python() -> None:
    p = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert re.fullmatch(r"python:3\.(1[0-9])-slim(-[a-z]+)?", p.baseimage or ""), p.baseimage
    assert len(_index([s for s in p.structure], "FROM")) == 1


def test_cpu_torch_from_the_cpu_index_before_bdscan(steps: list[dict]) -> None:
    torch_runs = _index(steps, "RUN", lambda v: CPU_INDEX in v)
    assert torch_runs, "torch must come from the PyTorch CPU index"
    words = shlex.split(steps[torch_runs[0]]["value"])
    assert words[:2] == ["pip", "install"] and "torch" in words and "torchvision" in words
    assert words[words.index("--index-url") + 1] == CPU_INDEX  # --index-url, not --extra-index-url: no CUDA wheel from PyPI
    bdscan_runs = _index(steps, "RUN", lambda v: re.search(r"pip install \.(\s|$)", v) is not None)
    assert bdscan_runs and torch_runs[0] < bdscan_runs[0], "torch first, so `pip install .` keeps the CPU build"


def test_non_root_user_before_the_bdscan_entrypoint(steps: list[dict]) -> None:
    users = _index(steps, "USER")
    entry = _index(steps, "ENTRYPOINT")
    assert users and entry and users[-1] < entry[-1]
    user = steps[users[-1]]["value"].split(":")[0].strip()
    assert user not in ("root", "0", ""), user
    created = _index(steps, "RUN", lambda v: re.search(rf"\b(useradd|adduser)\b[^&]*\b{re.escape(user)}\b", v) is not None)
    assert created and created[0] < users[-1], f"the user {user!r} must be created before USER"
    assert json.loads(steps[entry[-1]]["value"]) == ["bdscan"]  # exec form: arguments and signals reach bdscan


def _workdir_at(steps: list[dict], i: int) -> str:
    wd = "/"
    for s in steps[:i]:
        if s["instruction"] == "WORKDIR":
            wd = posixpath.join(wd, s["value"].strip())
    return wd


def test_sample_models_under_the_final_workdir(steps: list[dict]) -> None:
    entry = _index(steps, "ENTRYPOINT")[-1]
    final = _workdir_at(steps, entry)
    assert final != "/", "set a WORKDIR"
    copies = _index(steps, "COPY", lambda v: "sample_models" in v)
    assert copies, "the bundled sample models must be copied"
    words = [w for w in shlex.split(steps[copies[-1]]["value"]) if not w.startswith("--")]
    dest = posixpath.normpath(posixpath.join(_workdir_at(steps, copies[-1]), words[-1]))
    assert dest == posixpath.join(final, "sample_models"), (dest, final)
    assert (ROOT / "sample_models" / DEMO.file).is_file()  # the one the usage line scans


def test_no_secrets(steps: list[dict]) -> None:
    secret = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
    for s in steps:
        if s["instruction"] in ("ENV", "ARG", "LABEL"):
            assert not secret.search(s["value"]), s["value"]
        if s["instruction"] == "RUN":
            assert not re.search(r"https?://[^/\s]+:[^@\s]+@", s["value"]), "credentials in a URL"
        if s["instruction"] in ("COPY", "ADD"):
            assert not re.search(r"(\.env|\.netrc|\.pypirc|id_rsa|\.ssh|\.aws|\.docker/config)", s["value"]), s["value"]
    assert not _index(steps, "ADD"), "COPY, not ADD (no remote URLs or auto-extraction)"


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_clutter_out_and_what_the_build_copies_in(steps: list[dict]) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for clutter in (".git", ".git/config", ".pytest_cache/v", ".hypothesis/x", "bdscan/__pycache__/cli.cpython-311.pyc",
                    "tests/io/helpers.py", "scan-out/scan.json", "bdscan.egg-info/PKG-INFO", ".ruff_cache/x"):
        assert _ignored(clutter, patterns), clutter
    for s in steps:
        if s["instruction"] != "COPY":
            continue
        for src in [w for w in shlex.split(s["value"]) if not w.startswith("--")][:-1]:
            src = src.rstrip("/")
            assert (ROOT / src).exists(), src
            assert not _ignored(src, patterns), f"{src} is copied but .dockerignore excludes it"
    for needed in ("bdscan/cli.py", "bdscan/templates", "templates/report.html.j2", f"sample_models/{DEMO.file}",
                   "pyproject.toml", "README.md"):
        assert not _ignored(needed, patterns), needed
