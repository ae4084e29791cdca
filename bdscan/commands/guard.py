"""``bdscan guard`` (build an input guard and export it with the model) and ``bdscan guard-check`` (run one).

Exit codes of ``guard``: 0 guard written; 1 unsafe serialization; 2 usage error, **also: the guard cannot reach
the requested false-positive rate** (too few clean images to set the threshold, or significantly more held-out
clean images flagged than requested; the JSON and HTML reports are still written, the guard is not);
3 model or data cannot be loaded; 4 internal error, also: the guard cannot be exported in that format or the
written file does not reproduce the model (nothing is written; the message names the other format).

Exit codes of ``guard-check``: 0 no input flagged; 1 at least one input flagged (or an unsafe guard file);
2 usage error (not a guard, bad option); 3 guard or inputs cannot be loaded; 4 internal error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from bdscan.commands.common import (
    EXIT_CLEAN,
    EXIT_FINDING,
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
from bdscan.console import ConsoleEvents, err, out, progress_bar
from bdscan.detect.config import DEFAULT_BUDGET
from bdscan.errors import NoSuspectError, UsageError

#: flagged inputs listed on the console before "… and N more"
SHOWN = 30


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _check_outputs(outputs: list[Path | None], inputs: list[Path | None]) -> None:
    from bdscan.atomic import check_outputs

    given = [o for o in outputs if o is not None]
    if len({o.resolve() for o in given}) != len(given):
        raise UsageError("two outputs name the same file", "give --out, --json and --report different paths")
    check_outputs(given, inputs)


def _need_suspect(status: Any, label: int | None) -> None:
    """A reversed trigger needs a suspected target, or a class named with --label."""
    if status != "backdoor" and label is None:
        raise UsageError(f"the scan found no backdoor suspect (verdict: {status or 'unknown'}), so it has no reversed trigger to guard against",
                         "name the class to guard with --label K (the scan's smallest class is the likeliest target), or give --trigger FILE")


def print_guard(g: dict[str, Any], quiet: bool) -> None:
    """The guard's figures on the console (one line when quiet)."""
    t = g["test"]
    line = (f"guard: threshold {g['threshold']}, false positives {_pct(t['clean']['rate'])} of {t['clean']['images']} held-out clean "
            f"images (requested {_pct(g['fpr_requested'])}); flagged {_pct(t['stamped']['rate'])} of {t['stamped']['images']} stamped "
            f"with the guard's trigger")
    if t.get("stamped_original"):
        so = t["stamped_original"]
        line += (f", {_pct(so['rate'])} stamped with the original trigger ({_pct(so.get('flagged_successful'))} of those the "
                 "model sends to the target)")
    out.print(escape(line))
    if quiet:
        return
    layer, n = g["layer"], g["neurons"]
    out.print(escape(f"  layer {layer['kind']} ({', '.join(layer['modules'])}), {n['count']} of {n['of']} neurons; images: "
                     f"{g['split']['fit']} fit, {g['split']['calibration']} calibration, {g['split']['test']} test"))


def guard_cmd(
    model: Annotated[Path, typer.Argument(help="The (backdoored) model file.")],
    out_path: Annotated[Path, typer.Option("--out", help="The guard: .onnx, or .pt (TorchScript).")],
    data: Annotated[Path | None, typer.Option("--data", help="Clean images (folder or .npz); split into fit, calibration and test parts.")] = None,
    scan_dir: Annotated[Path | None, typer.Option("--scan", help="A scan folder (bdscan scan --out) of this model; else a scan runs first.")] = None,
    trigger: Annotated[str, typer.Option("--trigger", help="reversed (the scan's), original (a lab model's own), or an .npz file.")] = "reversed",
    level: Annotated[str | None, typer.Option("--level", help="pixel or patch reversed trigger (default: the one the verdict rests on).")] = None,
    label: Annotated[int | None, typer.Option("--label", help="Use this class's reversed trigger instead of the suspected target.")] = None,
    fpr: Annotated[float, typer.Option("--fpr", help="Requested false-positive rate on clean inputs.")] = 0.05,
    neurons: Annotated[float, typer.Option("--neurons", help="Share of the layer's neurons scored (Neural Cleanse: 0.01; at least 4).")] = 0.01,
    layer: Annotated[str, typer.Option("--layer", help=(
        "penultimate (the classifier's input), tokens (a transformer's token-averaged features) or a module name."))] = "penultimate",
    levels: LevelsOpt = None,
    mode: ModeOpt = None,
    budget_name: Annotated[str, typer.Option("--budget", help="Budget of the scan run when --scan is not given.")] = DEFAULT_BUDGET,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the guard report (JSON) here.")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write the guard report (self-contained HTML) here.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the guard's line.")] = False,
    arch: ArchOpt = None, num_classes: NumClassesOpt = None, input_size: InputSizeOpt = None, mean: MeanOpt = None,
    std: StdOpt = None, scale: ScaleOpt = None, patch_size: PatchOpt = None, trust_pickle: TrustOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Build an input guard (Neural Cleanse's filter) from a trigger, measure it, and export it with the model.

    The exported file takes the model's own input and returns logits, suspicion and flagged (bool).

    Exit codes: 0 guard written; 1 unsafe serialization; 2 usage error, also: the guard cannot reach the requested
    --fpr (reports written, guard not); 3 cannot load; 4 internal error, also: the written guard does not reproduce the
    model (nothing written).
    """

    def body() -> int:
        import dataclasses

        import torch

        from bdscan.detect import ScanSettings
        from bdscan.guard import SUFFIXES, GuardConfig, GuardRateError, build_guard, export_guard, split_guard_data
        from bdscan.guard.report import guard_document, write_html, write_json
        from bdscan.io import load_model
        from bdscan.pipeline import check_device, load_data, scan_loaded
        from bdscan.repair import reversed_trigger_from_detection, reversed_trigger_from_scan, trigger_from_file

        opts = load_options(arch, num_classes, input_size, mean, std, scale, patch_size, trust_pickle)
        scan_levels = levels_of(levels, mode)
        if trigger not in ("reversed", "original") and (scan_dir is not None or label is not None or level is not None):
            raise UsageError("--scan, --level and --label choose a reversed trigger; they do not go with --trigger FILE",
                             "drop them, or use --trigger reversed")
        inputs = [model, data, scan_dir] + ([Path(trigger)] if trigger not in ("reversed", "original") else [])
        if out_path.suffix.lower() not in SUFFIXES:
            raise UsageError(f"{out_path.name}: a guard is written as .onnx or .pt (TorchScript)", "e.g. --out guard.onnx")
        _check_outputs([out_path, json_path, report_path], inputs)
        check_device(device)
        cfg = GuardConfig(fpr=fpr, neurons=neurons, layer=layer, seed=seed, device=device).validate()
        torch.manual_seed(seed)
        lm = load_model(model, opts, fmt)
        data_path, clean = load_data(lm, data, None, seed)
        source: dict[str, Any] = {"trigger_source": trigger, "scan": str(scan_dir) if scan_dir else None}
        if trigger == "original":
            if lm.original_trigger is None:
                raise UsageError(f"{model.name} carries no original trigger", "only lab models do; use --trigger reversed")
            trig = lm.original_trigger
        elif trigger == "reversed" and scan_dir is not None:
            from bdscan.report.scandir import read_document

            try:
                trig = reversed_trigger_from_scan(scan_dir, level, expected_sha256=lm.sha256, label=label)
            except NoSuspectError:  # say it in the guard's words (the repair message speaks of unlearning)
                _need_suspect((read_document(scan_dir).get("verdict") or {}).get("status"), label)
                raise
        elif trigger == "reversed":
            fit, cal, _ = split_guard_data(clean, cfg)  # the scan sees no test image
            scan_part = dataclasses.replace(fit, x=torch.cat([fit.x, cal.x]), y=torch.cat([fit.y, cal.y]))
            settings = ScanSettings(budget=budget_name, levels=scan_levels, seed=seed, device=device)
            with progress_bar(not quiet) as bar:
                doc, det = scan_loaded(lm, scan_part, data_path, settings, activations=False, events=ConsoleEvents(bar, quiet))
            v = doc.get("verdict") or {}
            source.update(scan="(run by guard, on the fit and calibration images)", scan_verdict=v.get("status"),
                          scan_target=v.get("target"), budget=budget_name)
            _need_suspect(v.get("status"), label)
            # the combined verdict's class (another detector may have decided it): Neural Cleanse's trigger for that class
            trig = reversed_trigger_from_detection(det, level, label=label)
        else:
            trig = trigger_from_file(Path(trigger))
        result = build_guard(lm.wrapper, clean, trig, cfg, original=lm.original_trigger)
        g = result.to_dict()
        print_guard(g, quiet)
        export = None
        try:
            result.check()
            extra = {k: v for k, v in source.items() if v is not None}
            export = {"file": out_path.name, **export_guard(result, out_path, lm.path, lm.sha256, extra, inputs)}
        except GuardRateError:
            doc = guard_document(result, lm, clean, source, None)
            for path, write in ((json_path, write_json), (report_path, write_html)):
                if path is not None:
                    write(doc, path)
                    err.print(f"wrote {escape(str(path))} (no guard was written)")
            raise
        doc = guard_document(result, lm, clean, source, export)
        for path, write in ((json_path, write_json), (report_path, write_html)):
            if path is not None:
                write(doc, path)
        if not quiet:
            for path in (out_path, json_path, report_path):
                if path is not None:
                    out.print(f"wrote {escape(str(path))}")
        return EXIT_CLEAN

    run_guarded(body)


def check_cmd(
    guard: Annotated[Path, typer.Argument(help="A guard written by `bdscan guard` (.onnx or .pt).")],
    images: Annotated[Path, typer.Argument(help="Inputs: a folder of images (or class sub-folders) or an .npz (x, optional y).")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every input's suspicion and flag (JSON) here.")] = None,
    trigger: Annotated[str | None, typer.Option("--trigger", help=(
        "Also check the inputs stamped with this trigger: original (needs --model) or an .npz file."))] = None,
    model: Annotated[Path | None, typer.Option("--model", help="The guarded lab model, for --trigger original.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help=f"List every flagged input (default: the first {SHOWN}).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")] = False,
) -> None:
    """Run a saved guard over inputs and say which were flagged (exit 1 if any), e.g. before inference in a pipeline.

    Exit codes: 0 no input flagged; 1 at least one flagged, or an unsafe guard file; 2 usage error; 3 cannot load; 4 internal error.
    """

    def body() -> int:
        import json

        from bdscan.atomic import atomic_write_text
        from bdscan.guard.check import check_inputs, load_guard, load_inputs, require_fit

        if trigger == "original" and model is None:
            raise UsageError("--trigger original needs the guarded lab model", "add --model MODEL")
        if model is not None and trigger != "original":
            raise UsageError("--model is only for --trigger original", "drop --model, or add --trigger original")
        inputs = [guard, images, model] + ([Path(trigger)] if trigger not in (None, "original") else [])
        _check_outputs([json_path], inputs)
        g = load_guard(guard)
        meta = g.meta
        trig = None
        if trigger == "original":
            from bdscan.io import load_model

            assert model is not None
            lm = load_model(model)
            want = (g.guard.get("guarded_from") or {}).get("sha256")
            if want and lm.sha256 != want:
                raise UsageError(f"{guard.name} guards another model (sha256 {str(want)[:12]}…), not {model.name} "
                                 f"(sha256 {lm.sha256[:12]}…)", "give the model the guard was built from")
            if lm.original_trigger is None:
                raise UsageError(f"{model.name} carries no original trigger", "only lab models do; use --trigger FILE")
            trig = require_fit(g, lm.original_trigger)
        elif trigger is not None:
            from bdscan.repair import trigger_from_file

            trig = require_fit(g, trigger_from_file(Path(trigger)))
        names = tuple(str(n) for n in (meta.get("class_names") or []))
        num = int(meta.get("num_classes") or max(len(names), 2))
        inp = load_inputs(images, g.input_size, num, names)
        doc = check_inputs(g, inp, trig)
        flagged = [r for r in doc["inputs"] if r["flagged"]]
        out.print(escape(f"{doc['flagged']} of {doc['images']} inputs flagged by {guard.name} (suspicion above "
                         f"{doc['threshold']}; requested false-positive rate {_pct(doc['fpr_requested'])})"))
        if not quiet:
            shown = flagged if show_all else flagged[:SHOWN]
            for r in shown:
                out.print(escape(f"  flagged: {r['name']} (suspicion {r['suspicion']:.3f}, predicted class {r['predicted']})"))
            if len(shown) < len(flagged):
                out.print(escape(f"  … and {len(flagged) - len(shown)} more (--all lists them, --json writes every input)"))
        st = doc.get("stamped")
        if st is not None:
            out.print(escape(f"stamped with the {st['trigger']} trigger: {st['flagged']} of {st['images']} flagged ({_pct(st['rate'])}); "
                             f"the model sends {_pct(st['attack_success'])} of them to class {st['target']}, and "
                             f"{_pct(st['flagged_successful'])} of those are flagged"))
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(doc, indent=1) + "\n")
            if not quiet:
                out.print(f"wrote {escape(str(json_path))}")
        return EXIT_FINDING if doc["flagged"] else EXIT_CLEAN

    run_guarded(body)
