"""The codebase's shape (issue #22): a thin CLI, no oversized modules, and library code that never prints."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bdscan"
#: modules that may know typer or rich (the command line)
CLI_MODULES = {"cli.py", "console.py", "commands"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_cli_is_thin_and_no_module_is_oversized() -> None:
    assert len((PKG / "cli.py").read_text(encoding="utf-8").splitlines()) <= 450
    big = {str(p.relative_to(PKG)): n for p in _modules() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not big, f"modules over 600 lines: {big}"


def test_only_the_command_line_knows_typer_and_rich() -> None:
    offenders = [str(p.relative_to(PKG)) for p in _modules()
                 if p.relative_to(PKG).parts[0] not in CLI_MODULES and _imports(p) & {"typer", "rich"}]
    assert not offenders, f"library modules importing typer/rich: {offenders}"


def test_the_pipeline_and_detectors_never_print() -> None:
    for p in [PKG / "pipeline.py", *(PKG / "detect").glob("*.py"), *(PKG / "report").glob("*.py")]:
        calls = [n for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{p.name} calls print()"
