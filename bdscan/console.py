"""What the command line shows: rich consoles, progress bars and the tables of a scan, an inspection and a repair.

Only the CLI imports this module; the library reports through :class:`bdscan.pipeline.ScanEvents` and logging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bdscan.pipeline import ScanEvents, ScanPlan

# soft_wrap: a verdict or error line is never broken, so pipelines can grep it
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transient rich progress display on stderr (None when disabled)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err, transient=True) as p:
        yield p


def progress_callback(bar: Progress | None, title: str) -> Callable[[int, int, dict[str, Any]], None]:
    """A ``progress(done, total, stats)`` callback drawing one bar (training, injection, repair)."""
    task: list[Any] = []

    def cb(done: int, total: int, stats: dict[str, Any]) -> None:
        if bar is None:
            return
        if not task:
            task.append(bar.add_task(title, total=total, info=""))
        info = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(stats.items())[:4])
        bar.update(task[0], completed=done, total=total, info=info)

    return cb


class ConsoleEvents(ScanEvents):
    """Shows a scan's plan, warnings and one progress bar per detector task."""

    def __init__(self, bar: Progress | None, quiet: bool) -> None:
        self.bar, self.quiet = bar, quiet
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()  # progress arrives from the inversions' threads

    def planned(self, plan: ScanPlan) -> None:
        if not self.quiet:
            for line in plan_lines(plan):
                err.print(line)

    def progress(self, task: str, done: int, total: int, stats: dict[str, float]) -> None:
        if self.bar is None:
            return
        with self.lock:
            if task not in self.tasks:
                self.tasks[task] = self.bar.add_task(f"{task:>14}", total=total, info="")
            self.bar.update(self.tasks[task], completed=done,
                            info=f"step {int(stats.get('step', 0))}, {int(stats.get('active', 0))} active, "
                                 f"λ {stats.get('mean_lambda', 0):.1e}, success {stats.get('mean_success', 0):.0%}")

    def warning(self, message: str) -> None:
        err.print(f"[yellow]warning[/]: {escape(message)}")


def plan_lines(plan: ScanPlan) -> list[str]:
    """The lines shown before a scan starts: model, data, budget and precision, levels and token grid."""
    lm, info = plan.model, plan.model.wrapper.info
    s = plan.settings
    lines = [f"[bold]{escape(lm.path.name)}[/]: {lm.format}, {escape(info.arch)}, {info.num_classes} classes, "
             f"{len(plan.data)} clean images from {escape(plan.data_path.name)}; budget {s.budget} ({plan.precision}); "
             f"modes {', '.join(s.levels)}"]
    if plan.detectors != ("neural-cleanse",):
        lines.append(f"detectors: {', '.join(plan.detectors)}")
    nc = plan.configs.get("neural-cleanse")
    if nc is not None and "patch" in nc.modes:
        grid = info.token_grid
        sweep = "/".join(map(str, nc.cnn_patch_sizes))
        shifted = " and half-patch offsets" if nc.cnn_patch_offsets else ""
        lines.append("token grid: " + (f"{grid.grid[0]}×{grid.grid[1]}, stride {grid.stride} ({escape(grid.source)})" if grid
                                       else f"none found: sweeping {sweep}-pixel grids{shifted}"))
    return lines


def verdict_line(doc: dict[str, Any]) -> str:
    v = doc["verdict"]
    if v["status"] == "backdoor":
        by = f"{v['basis']} level" if v.get("basis") else str(v.get("detector", ""))
        score = f"anomaly index {v['anomaly_index']:.2f}" if "anomaly_index" in v else v.get("reason", "")
        return (f"[bold red]BACKDOOR SUSPECTED[/]: target class {v['target']} ({escape(str(v['target_name']))}), "
                f"{score} ({by}, threshold {v['threshold']:g})")
    if v["status"] == "clean":
        if "anomaly_index" in v:
            return f"[bold green]CLEAN[/]: no backdoor found (highest anomaly index {v['anomaly_index']:.2f} ≤ {v['threshold']:g})"
        return f"[bold green]CLEAN[/]: {escape(v['reason'])}"
    return f"[bold yellow]INCONCLUSIVE[/]: {escape(v['reason'])}"


def print_scan(doc: dict[str, Any], quiet: bool) -> None:
    """The console verdict and, unless quiet, the per-class tables of each Neural Cleanse level."""
    line = verdict_line(doc)
    if quiet:
        out.print(line)
        return
    names = doc["model"]["class_names"]
    for mode, m in (doc.get("modes") or {}).items():
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
    if len(doc.get("modes") or {}) > 1:
        out.print("pixel and patch levels " + ("agree" if doc["verdict"].get("modes_agree") else "disagree") + " on the smallest class")
    out.print(line)


def pickle_line(ps: dict[str, Any] | None) -> str:
    if ps is None:
        return "not a pickle-based format (nothing to scan)"
    if not ps["findings"] and not ps["error"]:
        return f"clean ({ps['scanner']}, {ps['scanned_files']} pickle(s))"
    found = ", ".join(f["ref"] for f in ps["findings"])
    return f"DANGEROUS: {found}" + (f"; {ps['error']}" if ps["error"] else "")


def print_inspection(d: dict[str, Any], title: str) -> None:
    """``bdscan inspect``'s table of a model section."""
    t = Table(show_header=False, title=title)
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
        ("pickle scan", pickle_line(d["pickle_scan"])),
    ]
    meta = d["metadata"]
    rows += [(k, str(meta[k])) for k in ("dataset", "clean_acc", "attack_success_rate") if k in meta]
    if d["original_trigger"]:
        ot = d["original_trigger"]
        rows.append(("original trigger", f"{ot['attack']} → class {ot['target']} (lab model)"))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    out.print(t)
    for n in d["notes"]:
        out.print(f"note: {escape(n)}")


def print_repair(rep: dict[str, Any], quiet: bool) -> None:
    """The before/after table of a repair and its one-line summary."""
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
