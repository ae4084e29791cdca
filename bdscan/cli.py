"""bdscan's command line: the only module that knows typer, the rich console and exit codes.

Exit codes (also in README and ``--help``):

====  ==========================================================================
0     clean: no backdoor suspected, no unsafe serialization
1     finding: backdoor suspected, or the file's static pickle scan found dangerous imports
2     usage error: bad option, missing data, an output path equal to an input
3     the model or the data cannot be loaded (corrupt, truncated, wrong shape, NaN weights)
4     internal error (a bug in bdscan: please report it)
====  ==========================================================================
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bdscan import __version__
from bdscan.detect.config import BUDGETS, DEFAULT_BUDGET, MODES, PRECISIONS
from bdscan.errors import BdscanError, LoadError, NumericalError, UnsafeModelError, UsageError

EXIT_CLEAN, EXIT_FINDING, EXIT_USAGE, EXIT_LOAD, EXIT_INTERNAL = 0, 1, 2, 3, 4
#: domain error class -> exit code (first match in MRO order wins)
EXIT_CODES: dict[type[BaseException], int] = {
    UnsafeModelError: EXIT_FINDING,
    UsageError: EXIT_USAGE,
    LoadError: EXIT_LOAD,
    NumericalError: EXIT_LOAD,
    BdscanError: EXIT_INTERNAL,
}
_BUDGET_HELP = f"{', '.join(BUDGETS)} (default {DEFAULT_BUDGET}; original = Neural Cleanse's own schedule)."
EXIT_HELP = (
    "Exit codes: 0 clean; 1 backdoor suspected or unsafe serialization; 2 usage error; "
    "3 model or data cannot be loaded; 4 internal error."
)

app = typer.Typer(
    name="bdscan",
    help="Find, show and remove neural backdoors in image classifiers.\n\n" + EXIT_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
lab_app = typer.Typer(help="The backdoor lab: train models and inject backdoors (positive controls).", no_args_is_help=True)
app.add_typer(lab_app, name="lab")

# soft_wrap: a verdict or error line is never broken, so pipelines can grep it
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")


#: --mode's choices: each level of the scan, or both
Mode = Enum("Mode", {m: m for m in (*MODES, "both")}, type=str)


#: --precision's choices, from the one list the inversion config validates against
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)


class FailOn(str, Enum):
    never = "never"
    suspect = "suspect"


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
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        err.print(f"[bold red]bdscan internal error:[/] {type(e).__name__}: {escape(msg)} "
                  "(please report it; set BDSCAN_DEBUG=1 for the traceback)")
        code = EXIT_INTERNAL
    raise typer.Exit(code)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err, transient=True) as p:
        yield p


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


def load_options(arch: str | None, num_classes: int | None, input_size: str | None, mean: str | None, std: str | None,
                 scale: float | None, patch_size: int | None, trust_pickle: bool) -> Any:
    from bdscan.io import LoadOptions

    if num_classes is not None and num_classes < 2:
        raise UsageError(f"--num-classes {num_classes} is too small", "a classifier has at least 2 classes")
    if patch_size is not None and patch_size < 1:
        raise UsageError("--patch-size must be positive", "e.g. --patch-size 16")
    return LoadOptions(arch=arch, num_classes=num_classes, input_size=parse_input_size(input_size),
                       mean=parse_floats(mean, "mean"), std=parse_floats(std, "std"), scale=scale,
                       patch_size=patch_size, trust_pickle=trust_pickle)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"bdscan {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what bdscan does.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    num_classes: Annotated[int, typer.Option("--num-classes")] = 10,
) -> None:
    """List bdscan's architectures with parameter counts and token grids (at 32×32)."""

    def body() -> int:
        import timm

        from bdscan.models import BDSCAN_ARCHS, find_token_grid

        rows = []
        for name, family in BDSCAN_ARCHS.items():
            net = timm.create_model(name, num_classes=num_classes)
            grid = find_token_grid(net, (3, 32, 32))
            rows.append({"name": name, "family": family, "parameters": sum(p.numel() for p in net.parameters()),
                         "token_grid": grid.to_dict() if grid else None})
        if as_json:
            out.print_json(json.dumps(rows))
            return EXIT_CLEAN
        t = Table(title=f"bdscan architectures ({num_classes} classes, 3×32×32)")
        for c in ("name", "family", "parameters", "token grid"):
            t.add_column(c)
        for r in rows:
            g = r["token_grid"]
            gs = f"{g['grid'][0]}×{g['grid'][1]}, stride {g['stride']}, footprint {g['footprint']}" if g else "none (CNN)"
            t.add_row(r["name"], r["family"], f"{r['parameters']:,}", gs)
        out.print(t)
        out.print("Any timm architecture name also works with --arch.")
        return EXIT_CLEAN

    run_guarded(body)


@app.command("inspect")
def inspect_cmd(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Load a model safely and describe it: format, architecture, classes, token grid, static pickle scan.

    Exit codes: 0 clean; 1 unsafe serialization; 2 usage error; 3 cannot load; 4 internal error.
    """

    def body() -> int:
        from bdscan.io import load_model
        from bdscan.report.json_report import model_section

        opts = load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle)
        lm = load_model(model, opts, fmt)
        d = model_section(lm)
        if d.get("original_trigger"):
            d["original_trigger"].pop("images", None)
        if as_json:
            out.print_json(json.dumps(d, default=str))
        else:
            t = Table(show_header=False, title=f"{model.name}")
            t.add_column("field", style="bold")
            t.add_column("value")
            grid = d["token_grid"]
            rows = [
                ("format", d["format"]), ("sha256", d["sha256"]), ("architecture", d["arch"]),
                ("classes", str(d["num_classes"])), ("input size", "×".join(map(str, d["input_size"]))),
                ("input scaling", f"×{d['scale']:g}, mean {d['mean']}, std {d['std']}"), ("output", d["output"]),
                ("parameters", f"{d['parameters']:,}"),
                ("token grid", f"{grid['grid'][0]}×{grid['grid'][1]} (stride {grid['stride']}, footprint "
                               f"{grid['footprint']}; {grid['source']})" if grid else "none (no patch embedding found)"),
                ("pickle scan", _pickle_line(d["pickle_scan"])),
            ]
            meta = d["metadata"]
            for k in ("dataset", "clean_acc", "attack_success_rate"):
                if k in meta:
                    rows.append((k, str(meta[k])))
            if d["original_trigger"]:
                ot = d["original_trigger"]
                rows.append(("original trigger", f"{ot['attack']} → class {ot['target']} (lab model)"))
            for k, v in rows:
                t.add_row(k, escape(str(v)))
            out.print(t)
            for n in d["notes"]:
                out.print(f"note: {escape(n)}")
        ps = lm.pickle_scan
        return EXIT_FINDING if ps is not None and ps.dangerous else EXIT_CLEAN

    run_guarded(body)


def _pickle_line(ps: dict[str, Any] | None) -> str:
    if ps is None:
        return "not a pickle-based format (nothing to scan)"
    if not ps["findings"] and not ps["error"]:
        return f"clean ({ps['scanner']}, {ps['scanned_files']} pickle(s))"
    found = ", ".join(f["ref"] for f in ps["findings"])
    return f"DANGEROUS: {found}" + (f"; {ps['error']}" if ps["error"] else "")


def resolve_data(data: Path | None, lm: Any) -> Path:
    """--data, or the clean samples bundled with a sample model (metadata key ``samples``)."""
    if data is not None:
        return data
    rel = lm.wrapper.info.metadata.get("samples")
    if rel:
        p = (lm.path.parent / str(rel)).resolve()
        if p.exists():
            return p
    raise UsageError(f"no clean data given for {lm.path.name}",
                     "pass --data with a folder (one sub-folder per class) or an .npz of clean images")


@app.command("scan")
def scan_cmd(
    model: Annotated[Path, typer.Argument(help="Model file (.safetensors, .pt/.pth, TorchScript, .pt2, .onnx).")],
    data: Annotated[Path | None, typer.Option("--data", help="Clean images: a folder (one sub-folder per class) or .npz.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="Pixel-level, patch-level (token grid) or both.")] = Mode.both,
    budget_name: Annotated[str, typer.Option("--budget", help=_BUDGET_HELP)] = DEFAULT_BUDGET,
    steps: Annotated[int | None, typer.Option("--steps", help="Override the budget's maximum steps.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="Override the number of clean samples used.")] = None,
    samples_per_class: Annotated[int | None, typer.Option("--samples-per-class", help="Read at most this many images per class.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Anomaly index above which a class is flagged.")] = 2.0,
    precision: Annotated[Precision | None, typer.Option("--precision", help=(
        "Arithmetic of the model during trigger inversion: auto (bf16 for a CNN on a CPU with bf16 instructions, "
        "else fp32), fp32 or bf16 (emulated and about 10x slower on a CPU without bf16 instructions). Default: "
        "the budget's (auto; fp32 for original)."))] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help=(
        "Inversions run at once on a CPU, each on its share of the cores (default: one per torch thread, up to "
        "the scan's inversions: 2 for --mode both). Results do not depend on it."))] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write scan.json, triggers.npz and PNGs here.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scan document (JSON) here.")] = None,
    sarif_path: Annotated[Path | None, typer.Option("--sarif", help="Write SARIF 2.1.0 here.")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the self-contained HTML report here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling, initialisation and batch order.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="suspect: exit 1 on findings; never: always exit 0 when the scan ran.")
    ] = FailOn.suspect,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but the verdict.")] = False,
    activations: Annotated[bool, typer.Option("--activations/--no-activations", help="Compute activation statistics (report).")] = True,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Scan a model for a backdoor with pixel- and patch-level Neural Cleanse.

    Exit codes: 0 clean; 1 backdoor suspected or unsafe serialization; 2 usage error; 3 cannot load; 4 internal error.
    """

    def body() -> int:
        opts = load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle)
        outputs = [p for p in (out_dir, json_path, sarif_path, report_path) if p is not None]
        inputs = [model] + ([data] if data is not None else [])
        from bdscan.io.atomic import check_output_path, refuse_input_overwrite

        for o in outputs:
            refuse_input_overwrite(o, inputs)
            check_output_path(o, folder=o is out_dir)  # before the scan, not after it
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device {device!r}", "use cpu or cuda")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda but no CUDA GPU is available", "use --device cpu")
        try:
            return _scan(opts)
        except UnsafeModelError as e:
            _write_unsafe_outputs(e)
            raise

    def _write_unsafe_outputs(e: UnsafeModelError) -> None:
        # A pipeline still gets machine-readable output when the file is refused as unsafe.
        from bdscan.io.base import sha256_file
        from bdscan.report.json_report import SCHEMA, versions
        from bdscan.report.outdir import write_json

        doc = {"schema": SCHEMA, "versions": versions(), "seed": seed,
               "model": {"file": model.name, "sha256": sha256_file(model), "format": e.fmt,
                         "pickle_scan": {"scanner": e.scanner, "dangerous": True, "error": None, "scanned_files": 1,
                                         "findings": [{"ref": f, "severity": "dangerous", "location": model.name}
                                                      for f in e.findings]}},
               "verdict": {"status": "unsafe", "target": None, "reason": e.message},
               "modes": {}, "activations": None, "repair": None, "timings": {}}
        if json_path:
            write_json(json_path, doc)
        if out_dir:
            write_json(out_dir / "scan.json", doc)
        write_renderings(doc, model, sarif_path, report_path)

    def _scan(opts: Any) -> int:
        import torch

        from bdscan.data import load_clean_data
        from bdscan.io import load_model
        from bdscan.report.json_report import example_image
        from bdscan.report.outdir import write_json, write_scan_dir

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        lm = load_model(model, opts, fmt)
        info = lm.wrapper.info
        data_path = resolve_data(data, lm)
        clean = load_clean_data(data_path, info.input_size, info.num_classes, info.class_names, samples_per_class, seed)
        doc, findings = scan_pipeline(lm, clean, data_path, mode, budget_name, steps, samples, threshold, device, seed,
                                      quiet, activations, precision.value if precision else None, workers)
        doc["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        if out_dir:
            write_scan_dir(out_dir, doc, findings, example_image(clean, findings.verdict.target))
        if json_path:
            write_json(json_path, doc)
        write_renderings(doc, model, sarif_path, report_path)
        print_scan(doc, quiet)
        suspect = doc["verdict"]["status"] == "backdoor"
        return EXIT_FINDING if suspect and fail_on == FailOn.suspect else EXIT_CLEAN

    run_guarded(body)


def scan_pipeline(lm: Any, clean: Any, data_path: Path, mode: Mode, budget_name: str, steps: int | None, samples: int | None,
                  threshold: float, device: str, seed: int, quiet: bool, activations: bool,
                  precision: str | None = None, workers: int | None = None) -> tuple[dict[str, Any], Any]:
    """Runs the scan with progress bars and returns (scan document, findings)."""
    from bdscan.detect.config import budget
    from bdscan.detect.scan import ScanConfig, scan
    from bdscan.errors import UnsafeModelError
    from bdscan.report.json_report import scan_document

    if lm.pickle_scan is not None and lm.pickle_scan.dangerous:  # loaders refuse these; belt and braces
        raise UnsafeModelError(f"{lm.path.name}: dangerous pickle imports", [f.ref for f in lm.pickle_scan.findings],
                               fmt=lm.format, scanner=lm.pickle_scan.scanner)
    info = lm.wrapper.info
    over: dict[str, Any] = {"seed": seed}
    if steps is not None:
        over["steps"] = steps
    if samples is not None:
        over["samples"] = samples
    if precision is not None:
        over["precision"] = precision
    inv = budget(budget_name).with_(**over).validate()
    modes = MODES if mode == Mode.both else (mode.value,)
    cfg = ScanConfig(modes=modes, budget=budget_name, inversion=inv, threshold=threshold, device=device, workers=workers)
    from bdscan.detect.inversion import bf16_emulated, resolve_precision

    if bf16_emulated(inv.precision, device):  # shown even with -q: it explains a scan ten times slower than usual
        err.print("[yellow]warning[/]: this CPU has no native bf16 instructions (AVX512-BF16 or AMX), so "
                  "--precision bf16 runs emulated, about 10× slower than fp32; use --precision auto")
    if not quiet:
        grid = info.token_grid
        prec = resolve_precision(inv.precision, lm.wrapper, device)
        err.print(f"[bold]{escape(lm.path.name)}[/]: {lm.format}, {escape(info.arch)}, {info.num_classes} classes, "
                  f"{len(clean)} clean images from {escape(data_path.name)}; budget {budget_name} ({prec}); "
                  f"modes {', '.join(modes)}")
        if "patch" in modes:
            sweep = "/".join(map(str, cfg.cnn_patch_sizes))
            shifted = " and half-patch offsets" if cfg.cnn_patch_offsets else ""
            err.print("token grid: " + (f"{grid.grid[0]}×{grid.grid[1]}, stride {grid.stride} ({escape(grid.source)})" if grid
                                        else f"none found: sweeping {sweep}-pixel grids{shifted}"))
    with progress_bar(not quiet) as bar:
        tasks: dict[str, Any] = {}

        def cb(name: str, done: int, total: int, stats: dict[str, float]) -> None:
            if bar is None:
                return
            if name not in tasks:
                tasks[name] = bar.add_task(f"{name:>14}", total=total, info="")
            bar.update(tasks[name], completed=done,
                       info=f"step {int(stats.get('step', 0))}, {int(stats.get('active', 0))} active, "
                            f"λ {stats.get('mean_lambda', 0):.1e}, success {stats.get('mean_success', 0):.0%}")

        findings = scan(lm.wrapper, clean, cfg, cb)
    doc = scan_document(lm, clean, findings, seed)
    if activations:
        doc["activations"] = _activations(lm, clean, findings)
    return doc, findings


def write_renderings(doc: dict[str, Any], model: Path, sarif_path: Path | None, report_path: Path | None) -> None:
    """SARIF and HTML renderings of a scan document (atomic writes)."""
    from bdscan.io.atomic import atomic_write_text
    from bdscan.report.outdir import write_json

    if sarif_path:
        from bdscan.report.sarif import to_sarif

        write_json(sarif_path, to_sarif(doc, model.resolve().as_uri()))
    if report_path:
        from bdscan.report.html import render_html

        atomic_write_text(report_path, render_html(doc))


def _activations(lm: Any, clean: Any, findings: Any) -> dict[str, Any] | None:
    try:
        from bdscan.analysis.activations import activations_section
    except ImportError:  # the analysis plug-in is optional
        return None
    return activations_section(lm.wrapper, clean, findings, lm.original_trigger)


def print_scan(doc: dict[str, Any], quiet: bool) -> None:
    """The console verdict and per-label tables."""
    v = doc["verdict"]
    names = doc["model"]["class_names"]
    if v["status"] == "backdoor":
        line = (f"[bold red]BACKDOOR SUSPECTED[/]: target class {v['target']} ({escape(str(v['target_name']))}), "
                f"anomaly index {v['anomaly_index']:.2f} ({v['basis']} level, threshold {v['threshold']:g})")
    elif v["status"] == "clean":
        line = f"[bold green]CLEAN[/]: no backdoor found (highest anomaly index {v['anomaly_index']:.2f} ≤ {v['threshold']:g})"
    else:
        line = f"[bold yellow]INCONCLUSIVE[/]: {escape(v['reason'])}"
    if quiet:
        out.print(line)
        return
    for mode, m in doc["modes"].items():
        a = m["anomaly"]
        t = Table(title=f"{mode} level: {m['statistic']} per class (smallest first)")
        for c in ("class", "name", "size", "anomaly index", "success", "steps", ""):
            t.add_column(c, justify="right" if c in ("size", "anomaly index", "success", "steps") else "left")
        rows = sorted(m["labels"], key=lambda r: (r["norm"] is None, r["norm"] or 0.0, r["label"]))
        for r in rows:
            flag = "[red]flagged[/]" if r["flagged"] else ("[yellow]never succeeded[/]" if not r["succeeded"] else "")
            t.add_row(str(r["label"]), escape(names[r["label"]]), "-" if r["norm"] is None else f"{r['norm']:.2f}",
                      f"{r['anomaly_index']:.2f}", f"{r['success_rate']:.0%}", str(r["steps"]), flag)
        out.print(t)
        out.print(f"{mode}: median {a['median']:.2f}, MAD {a['mad']:.2f}, anomaly index {a['anomaly_index']:.2f} "
                  f"(class {a['min_label']})" if a["conclusive"] else f"{mode}: inconclusive (fewer than 3 classes reachable)")
    if len(doc["modes"]) > 1:
        out.print("pixel and patch levels " + ("agree" if v.get("modes_agree") else "disagree") + " on the smallest class")
    out.print(line)


@app.command("report")
def report_cmd(
    scan_dir: Annotated[Path, typer.Argument(help="A scan folder (with scan.json) or a scan JSON file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")],
    sarif_path: Annotated[Path | None, typer.Option("--sarif", help="Also write SARIF 2.1.0 here.")] = None,
) -> None:
    """Re-render the HTML report (and SARIF) from a scan's JSON."""

    def body() -> int:
        from bdscan.io.atomic import atomic_write_text, refuse_input_overwrite
        from bdscan.report.html import render_html
        from bdscan.report.outdir import write_json

        src = scan_dir / "scan.json" if scan_dir.is_dir() else scan_dir
        for o in (output, sarif_path):
            if o is not None:
                refuse_input_overwrite(o, [src])
        try:
            doc = json.loads(src.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{src}: not a readable scan JSON", "point to the folder written by `bdscan scan --out`") from e
        if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("bdscan.scan/"):
            raise LoadError(f"{src}: not a bdscan scan document", "point to the folder written by `bdscan scan --out`")
        try:  # a hand-edited or partial document must not crash the renderers (render both before writing either)
            html = render_html(doc)
            if sarif_path:
                from bdscan.report.sarif import to_sarif

                sarif = to_sarif(doc, doc["model"].get("file", "model"))
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            detail = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
            raise LoadError(f"{src}: the scan document is incomplete or malformed ({type(e).__name__}: {detail})",
                            "re-run `bdscan scan --out` to get a complete document") from e
        atomic_write_text(output, html)
        if sarif_path:
            write_json(sarif_path, sarif)
        out.print(f"wrote {output}")
        return EXIT_CLEAN

    run_guarded(body)


@app.command("repair")
def repair_cmd(
    model: Annotated[Path, typer.Argument(help="The backdoored model file.")],
    out_path: Annotated[Path, typer.Option("--out", help="Repaired model: .safetensors, .onnx or .pt (TorchScript).")],
    data: Annotated[Path | None, typer.Option("--data", help="Clean images (folder or .npz); split into repair and held-out parts.")] = None,
    scan_dir: Annotated[Path | None, typer.Option("--scan", help="A scan folder (bdscan scan --out) of this model; else a scan runs first.")] = None,
    trigger: Annotated[str, typer.Option("--trigger", help="reversed (the scan's), original (a lab model's own), or an .npz file.")] = "reversed",
    level: Annotated[str | None, typer.Option("--level", help="pixel or patch reversed trigger (default: the one the verdict rests on).")] = None,
    label: Annotated[int | None, typer.Option("--label", help="Repair this class's reversed trigger instead of the suspected target.")] = None,
    method: Annotated[str, typer.Option("--method", help="unlearn (fine-tune with the stamped trigger) or prune (penultimate neurons).")] = "unlearn",
    epochs: Annotated[int, typer.Option("--epochs", help="Unlearning epochs over the repair images.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Unlearning learning rate.")] = 1e-3,
    stamp_fraction: Annotated[float, typer.Option("--stamp-fraction", help="Share of repair images stamped (true labels kept).")] = 0.2,
    holdout: Annotated[float, typer.Option("--holdout", help="Share of the clean images held out for measuring.")] = 0.3,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Refuse to export if clean accuracy drops by more points.")] = 3.0,
    force: Annotated[bool, typer.Option("--force", help="Export even when the accuracy drop exceeds the tolerance.")] = False,
    mode: Annotated[Mode, typer.Option("--mode", help="Levels of the scan run when --scan is not given.")] = Mode.both,
    budget_name: Annotated[str, typer.Option("--budget", help="Budget of the scan run when --scan is not given.")] = DEFAULT_BUDGET,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scan document with its repair section here.")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the HTML report (with a repair section) here.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the before/after line.")] = False,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Unlearn (or prune) a backdoor, measure it before and after, and export the repaired model.

    Exit codes: 0 repaired and exported; 1 unsafe serialization; 2 usage error (also: export refused because
    clean accuracy dropped more than --tolerance; --force overrides); 3 cannot load; 4 internal error.
    """

    def body() -> int:
        import torch

        from bdscan.data import load_clean_data
        from bdscan.io import load_model
        from bdscan.io.atomic import check_output_path, refuse_input_overwrite
        from bdscan.repair import (
            RepairConfig,
            export_repaired,
            repair,
            reversed_trigger_from_findings,
            reversed_trigger_from_scan,
            trigger_from_file,
        )
        from bdscan.report.outdir import write_json

        opts = load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle)
        inputs = [model, data, scan_dir] + ([Path(trigger)] if trigger not in ("reversed", "original") else [])
        for o in (out_path, json_path, report_path):
            if o is not None:
                refuse_input_overwrite(o, inputs)
                check_output_path(o)
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise UsageError(f"--device {device!r} is not available", "use --device cpu")
        if not 0 <= tolerance <= 100:
            raise UsageError(f"--tolerance {tolerance:g} is not in [0, 100] points", "e.g. --tolerance 3")
        cfg = RepairConfig(method=method, epochs=epochs, lr=lr, stamp_fraction=stamp_fraction, holdout_fraction=holdout,
                           seed=seed, max_acc_drop=tolerance / 100, device=device).validate()
        torch.manual_seed(seed)
        lm = load_model(model, opts, fmt)
        info = lm.wrapper.info
        data_path = resolve_data(data, lm)
        clean = load_clean_data(data_path, info.input_size, info.num_classes, info.class_names, None, seed)
        doc: dict[str, Any] | None = None
        if trigger == "original":
            if lm.original_trigger is None:
                raise UsageError(f"{model.name} carries no original trigger", "only lab models do; use --trigger reversed")
            trig = lm.original_trigger
        elif trigger == "reversed":
            if scan_dir is not None:
                trig = reversed_trigger_from_scan(scan_dir, level, expected_sha256=lm.sha256, label=label)
                try:
                    src = scan_dir / "scan.json" if scan_dir.is_dir() else scan_dir
                    doc = json.loads(src.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    doc = None
            else:
                doc, findings = scan_pipeline(lm, clean, data_path, mode, budget_name, None, None, 2.0, device, seed, quiet, False)
                trig = reversed_trigger_from_findings(findings, level, label=label)
        else:
            trig = trigger_from_file(Path(trigger))
        with progress_bar(not quiet) as bar:
            result = repair(lm.wrapper, clean, trig, cfg, original=lm.original_trigger, progress=_progress_cb(bar, f"{method}"))
        print_repair(result.to_dict(), quiet)
        rep = result.to_dict()
        if doc is not None:
            doc["repair"] = rep
        else:  # a repair without a scan still gets a document the report can render
            from bdscan.report.json_report import SCHEMA, model_section, versions

            doc = {"schema": SCHEMA, "versions": versions(), "seed": seed, "model": model_section(lm),
                   "data": {"source": str(data_path), "images": len(clean)}, "config": {}, "modes": {},
                   "verdict": {"status": "inconclusive", "target": trig.target, "reason": "No scan was run; repair only."},
                   "activations": None, "repair": rep, "timings": {}}
        if json_path:
            write_json(json_path, doc)
        write_renderings(doc, model, None, report_path)
        export_repaired(result, out_path, lm.path, lm.sha256,
                        {"scan": str(scan_dir) if scan_dir else None, "trigger_source": trigger}, force=force)
        if not quiet:
            out.print(f"wrote {out_path}")
        return EXIT_CLEAN

    run_guarded(body)


def print_repair(rep: dict[str, Any], quiet: bool) -> None:
    b, a = rep["before"], rep["after"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    line = (f"repair ({rep['method']}): clean accuracy {pct(b['clean_accuracy'])} → {pct(a['clean_accuracy'])}, "
            f"attack success (reversed trigger) {pct(b['asr_reversed'])} → {pct(a['asr_reversed'])}"
            + (f", (original trigger) {pct(b['asr_original'])} → {pct(a['asr_original'])}" if b.get("asr_original") is not None else ""))
    if quiet:
        out.print(line)
        return
    t = Table(title=f"repair by {rep['method']} on {rep['holdout_images']} held-out images")
    for c in ("", "before", "after"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("clean accuracy", pct(b["clean_accuracy"]), pct(a["clean_accuracy"]))
    t.add_row("attack success, reversed trigger", pct(b["asr_reversed"]), pct(a["asr_reversed"]))
    if b.get("asr_original") is not None:
        t.add_row("attack success, original trigger", pct(b["asr_original"]), pct(a["asr_original"]))
    out.print(t)
    out.print(line)


@app.command("study")
def study_cmd(
    manifest: Annotated[Path, typer.Argument(help="Zoo manifest (e.g. sample_models/zoo.json).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Study folder: study.md, study.html, study.json, figures/, models/.")],
    models: Annotated[list[str] | None, typer.Option("--models", help="Only these zoo models (repeatable).")] = None,
    budget_name: Annotated[str, typer.Option("--budget", help="Scan budget for every model.")] = DEFAULT_BUDGET,
    repair_epochs: Annotated[int, typer.Option("--repair-epochs", help="Unlearning epochs (Tables 4-5).")] = 8,
    no_repair: Annotated[bool, typer.Option("--no-repair", help="Skip Tables 4-5.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Rerun the research paper's experiments (Tables 1-9, Figures 3-5) on a model zoo; resumable."""

    def body() -> int:
        from bdscan.detect.config import budget
        from bdscan.io.atomic import refuse_input_overwrite
        from bdscan.study import StudyConfig, run_study, write_study

        refuse_input_overwrite(out_dir, [manifest])
        if not manifest.is_file():
            raise LoadError(f"{manifest}: no such manifest", "point to a zoo manifest such as sample_models/zoo.json")
        budget(budget_name)
        cfg = StudyConfig(budget=budget_name, seed=seed, repair=not no_repair, repair_epochs=repair_epochs,
                          models=tuple(models) if models else None, device=device).validate()
        with progress_bar(not quiet) as bar:
            task: list[Any] = []

            def cb(name: str, done: int, total: int) -> None:
                if bar is None:
                    return
                if not task:
                    task.append(bar.add_task("study", total=total, info=""))
                bar.update(task[0], completed=done, total=total, info=name)

            result = run_study(manifest, out_dir, cfg, cb)
        paths = write_study(result, out_dir)
        out.print(f"studied {len(result.computed)} model(s), reused {len(result.reused)}, skipped {len(result.skipped)}; "
                  f"wrote {paths['markdown']}")
        return EXIT_CLEAN

    run_guarded(body)


def _progress_cb(bar: Progress | None, title: str) -> Callable[[int, int, dict[str, Any]], None]:
    """A ``progress(done, total, stats)`` callback drawing one rich bar."""
    task: list[Any] = []

    def cb(done: int, total: int, stats: dict[str, Any]) -> None:
        if bar is None:
            return
        if not task:
            task.append(bar.add_task(title, total=total, info=""))
        info = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(stats.items())[:4])
        bar.update(task[0], completed=done, total=total, info=info)

    return cb


@lab_app.command("train")
def lab_train_cmd(
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see `bdscan models`).")],
    data: Annotated[Path, typer.Option("--data", help="Training .npz with x_train/y_train/x_test/y_test (uint8 NHWC).")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .safetensors.")],
    epochs: Annotated[int | None, typer.Option("--epochs", help="Default: per architecture.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Default: per architecture.")] = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="CNN teacher for DeiT's distillation token.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads while training.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train a clean model from scratch (seeded; held-out accuracy stored in its metadata)."""

    def body() -> int:
        from bdscan.io import load_model, save_safetensors
        from bdscan.io.atomic import refuse_input_overwrite
        from bdscan.lab import TrainConfig, train_clean

        refuse_input_overwrite(out_path, [data, teacher])
        if out_path.suffix != ".safetensors":
            raise UsageError(f"--out {out_path.name}: the lab writes .safetensors", "use a .safetensors file name")
        t = load_model(teacher).wrapper if teacher else None
        cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, threads=threads, teacher=t)
        with progress_bar(not quiet) as bar:
            res = train_clean(arch, data, cfg, _progress_cb(bar, f"training {arch}"))
        save_safetensors(res.wrapper, out_path)
        out.print(f"wrote {out_path}: clean test accuracy {res.clean_acc:.1%} ({res.seconds:.0f} s)")
        return EXIT_CLEAN

    run_guarded(body)


@lab_app.command("inject")
def lab_inject_cmd(
    model: Annotated[Path, typer.Option("--model", help="The clean model (.safetensors made by `bdscan lab train`).")],
    data: Annotated[Path, typer.Option("--data", help="The training .npz the clean model was trained on.")],
    attack: Annotated[str, typer.Option("--attack", help="badnets, blended or trojan.")],
    target: Annotated[int, typer.Option("--target", help="Target class.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .safetensors (carries the original trigger).")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Attack parameter key=value, repeatable "
                                                   "(e.g. size=4, position=bottom-right, pattern=checkerboard, alpha=0.1).")] = None,
    poison_rate: Annotated[float, typer.Option("--poison-rate", help="Share of poisoned fine-tuning images.")] = 0.1,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Default: per architecture.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads while training.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Inject a backdoor (BadNets, Blended, Trojan attack) by fine-tuning on poisoned data."""

    def body() -> int:
        from bdscan.io import load_model, save_safetensors
        from bdscan.io.atomic import refuse_input_overwrite
        from bdscan.lab import AttackConfig, InjectConfig, inject, parse_attack_params

        refuse_input_overwrite(out_path, [model, data])
        if out_path.suffix != ".safetensors":
            raise UsageError(f"--out {out_path.name}: the lab writes .safetensors", "use a .safetensors file name")
        if not 0 < poison_rate < 1:
            raise UsageError(f"--poison-rate {poison_rate} is not in (0, 1)", "e.g. --poison-rate 0.1")
        clean = load_model(model).wrapper
        if not 0 <= target < clean.num_classes:
            raise UsageError(f"--target {target} is not a class of the model (0..{clean.num_classes - 1})", "pick a class index")
        cfg = AttackConfig(attack, target, parse_attack_params(attack, param or []))
        icfg = InjectConfig(poison_rate=poison_rate, epochs=epochs, seed=seed, threads=threads)
        with progress_bar(not quiet) as bar:
            res = inject(clean, data, cfg, icfg, _progress_cb(bar, f"injecting {attack}"))
        save_safetensors(res.wrapper, out_path, trigger=res.trigger)
        out.print(f"wrote {out_path}: clean accuracy {res.clean_acc:.1%} (clean twin {res.clean_twin_acc:.1%}), "
                  f"attack success {res.asr:.1%}")
        return EXIT_CLEAN

    run_guarded(body)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
