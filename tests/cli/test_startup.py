"""The command line starts without importing torch (``bdscan --help`` is quick), and the registries that the lazy
packages fill on first use hold the built-ins, in their order, whichever module a caller imports first.

Each check runs in a fresh interpreter: this test process has imported torch long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "scipy", "numpy", "matplotlib", "ray", "onnx", "safetensors")


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def _heavy_after(code: str) -> list[str]:
    return json.loads(_run(f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"))


def test_importing_the_cli_imports_no_heavy_library() -> None:
    assert _heavy_after("import bdscan.cli") == []


def test_help_of_every_command_imports_no_heavy_library() -> None:
    code = """
from typer.testing import CliRunner
from bdscan.cli import app
for args in (["--help"], ["scan", "--help"], ["repair", "--help"], ["guard", "--help"], ["lab", "--help"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
"""
    assert _heavy_after(code) == []


def test_budgets_and_repair_defaults_read_without_torch() -> None:
    assert _heavy_after("from bdscan.detect.config import BUDGETS, DEFAULT_ALPHA\n"
                        "from bdscan.repair.config import RepairConfig\nRepairConfig()") == []


@pytest.mark.parametrize("first", ["bdscan.detect.mmbd", "bdscan.detect.neural_cleanse", "bdscan.detect.base",
                                   "bdscan.report.sarif", "bdscan.detect.neuron_noise"])
def test_detector_registry_holds_the_builtins_in_order_whatever_was_imported_first(first: str) -> None:
    out = _run(f"import importlib\nimportlib.import_module({first!r})\n"
               "from bdscan.detect.base import DETECTORS\nprint(list(DETECTORS))")
    assert out == "['neural-cleanse', 'mm-bd', 'neuron-noise']"


@pytest.mark.parametrize("first", ["bdscan.repair.prune", "bdscan.repair.core", "bdscan.repair.config"])
def test_repair_methods_hold_the_builtins_in_order_whatever_was_imported_first(first: str) -> None:
    out = _run(f"import importlib\nimportlib.import_module({first!r})\n"
               "from bdscan.repair.config import get_method, repair_methods\nget_method('prune')\n"
               "print(list(repair_methods()))")
    assert out == "['unlearn', 'prune']"


def test_lazy_packages_name_what_they_lack() -> None:
    out = _run("import bdscan.detect, bdscan.repair\n"
               "for pkg in (bdscan.detect, bdscan.repair):\n"
               "    try:\n        pkg.no_such_name\n    except AttributeError as e:\n        print(e, end='; ')\n"
               "print()")
    assert "'bdscan.detect' has no attribute 'no_such_name'" in out and "'bdscan.repair'" in out
