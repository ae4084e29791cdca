"""The scan options a batch row may set, one parser per option, and the :class:`ScanRequest` a row becomes.

A row is a mapping from an option's long name with underscores (``num_classes`` for ``--num-classes``) to a
value: from the command line (the defaults of every row), or from a manifest row, which overrides them. Values
come typed (JSON, YAML) or as strings (CSV), so every parser accepts both. An unknown option or a bad value is a
:class:`~bdscan.errors.UsageError` that names where the row came from (``manifest.csv line 4``), raised before
anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdscan.detect import ScanSettings, parse_detectors
from bdscan.detect.config import BUDGETS, LEVEL_GROUPS, LEVELS, PRECISIONS, parse_levels, parse_second_look
from bdscan.errors import UsageError
from bdscan.io import LoadOptions, loaders
from bdscan.pipeline import DEVICES, ScanRequest, configure

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class _Bad(ValueError):
    """A value an option's parser refuses; the message says what it expects."""


def _int(minimum: int | None = None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip().lstrip("-").isdigit()):
            raise _Bad("expects a whole number")
        n = int(v)
        if minimum is not None and n < minimum:
            raise _Bad(f"must be at least {minimum}")
        return n

    return parse


def _float(positive: bool = False) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise _Bad("expects a number")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise _Bad("expects a number") from None
        if x != x or (positive and x <= 0):
            raise _Bad("expects a positive number" if positive else "expects a number")
        return x

    return parse


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (str, int)) and str(v).strip().lower() in _TRUE | _FALSE:
        return str(v).strip().lower() in _TRUE
    raise _Bad("expects true or false")


def _str(v: Any) -> str:
    if isinstance(v, Path):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        raise _Bad("expects a non-empty string")
    return v.strip()


def _choice(choices: tuple[str, ...] | list[str]) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or v.strip() not in choices:
            raise _Bad(f"expects one of {', '.join(choices)}")
        return v.strip()

    return parse


def _items(v: Any) -> list[Any]:
    """``"a,b"`` or ``[a, b]`` -> a list."""
    if isinstance(v, str):
        return [x.strip() for x in v.replace(" ", "").split(",") if x.strip()]
    if isinstance(v, (list, tuple)):
        return list(v)
    raise _Bad("expects a comma-separated list")


def _floats(v: Any) -> tuple[float, ...]:
    items = _items(v)
    if not items:
        raise _Bad("expects numbers, e.g. 0.5,0.5,0.5")
    return tuple(_float()(x) for x in items)


def _input_size(v: Any) -> tuple[int, int, int]:
    items = _items(v.lower().replace("x", ",") if isinstance(v, str) else v)
    if len(items) != 3:
        raise _Bad("expects C,H,W, e.g. 3,32,32")
    c, h, w = (_int(1)(x) for x in items)
    return c, h, w


def _levels(v: Any) -> tuple[str, ...]:
    try:
        return parse_levels(",".join(_items(v)))
    except UsageError:
        raise _Bad(f"expects levels among {', '.join(LEVELS)} (or {', '.join(LEVEL_GROUPS)})") from None


def _detectors(v: Any) -> tuple[str, ...]:
    try:
        return parse_detectors(_items(v))
    except UsageError as e:
        raise _Bad(e.message + (f" ({e.hint})" if e.hint else "")) from None


def _second_look(v: Any) -> tuple[int, float, float] | str:
    try:
        return parse_second_look(v)
    except UsageError as e:
        raise _Bad(e.message.removeprefix(f"second look {v!r} ") + (f" ({e.hint})" if e.hint else "")) from None


def _format(v: Any) -> str:
    return _choice(sorted(loaders()))(v)


@dataclass(frozen=True)
class Option:
    """One option a row may set: its parser and whether its value is a path (relative to the row's folder)."""

    parse: Callable[[Any], Any]
    path: bool = False


#: option (long name with underscores) -> its parser; ``model`` is the row's model path
OPTIONS: dict[str, Option] = {
    "model": Option(_str, path=True),
    "data": Option(_str, path=True),
    "levels": Option(_levels),
    "detectors": Option(_detectors),
    "budget": Option(_choice(tuple(BUDGETS))),
    "steps": Option(_int(1)),
    "samples": Option(_int(1)),
    "samples_per_class": Option(_int(1)),
    "threshold": Option(_float()),
    "alpha": Option(_float()),
    "precision": Option(_choice(PRECISIONS)),
    "workers": Option(_int(1)),
    "seed": Option(_int(0)),
    "device": Option(_choice(DEVICES)),
    "activations": Option(_bool),
    "arch": Option(_str),
    "num_classes": Option(_int(2)),
    "input_size": Option(_input_size),
    "mean": Option(_floats),
    "std": Option(_floats),
    "scale": Option(_float(positive=True)),
    "patch_size": Option(_int(1)),
    "trust_pickle": Option(_bool),
    "format": Option(_format),
    "second_look": Option(_second_look),
}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def parse_row(values: Mapping[str, Any], where: str, base: Path | None = None) -> dict[str, Any]:
    """``values`` parsed by :data:`OPTIONS` (empty values dropped; paths made relative to ``base``).

    Raises:
        UsageError: an unknown option or a bad value, naming ``where``.
    """
    out: dict[str, Any] = {}
    for key, v in values.items():
        k = str(key).strip()
        if k not in OPTIONS:
            raise UsageError(f"{where}: unknown option {k!r}", f"use the scan options' long names with underscores: {', '.join(OPTIONS)}")
        if _missing(v):
            continue
        opt = OPTIONS[k]
        try:
            parsed = opt.parse(v)
        except _Bad as e:
            raise UsageError(f"{where}: {k} {v!r} {e}", "fix the value (see `bdscan scan --help`)") from None
        out[k] = (base / parsed if base is not None else Path(parsed)) if opt.path else parsed
    return out


def request_of(values: Mapping[str, Any], where: str) -> ScanRequest:
    """The scan a parsed row asks for (see :func:`parse_row`), validated as the scan would validate it.

    Raises:
        UsageError: no model, or options the detectors refuse, naming ``where``.
    """
    v = dict(values)
    if "model" not in v:
        raise UsageError(f"{where}: no model", "every row needs a model (its path, relative to the manifest)")
    if v.get("std") is not None and any(s == 0 for s in v["std"]):
        raise UsageError(f"{where}: std {v['std']} has a zero", "give the per-channel standard deviations")
    defaults = ScanSettings()
    settings = ScanSettings(budget=v.get("budget", defaults.budget), levels=v.get("levels", defaults.levels),
                            threshold=v.get("threshold", defaults.threshold), alpha=v.get("alpha", defaults.alpha),
                            seed=v.get("seed", defaults.seed),
                            device=v.get("device", defaults.device), workers=v.get("workers"), steps=v.get("steps"),
                            samples=v.get("samples"), precision=v.get("precision"),
                            second_look=v.get("second_look", defaults.second_look))
    load = LoadOptions(arch=v.get("arch"), num_classes=v.get("num_classes"), input_size=v.get("input_size"), mean=v.get("mean"),
                       std=v.get("std"), scale=v.get("scale"), patch_size=v.get("patch_size"), trust_pickle=v.get("trust_pickle", False))
    req = ScanRequest(model=Path(v["model"]), data=v.get("data"), load=load, fmt=v.get("format"), settings=settings,
                      detectors=v.get("detectors") or parse_detectors(None), samples_per_class=v.get("samples_per_class"),
                      activations=v.get("activations", True))
    try:
        configure(req.settings, req.detectors)
    except UsageError as e:
        raise UsageError(f"{where}: {e.message}", e.hint) from None
    return req
