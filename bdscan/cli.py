"""bdscan's command line: argument parsing, console output and exit codes; the work is done by the library.

``scan`` builds a :class:`bdscan.pipeline.ScanRequest` and runs :func:`bdscan.pipeline.run_scan`; ``repair``,
``study`` and ``lab`` live in :mod:`bdscan.commands`. Exit codes are listed in
:mod:`bdscan.commands.common` (and the README): 0 clean, 1 finding, 2 usage error, 3 cannot load, 4 internal error.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bdscan import __version__
from bdscan.commands import guard as guard_commands
from bdscan.commands import lab as lab_commands
from bdscan.commands import repair as repair_commands
from bdscan.commands.common import (
    EXIT_CLEAN,
    EXIT_FINDING,
    EXIT_HELP,
    ArchOpt,
    DetectorsOpt,
    DeviceOpt,
    FormatOpt,
    InputSizeOpt,
    LevelsOpt,
    MeanOpt,
    ModeOpt,
    NumClassesOpt,
    PatchOpt,
    Precision,
    ScaleOpt,
    SeedOpt,
    StdOpt,
    TrustOpt,
    levels_of,
    load_options,
    run_guarded,
)
from bdscan.console import ConsoleEvents, out, print_inspection, print_scan, progress_bar
from bdscan.detect.config import BUDGETS, DEFAULT_ALPHA, DEFAULT_BUDGET, parse_second_look

_BUDGET_HELP = f"{', '.join(BUDGETS)} (default {DEFAULT_BUDGET}; original = Neural Cleanse's own schedule)."

app = typer.Typer(
    name="bdscan",
    help="Find, show and remove neural backdoors in image classifiers.\n\n" + EXIT_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(lab_commands.lab_app, name="lab")
app.command("repair")(repair_commands.repair_cmd)
app.command("guard")(guard_commands.guard_cmd)
app.command("guard-check")(guard_commands.check_cmd)
app.command("study")(lab_commands.study_cmd)


class FailOn(str, Enum):
    never = "never"
    suspect = "suspect"


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


@app.command("detectors")
def detectors_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered detectors (one line each); choose with `bdscan scan --detectors NAME[,NAME]`."""

    def body() -> int:
        from bdscan.detect import DEFAULT_DETECTORS, DETECTORS

        rows = [{"name": d.name, "title": d.title, "summary": d.summary, "reference": d.reference,
                 "sarif_rule": d.sarif_rule.get("id"), "weight": d.weight, "default": d.name in DEFAULT_DETECTORS}
                for d in DETECTORS.values()]
        if as_json:
            out.print_json(json.dumps(rows))
        else:
            for r in rows:
                tags = f"weight {r['weight']:g}" + (", default" if r["default"] else "")
                out.print(f"[bold]{r['name']}[/] ({tags}): {r['summary']}")
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

        lm = load_model(model, load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle), fmt)
        d = model_section(lm)
        if d.get("original_trigger"):
            d["original_trigger"].pop("images", None)
        if as_json:
            out.print_json(json.dumps(d, default=str))
        else:
            print_inspection(d, model.name)
        ps = lm.pickle_scan
        return EXIT_FINDING if ps is not None and ps.dangerous else EXIT_CLEAN

    run_guarded(body)


@app.command("scan")
def scan_cmd(
    model: Annotated[list[Path] | None, typer.Argument(help=(
        "Model file (.safetensors, .pt/.pth, TorchScript, .pt2, .onnx); several, or a folder (walked recursively), "
        "scan each as a Ray task (README, 'Scanning a registry')."))] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Clean images: a folder (one sub-folder per class) or .npz.")] = None,
    levels: LevelsOpt = None,
    mode: ModeOpt = None,
    detectors: DetectorsOpt = None,
    budget_name: Annotated[str, typer.Option("--budget", help=_BUDGET_HELP)] = DEFAULT_BUDGET,
    steps: Annotated[int | None, typer.Option("--steps", help="Override the budget's maximum steps.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="Override the number of clean samples used.")] = None,
    samples_per_class: Annotated[int | None, typer.Option("--samples-per-class", help="Read at most this many images per class.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help=(
        "Neural Cleanse's anomaly-index reference threshold (reported only; the verdict uses --alpha)."))] = 2.0,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help=(
        "Suspect a backdoor when the smallest corrected p-value is at most this (docs/verdict.md: the default was "
        "chosen on the evaluation zoo's calibration half)."))] = DEFAULT_ALPHA,
    precision: Annotated[Precision | None, typer.Option("--precision", help=(
        "Arithmetic of the model during trigger inversion: auto (bf16 for a CNN on a CPU with bf16 instructions, "
        "else fp32), fp32 or bf16 (emulated and about 10x slower on a CPU without bf16 instructions). Default: "
        "the budget's (auto; fp32 for original)."))] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help=(
        "Inversions run at once on a CPU, each on its share of the cores (default: one per torch thread, up to "
        "the scan's inversions: 2 for --levels both). Results do not depend on it."))] = None,
    second_look: Annotated[str, typer.Option("--second-look", metavar="auto|off|STEPS:ALPHA:CLEAN", help=(
        "auto (default): the budget's two-look schedule (fast: judge after 30 steps, run every class on to 90 only "
        "when that verdict is in doubt; docs/verdict.md); off: one look at the budget's steps; STEPS:ALPHA:CLEAN: "
        "judge after STEPS, flag when p <= ALPHA, stop as clean when p > CLEAN, else run on to --steps and judge at "
        "--alpha minus ALPHA."))] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write scan.json, triggers.npz and PNGs here.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scan document (JSON) here.")] = None,
    sarif_path: Annotated[Path | None, typer.Option("--sarif", help="Write SARIF 2.1.0 here.")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the self-contained HTML report here.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="suspect: exit 1 on findings; never: always exit 0 when the scan ran.")
    ] = FailOn.suspect,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but the verdict.")] = False,
    activations: Annotated[bool, typer.Option("--activations/--no-activations", help="Compute activation statistics (report).")] = True,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", help=(
        "Scan the models a manifest lists (JSON, JSON Lines, YAML or CSV: model, data and scan options per row)."))] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=(
        "Run a batch on this Ray cluster (auto, HOST:PORT or ray://HOST:PORT; default: a local Ray)."))] = None,
    cpus_per_model: Annotated[int, typer.Option("--cpus-per-model", min=1, help="CPUs (and torch threads) per model in a batch.")] = 1,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rescan the models a batch in --out already scanned.")] = False,
) -> None:
    """Scan a model for a backdoor (Neural Cleanse at pixel and patch level by default; see `bdscan detectors`).

    Exit codes: 0 clean; 1 backdoor suspected or unsafe serialization; 2 usage error; 3 cannot load; 4 internal error.
    Several models: 1 if any is a finding, else 3 if any could not be scanned, else 0.
    """
    opts = dict(locals())  # every option by name: a batch's defaults
    from bdscan.commands import batch as batch_commands  # here, not at the top: it imports torch (and Ray's glue)

    if batch_commands.wanted(model, manifest):
        run_guarded(lambda: batch_commands.scan_batch(opts))

    def body() -> int:
        from bdscan.detect import ScanSettings, parse_detectors
        from bdscan.pipeline import Outputs, ScanRequest, run_scan

        settings = ScanSettings(budget=budget_name, levels=levels_of(levels, mode), threshold=threshold, alpha=alpha,
                                seed=seed, device=device, workers=workers, steps=steps, samples=samples,
                                precision=precision.value if precision else None,
                                second_look=parse_second_look(second_look))
        req = ScanRequest(model=model[0], data=data,
                          load=load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle),
                          fmt=fmt, settings=settings, detectors=parse_detectors(detectors), samples_per_class=samples_per_class,
                          activations=activations, outputs=Outputs(out_dir, json_path, sarif_path, report_path))
        with progress_bar(not quiet) as bar:
            outcome = run_scan(req, ConsoleEvents(bar, quiet))
        print_scan(outcome.doc, quiet)
        if not quiet:
            for path in outcome.written:
                out.print(f"wrote {path}")
        suspect = outcome.status == "backdoor"
        return EXIT_FINDING if suspect and fail_on == FailOn.suspect else EXIT_CLEAN

    run_guarded(body)


@app.command("report")
def report_cmd(
    scan_dir: Annotated[Path, typer.Argument(help="A scan folder (with scan.json) or a scan JSON file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")],
    sarif_path: Annotated[Path | None, typer.Option("--sarif", help="Also write SARIF 2.1.0 here.")] = None,
) -> None:
    """Re-render the HTML report (and SARIF) from a scan's JSON."""

    def body() -> int:
        from bdscan.errors import LoadError, first_line
        from bdscan.report.outputs import RenderContext, check_targets, write_outputs
        from bdscan.report.scandir import read_document, scan_paths

        targets = {"html": output, "sarif": sarif_path}
        check_targets(targets, [scan_paths(scan_dir)[0]])
        doc = read_document(scan_dir)
        try:  # a hand-edited or partial document must not crash the renderers (all are rendered before any is written)
            uri = (doc.get("invocation") or {}).get("model") or (doc.get("model") or {}).get("file", "model")  # as the scan was given it
            write_outputs(doc, targets, RenderContext(str(uri)))
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise LoadError(f"{scan_dir}: the scan document is incomplete or malformed ({type(e).__name__}: {first_line(e, 100)})",
                            "re-run `bdscan scan --out` to get a complete document") from e
        out.print(f"wrote {output}")
        return EXIT_CLEAN

    run_guarded(body)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
