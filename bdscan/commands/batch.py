"""``bdscan scan`` over many models: several MODEL arguments, a folder, or ``--manifest`` (README, "Scanning a
registry"). The work is :func:`bdscan.batch.run_batch`; this module turns the command line into its plan, draws
one progress bar over the models and one line per finished model, and maps the result to an exit code:

* 1 when any model is a finding (backdoor suspected, or an unsafe file), unless ``--fail-on never``;
* else 3 when any model could not be scanned (cannot be loaded, no data, a worker that kept dying);
* else 0. Ctrl-C: 130, after the summary of what finished is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bdscan.batch import BatchEvents, BatchResult, EngineOptions, check_plan_out, plan_batch, run_batch
from bdscan.batch.inputs import is_model_folder
from bdscan.commands.common import EXIT_CLEAN, EXIT_FINDING, EXIT_LOAD, levels_of
from bdscan.console import err, out
from bdscan.errors import UsageError

EXIT_INTERRUPTED = 130
#: scan_cmd's parameter -> the batch option it is the default of (see bdscan.batch.options.OPTIONS)
DEFAULTS = {"data": "data", "detectors": "detectors", "budget_name": "budget", "steps": "steps", "samples": "samples",
            "samples_per_class": "samples_per_class", "threshold": "threshold", "alpha": "alpha", "workers": "workers", "seed": "seed",
            "device": "device", "activations": "activations", "arch": "arch", "num_classes": "num_classes",
            "input_size": "input_size", "mean": "mean", "std": "std", "scale": "scale", "patch_size": "patch_size",
            "trust_pickle": "trust_pickle", "fmt": "format", "second_look": "second_look"}
_STYLE = {"backdoor": "bold red", "unsafe": "bold red", "error": "yellow", "inconclusive": "yellow", "clean": "green"}


def wanted(models: Sequence[Path] | None, manifest: Path | None) -> bool:
    """Whether ``bdscan scan`` runs a batch: several models, a folder, a manifest (or nothing given: its error)."""
    return manifest is not None or not models or len(models) > 1 or (models[0].is_dir() and not is_model_folder(models[0]))


def row_line(r: dict[str, Any]) -> str:
    """One finished model: status, target, scores, seconds, path (and the error)."""
    st = r["status"]
    parts = [f"[{_STYLE.get(st, 'bold')}]{st:<12}[/]"]
    if r.get("target") is not None:
        parts.append(f"class {r['target']}" + (f" ({escape(str(r['target_name']))})" if r.get("target_name") else ""))
    parts += [f"{escape(k)} {v:.2f}" for k, v in (r.get("scores") or {}).items() if isinstance(v, (int, float))]
    parts.append(f"{r.get('seconds') or 0:.1f} s" + (" (cached)" if r.get("cached") else ""))
    parts.append(escape(r["path"]))
    line = "  ".join(parts)
    return line + (f"\n    {escape(str(r['error']))}" if r.get("error") and st != "unsafe" else "")


class ConsoleBatchEvents(BatchEvents):
    """One progress bar over the models (done, flagged, failed, running) and one line per finished model."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.done = self.flagged = self.failed = self.run_now = 0

    def __enter__(self) -> ConsoleBatchEvents:
        if not self.quiet:
            self.bar = Progress(TextColumn("models"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), console=err, transient=True)
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _update(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=self.done,
                            info=f"{self.flagged} flagged, {self.failed} failed, {self.run_now} running")

    def planned(self, total: int, cached: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task("models", total=total, info="")
            if cached:
                self.bar.console.print(f"{cached} of {total} model(s) served from the cache (--no-cache rescans them)")

    def running(self, n: int) -> None:
        self.run_now = n
        self._update()

    def finished(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.flagged += row["status"] in ("backdoor", "unsafe")
        self.failed += row["status"] == "error"
        if self.bar is not None:
            self.bar.console.print(row_line(row))
        self._update()


def summary_line(result: BatchResult, out_dir: Path) -> str:
    c = result.counts
    shown = ", ".join(f"{c[s]} {s}" for s in ("backdoor", "unsafe", "error", "inconclusive", "clean") if c[s])
    cached = f"; {c['cached']} from the cache" if c["cached"] else ""
    head = "[bold red]INTERRUPTED[/]: " if result.interrupted else ""
    return f"{head}{c['total']} model(s): {shown or 'none'}{cached}; see {escape(str(out_dir / 'index.html'))}"


def scan_batch(opts: dict[str, Any]) -> int:
    """The body of ``bdscan scan`` for a batch; ``opts`` is scan_cmd's parameters by name."""
    models = [Path(m) for m in opts["model"] or []]
    if not models and opts["manifest"] is None:
        raise UsageError("no model given", "give MODEL paths, a folder, or --manifest FILE")
    if opts["out_dir"] is None:
        raise UsageError("scanning several models needs --out DIR", "e.g. --out registry-scan (each model's outputs go there)")
    if opts["report_path"] is not None:
        raise UsageError("--report is for one model", "a batch writes DIR/index.html, linking each model's report")
    defaults = {DEFAULTS[k]: opts[k] for k in DEFAULTS if opts[k] is not None}
    if opts["precision"] is not None:
        defaults["precision"] = opts["precision"].value
    if opts["levels"] is not None or opts["mode"] is not None:
        defaults["levels"] = list(levels_of(opts["levels"], opts["mode"]))
    out_dir: Path = opts["out_dir"]
    plan = plan_batch(models, opts["manifest"], defaults, exclude=[out_dir])
    check_plan_out(plan, out_dir)
    quiet = opts["quiet"]
    if not quiet:
        for s in plan.skipped:
            err.print(f"[dim]skipped {escape(s.path)}: {escape(s.reason)}[/]")
    engine = EngineOptions(address=opts["ray_address"], cpus_per_model=opts["cpus_per_model"])
    with ConsoleBatchEvents(quiet) as events:
        result = run_batch(plan, out_dir, engine, events, use_cache=not opts["no_cache"],
                           extra={"json": opts["json_path"], "sarif": opts["sarif_path"]})
    out.print(summary_line(result, out_dir))
    if not quiet:
        for p in result.written:
            out.print(f"wrote {escape(str(p))}")
    if result.interrupted:
        err.print(f"[bold red]bdscan:[/] interrupted; {len(result.summary['not_finished'])} model(s) did not finish, "
                  f"the summary of the others is in {escape(str(out_dir / 'summary.json'))}")
        return EXIT_INTERRUPTED
    if result.findings and opts["fail_on"].value == "suspect":
        return EXIT_FINDING
    return EXIT_LOAD if result.failures else EXIT_CLEAN
