"""``bdscan repair``: remove a backdoor (unlearning or pruning), measure it before and after, export the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bdscan.commands.common import (
    EXIT_CLEAN,
    ArchOpt,
    DeviceOpt,
    FormatOpt,
    InputSizeOpt,
    LevelsOpt,
    MeanOpt,
    ModeOpt,
    NumClassesOpt,
    PatchOpt,
    ScaleOpt,
    SeedOpt,
    StdOpt,
    TrustOpt,
    levels_of,
    load_options,
    run_guarded,
)
from bdscan.console import ConsoleEvents, out, print_repair, progress_bar, progress_callback, warn
from bdscan.detect.config import DEFAULT_BUDGET
from bdscan.errors import UsageError
from bdscan.repair.config import RepairConfig

_DEFAULTS = RepairConfig()


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
    lr: Annotated[float | None, typer.Option("--lr", help=(
        "Unlearning learning rate (Adam). Default: 0.0003; higher (e.g. 0.001) when the trigger survives, "
        "lower when accuracy drops."))] = None,
    stamp_fraction: Annotated[float, typer.Option("--stamp-fraction", help="Share of repair images stamped in each epoch.")] = (
        _DEFAULTS.stamp_fraction),
    targets: Annotated[str, typer.Option("--targets", help=(
        "What unlearning trains every image towards: model (the input model's own answer on the unstamped image, which "
        "keeps its clean accuracy) or labels (the true labels, as Neural Cleanse)."))] = _DEFAULTS.targets,
    holdout: Annotated[float, typer.Option("--holdout", help="Share of the clean images held out for measuring.")] = _DEFAULTS.holdout_fraction,
    tolerance: Annotated[float, typer.Option("--tolerance", help=(
        "Refuse to export when clean accuracy is shown to drop by more points: when the whole 95 % interval of the "
        "drop lies above it."))] = _DEFAULTS.max_acc_drop * 100,
    max_asr: Annotated[float, typer.Option("--max-asr", help=(
        "Refuse to export when a trigger still sends more than this percentage of held-out images of other classes "
        "to the target after the repair."))] = _DEFAULTS.max_asr * 100,
    force: Annotated[bool, typer.Option("--force", help=(
        "Export even when the repair failed a check (marked as forced in the model and the report)."))] = False,
    levels: LevelsOpt = None,
    mode: ModeOpt = None,
    budget_name: Annotated[str, typer.Option("--budget", help="Budget of the scan run when --scan is not given.")] = DEFAULT_BUDGET,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the scan document with its repair section here.")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the HTML report (with a repair section) here.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the before/after line.")] = False,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Unlearn (or prune) a backdoor, measure it before and after, and export the repaired model.

    Exit codes: 0 repaired and exported; 1 unsafe serialization; 2 usage error (also: export refused because the
    repair failed a check: clean accuracy shown to drop more than --tolerance, or a trigger still working above
    --max-asr; --force overrides); 3 cannot load; 4 internal error.
    """

    def body() -> int:
        import torch

        from bdscan.atomic import check_outputs
        from bdscan.detect import ScanSettings
        from bdscan.io import load_model
        from bdscan.pipeline import check_device, load_data, scan_loaded
        from bdscan.repair import (
            export_repaired,
            repair,
            reversed_trigger_from_detection,
            reversed_trigger_from_scan,
            trigger_from_file,
        )
        from bdscan.repair.export import refusal
        from bdscan.report.json_report import repair_only_document, repair_section
        from bdscan.report.outputs import write_outputs
        from bdscan.report.scandir import read_document

        opts = load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle)
        scan_levels = levels_of(levels, mode)
        inputs = [model, data, scan_dir] + ([Path(trigger)] if trigger not in ("reversed", "original") else [])
        check_outputs((out_path, json_path, report_path), inputs)
        check_device(device)
        if not 0 <= tolerance <= 100:
            raise UsageError(f"--tolerance {tolerance:g} is not in [0, 100] points", "e.g. --tolerance 3")
        if not 0 <= max_asr <= 100:
            raise UsageError(f"--max-asr {max_asr:g} is not in [0, 100] percent", "e.g. --max-asr 10")
        cfg = RepairConfig(method=method, epochs=epochs, lr=lr, stamp_fraction=stamp_fraction, targets=targets,
                           holdout_fraction=holdout, seed=seed, max_acc_drop=tolerance / 100, max_asr=max_asr / 100,
                           device=device).validate()
        torch.manual_seed(seed)
        lm = load_model(model, opts, fmt)
        data_path, clean = load_data(lm, data, None, seed)
        doc: dict[str, Any] | None = None
        if trigger == "original":
            if lm.original_trigger is None:
                raise UsageError(f"{model.name} carries no original trigger", "only lab models do; use --trigger reversed")
            trig = lm.original_trigger
        elif trigger == "reversed":
            if scan_dir is not None:
                trig = reversed_trigger_from_scan(scan_dir, level, expected_sha256=lm.sha256, label=label)
                doc = read_document(scan_dir)
            else:
                settings = ScanSettings(budget=budget_name, levels=scan_levels, seed=seed, device=device)
                with progress_bar(not quiet) as bar:
                    doc, det = scan_loaded(lm, clean, data_path, settings, activations=False,
                                           events=ConsoleEvents(bar, quiet))
                # the combined verdict's class (another detector may have decided it): Neural Cleanse's trigger for that class
                trig = reversed_trigger_from_detection(det, level, label=label)
        else:
            trig = trigger_from_file(Path(trigger))
        with progress_bar(not quiet) as bar:
            result = repair(lm.wrapper, clean, trig, cfg, original=lm.original_trigger, progress=progress_callback(bar, method))
        refused = refusal(result)
        rep = repair_section(result, clean, export={"file": str(out_path), "written": False, "forced": False,
                                                    "refused": refused is not None and not force})
        print_repair(rep, quiet)
        doc = doc if doc is not None else repair_only_document(lm, clean, seed, trig.target)
        doc["repair"] = rep
        reports = {"json": json_path, "html": report_path}
        if refused is not None and not force:  # the measurements are worth keeping even when the model is not
            for path in write_outputs(doc, reports):
                out.print(f"wrote {path}")
            raise refused
        export_repaired(result, out_path, lm.path, lm.sha256,
                        {"scan": str(scan_dir) if scan_dir else None, "trigger_source": trigger}, force=force)
        rep["export"].update(written=True, forced=refused is not None)
        written = [*write_outputs(doc, reports), out_path]
        if refused is not None:
            warn(f"--force: {out_path} was written although the repair failed its {' and '.join(refused.failed)} check; "
                 "its provenance and the report mark it as forced")
        if not quiet:
            for path in written:
                out.print(f"wrote {path}")
        return EXIT_CLEAN

    run_guarded(body)
