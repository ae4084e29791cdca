"""The benchmark suite's shape: one entry point, a registry, a parser per benchmark, imports through the package.

The benchmarks themselves are measurements (minutes to hours) and never run here.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
from benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks"


def _sources() -> list[Path]:
    return sorted(SUITE.rglob("*.py"))


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import in a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_help_lists_every_registered_benchmark() -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    listed = {ln.split()[0] for ln in p.stdout.splitlines() if ln.startswith("  ") and ln.strip()}
    assert listed == set(benchmarks.BENCHMARKS)
    for name, summary in benchmarks.BENCHMARKS.items():
        assert summary and "\n" not in summary, name


def test_an_unknown_name_is_refused_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-benchmark"]) == 2
    assert "detect" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_each_benchmark_imports_and_exposes_a_parser(name: str) -> None:
    module = benchmarks.load(name)
    ap = module.parser()
    assert isinstance(ap, argparse.ArgumentParser)
    assert callable(module.run)
    assert ap.format_help()


def test_every_benchmark_module_is_registered() -> None:
    support = {"__init__", "__main__", "common"}
    modules = {p.stem for p in SUITE.glob("*.py")} - support
    assert modules == {benchmarks.module_name(n).rsplit(".", 1)[1] for n in benchmarks.BENCHMARKS}


def test_no_module_imports_a_sibling_by_bare_name() -> None:
    """``import common`` works only when run from inside the folder; the suite imports through ``benchmarks.``."""
    bad = []
    for path in _sources():
        siblings = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
        siblings -= {"__init__", "__main__", "__pycache__"}
        for line, name in _imported(ast.parse(path.read_text(), str(path))):
            if name in siblings:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, bad


def test_only_common_imports_bdscan() -> None:
    """bdscan's detection API changes in one place for the whole suite: ``benchmarks/common.py``."""
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in _sources() if p.parent == SUITE and p.name != "common.py"
           for line, name in _imported(ast.parse(p.read_text(), str(p))) if name == "bdscan"]
    assert not bad, bad


def test_a_zoo_model_is_measured_on_its_data_sets_bundled_samples(tmp_path: Path) -> None:
    from benchmarks.common import DATASET_SAMPLES, samples_of

    # a lab model names its own samples file beside it; an evaluation-zoo model names only its data set
    assert samples_of(tmp_path / "m.safetensors", {"samples": "m_samples.npz", "dataset": "gtsrb"}) == tmp_path / "m_samples.npz"
    assert samples_of(tmp_path / "m.safetensors", {"dataset": "cifar10"}) == DATASET_SAMPLES["cifar10"]
    assert DATASET_SAMPLES["cifar10"].exists() and DATASET_SAMPLES["gtsrb"].exists()
    with pytest.raises(SystemExit, match="neither samples nor a data set"):
        samples_of(tmp_path / "m.safetensors", {"dataset": "imagenet"})


def test_a_reader_that_goes_away_stops_a_listing_quietly(tmp_path: Path) -> None:
    """``python -m benchmarks NAME --summary | head``: no BrokenPipeError traceback, exit status 0."""
    import subprocess
    import sys

    conf = [[5, 1], [1, 5]]
    rows = [{"model": f"m{i}", "target": None, "mode": "untargeted", "seed": 0, "eps": [0.1], "steps": 20,
             "runs": [{"eps": 0.1, "seed": 0, "acc": 0.8, "conf": [[*r, 0] for r in conf] + [[0, 0, 6]]}]} for i in range(3000)]
    out = tmp_path / "nn.json"
    out.write_text(json.dumps({"rows": rows}), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "neuron-noise", "--summary", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"| m0 |")
    proc.stdout.close()  # the reader goes away with most of the listing unwritten
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
