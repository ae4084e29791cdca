"""The commands the report and the console suggest, built so that each runs as printed from the directory the
scan ran in: paths come from the document's ``invocation`` (as the user gave them: relative stays relative),
every argument is shell-quoted, and every option a command needs (``--data``, ``--out``, ``--scan``, the
options that loaded the model) is on it. tests/cli/test_cli_suggested.py runs them.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

from bdscan.report.json_report import command

#: paths a suggested command may contain: a scan document is input (it may come from anyone), so a path with shell
#: syntax in it is never pasted into a command, even quoted
_PLAIN = re.compile(r"^[\w./\\: +@%=,~-]+$")

#: the file a repaired model is written to, by the scanned model's loader (what that format can hold; a model
#: folder is repaired into a folder, a path without a suffix); anything else is written as safetensors
REPAIRED_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "hf-folder": "", "timm-folder": ""}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def paths(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(model, data)`` as the user gave them; from an older document without ``invocation``, the model's file
    name and the data's recorded source (right when the scan ran in the model's folder)."""
    inv = doc.get("invocation") if isinstance(doc.get("invocation"), dict) else {}
    model = inv.get("model") or _get(doc, "model", "file")
    data = inv.get("data") or _get(doc, "data", "source")
    return _plain(model), _plain(data)


def _plain(p: Any) -> str | None:
    return str(p) if isinstance(p, str) and _PLAIN.match(p) else None


def repair_command(doc: dict[str, Any]) -> str | None:
    """``bdscan repair`` of the scanned model with the scan's reversed trigger (None when the document names no
    model or data): it writes ``<model>-repaired.<suffix>`` and a report with the Repair page."""
    model, data = paths(doc)
    if not model or not data:
        return None
    inv = doc.get("invocation") if isinstance(doc.get("invocation"), dict) else {}
    stem = PurePath(model).stem
    suffix = REPAIRED_SUFFIX.get(str(_get(doc, "model", "format")), ".safetensors")
    args: list[str] = ["bdscan", "repair", model, "--data", data]
    if inv.get("scan_folder"):
        args += ["--scan", str(inv["scan_folder"])]
    load = [str(a) for a in inv.get("load_args") or []]
    if not all(_plain(a) for a in load) or (inv.get("scan_folder") and not _plain(inv["scan_folder"])):
        return None
    args += load
    args += ["--out", f"{stem}-repaired{suffix}", "--report", f"{stem}-repair.html"]
    return command(*args)


def rescan_command(doc: dict[str, Any]) -> str | None:
    """``bdscan scan`` of the model a repair wrote (None when the repair wrote none)."""
    export = _get(doc, "repair", "export") or {}
    _, data = paths(doc)
    if not export.get("written") or not export.get("file") or not data:
        return None
    out = _plain(export["file"])
    if out is None:
        return None
    return command("bdscan", "scan", out, "--data", data, "--report", f"{PurePath(out).stem}-scan.html")
