"""What every command shares: exit codes, the one error handler, and the options that load a model.

Exit codes (also in README and ``--help``):

====  ==========================================================================
0     clean: no backdoor suspected, no unsafe serialization
1     finding: backdoor suspected, or the file's static pickle scan found dangerous imports
2     usage error: bad option, missing data, an output path equal to an input or not writable
3     the model or the data cannot be loaded (corrupt, truncated, wrong shape, NaN weights)
4     internal error (a bug in bdscan: please report it)
====  ==========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from bdscan.console import err
from bdscan.detect.config import PRECISIONS, parse_levels
from bdscan.errors import BdscanError, LoadError, NumericalError, UnsafeModelError, UsageError, first_line

if TYPE_CHECKING:
    from bdscan.io import LoadOptions

EXIT_CLEAN, EXIT_FINDING, EXIT_USAGE, EXIT_LOAD, EXIT_INTERNAL = 0, 1, 2, 3, 4
#: domain error class -> exit code (first match in MRO order wins)
EXIT_CODES: dict[type[BaseException], int] = {
    UnsafeModelError: EXIT_FINDING,
    UsageError: EXIT_USAGE,
    LoadError: EXIT_LOAD,
    NumericalError: EXIT_LOAD,
    BdscanError: EXIT_INTERNAL,
}
EXIT_HELP = (
    "Exit codes: 0 clean; 1 backdoor suspected or unsafe serialization; 2 usage error; "
    "3 model or data cannot be loaded; 4 internal error."
)

#: --precision's choices, from the one list the inversion config validates against
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)


def levels_of(levels: str | None, mode: str | None, default: str = "default") -> tuple[str, ...]:
    """The levels chosen by ``--levels`` or its deprecated name ``--mode`` (which prints a note)."""
    if mode is not None:
        if levels is not None and parse_levels(levels) != parse_levels(mode):
            raise UsageError(f"--mode {mode} and --levels {levels} disagree", "use --levels alone (--mode is deprecated)")
        err.print("[yellow]note[/]: --mode is deprecated and will be removed in bdscan 0.3; use --levels")
    chosen = levels if levels is not None else mode
    return parse_levels(chosen if chosen is not None else default)


def exit_code_for(e: BaseException) -> int:
    for cls in type(e).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


def run_guarded(fn: Callable[[], int], debug: bool = False) -> None:
    """Runs a command body; maps bdscan errors to one line + exit code, anything else to exit 4."""
    try:
        code = fn()
    except BdscanError as e:
        code = exit_code_for(e)
        label = "finding" if code == EXIT_FINDING else "error"
        err.print(f"[bold red]bdscan {label}:[/] {escape(str(e))}")
    except KeyboardInterrupt:
        err.print("[bold red]bdscan:[/] interrupted; no partial outputs were left behind")
        code = 130
    except typer.Exit:
        raise
    except Exception as e:
        if debug or os.environ.get("BDSCAN_DEBUG"):
            raise
        detail = first_line(e) if str(e).strip() else ""
        err.print(f"[bold red]bdscan internal error:[/] {type(e).__name__}: {escape(detail)} "
                  "(please report it; set BDSCAN_DEBUG=1 for the traceback)")
        code = EXIT_INTERNAL
    raise typer.Exit(code)


def parse_floats(s: str | None, name: str) -> tuple[float, ...] | None:
    if s is None:
        return None
    try:
        vals = tuple(float(v) for v in s.replace(" ", "").split(",") if v)
    except ValueError as e:
        raise UsageError(f"--{name} {s!r} is not a comma-separated list of numbers", f"e.g. --{name} 0.5,0.5,0.5") from e
    if not vals:
        raise UsageError(f"--{name} is empty", f"e.g. --{name} 0.5,0.5,0.5")
    return vals


def parse_input_size(s: str | None) -> tuple[int, int, int] | None:
    if s is None:
        return None
    try:
        vals = tuple(int(v) for v in s.lower().replace("x", ",").split(",") if v)
    except ValueError as e:
        raise UsageError(f"--input-size {s!r} is not C,H,W", "e.g. --input-size 3,32,32") from e
    if len(vals) != 3 or min(vals) < 1:
        raise UsageError(f"--input-size {s!r} is not C,H,W", "e.g. --input-size 3,32,32")
    return vals  # type: ignore[return-value]


# Options shared by every command that loads a model.
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture for weight-only files (see `bdscan models`).")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Number of classes, if the file does not say.")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="C,H,W the model expects, e.g. 3,32,32.")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")]
ScaleOpt = Annotated[float | None, typer.Option("--scale", help="255 if the model takes 0-255 pixels (before mean/std).")]
PatchOpt = Annotated[int | None, typer.Option("--patch-size", help="Token grid patch size, if it cannot be found from the model.")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow a full pickled nn.Module (after a clean static scan).")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Force a loader (safetensors, state-dict, torchscript, ...).")]
LevelsOpt = Annotated[str | None, typer.Option("--levels", help=(
    "Neural Cleanse levels, comma-separated: pixel, patch (token grid), blend (whole-image blend level); "
    "both = pixel,patch; all = every level. [default: pixel,patch]"))]
ModeOpt = Annotated[str | None, typer.Option("--mode", hidden=True, help="Deprecated name of --levels.")]
DetectorsOpt = Annotated[str | None, typer.Option("--detectors", help="Comma-separated detectors to run (see `bdscan detectors`).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of sampling, initialisation and batch order.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]


def load_options(arch: str | None, num_classes: int | None, input_size: str | None, mean: str | None, std: str | None,
                 scale: float | None, patch_size: int | None, trust_pickle: bool) -> LoadOptions:
    """The model-loading options, validated."""
    from bdscan.io import LoadOptions

    if num_classes is not None and num_classes < 2:
        raise UsageError(f"--num-classes {num_classes} is too small", "a classifier has at least 2 classes")
    if patch_size is not None and patch_size < 1:
        raise UsageError("--patch-size must be positive", "e.g. --patch-size 16")
    return LoadOptions(arch=arch, num_classes=num_classes, input_size=parse_input_size(input_size),
                       mean=parse_floats(mean, "mean"), std=parse_floats(std, "std"), scale=scale,
                       patch_size=patch_size, trust_pickle=trust_pickle)
