"""What the command line shows: rich consoles, progress bars and the tables of a scan, an inspection and a repair.

Only the CLI imports this module; the library reports through :class:`bdscan.pipeline.ScanEvents` and logging.
It imports no torch, so that ``bdscan --help`` is quick: what needs the report modules imports them where it is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bdscan.events import ScanEvents, ScanPlan

if TYPE_CHECKING:
    from bdscan.models.cost import ScanEstimate

# soft_wrap: a verdict or error line is never broken, so pipelines can grep it
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transient rich progress display on stderr (None when disabled): done, per cent, elapsed and time left."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=err, transient=True) as p:
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
    """Shows a scan's plan, warnings and one progress bar for the whole detection.

    The bar counts optimisation steps: every inversion (one per level, and per grid of a CNN's patch sweep)
    reports its label-steps (:data:`bdscan.detect.inversion.Progress`), and the bar shows their sum against the
    total planned for all inversions, so it moves with every step, across levels that run side by side or one
    after the other, and rich estimates the time left from its pace. When every inversion is done the bar says
    what the scan is still doing (activation statistics, writing the report).
    """

    def __init__(self, bar: Progress | None, quiet: bool) -> None:
        self.bar, self.quiet = bar, quiet
        self.task: Any = None
        self.parts: dict[str, tuple[int, int, dict[str, float]]] = {}
        self.expected = 0  # label-steps of every planned inversion (0: unknown until they report)
        self.lock = threading.Lock()  # progress arrives from the inversions' threads

    def planned(self, plan: ScanPlan) -> None:
        self.expected = planned_steps(plan)
        if not self.quiet:
            for line in plan_lines(plan):
                err.print(line)
        for note in plan.model.notes:  # shown even with --quiet, as every warning
            if note.startswith(OVERRIDE_NOTE):
                self.warning(note)

    def progress(self, task: str, done: int, total: int, stats: dict[str, float]) -> None:
        if self.bar is None:
            return
        with self.lock:
            self.parts[task] = (done, total, stats)
            done_all = sum(d for d, _, _ in self.parts.values())
            total_all = max(self.expected, sum(t for _, t, _ in self.parts.values()))
            if self.task is None:
                self.task = self.bar.add_task("scanning", total=total_all, info="")
            finished = done_all >= total_all
            look = max((int(st.get("look", 0)) for _, _, st in self.parts.values()), default=0)
            doing = {0: "scanning", 1: "first look", 2: "second look (first in doubt)"}[look]
            info = " · ".join(f"{name} step {int(st.get('step', 0))}/{int(st.get('steps', 0))}"
                              + (f", {int(st.get('labels_done', 0))}/{int(st.get('labels', 0))} classes done" if st.get("labels") else "")
                              for name, (_, _, st) in self.parts.items())
            self.bar.update(self.task, completed=done_all, total=total_all,
                            description="finishing (activation statistics, report)" if finished else doing,
                            info="" if finished else info)

    def warning(self, message: str) -> None:
        err.print(f"[yellow]warning[/]: {escape(message)}")


#: loader notes that start with this are shown as warnings (a command-line option overrode what the model says)
OVERRIDE_NOTE = "--patch-size"


def planned_steps(plan: ScanPlan) -> int:
    """Label-steps of every inversion Neural Cleanse will run (0 when it does not run): levels × grids × labels × steps."""
    nc = plan.configs.get("neural-cleanse")
    if nc is None:
        return 0
    from bdscan.detect.scan import params_for

    labels = len(nc.labels) if nc.labels is not None else plan.model.wrapper.num_classes
    try:
        inversions = sum(len(params_for(plan.model.wrapper, m, nc.cnn_patch_sizes, nc.cnn_patch_offsets)) for m in nc.modes)
    except Exception:  # the scan itself reports a bad configuration; the bar then sizes itself from the reports
        return 0
    # a two-look scan plans its first look; the bar grows if the scan looks again
    steps = nc.second_look.first_steps if nc.second_look is not None else nc.inversion.steps
    return inversions * labels * int(steps)


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
    if nc is not None and nc.second_look is not None:
        lines.append(f"two looks: a verdict after {nc.second_look.first_steps} steps, and after {nc.inversion.steps} only "
                     f"if that one is in doubt (p between {nc.second_look.alpha_first:g} and {nc.second_look.clean_above:g})")
    if nc is not None and "patch" in nc.modes:
        grid = info.token_grid
        sweep = "/".join(map(str, nc.cnn_patch_sizes))
        shifted = " and half-patch offsets" if nc.cnn_patch_offsets else ""
        lines.append("token grid: " + (f"{grid.grid[0]}×{grid.grid[1]}, stride {grid.stride} ({escape(grid.source)})" if grid
                                       else f"none found: sweeping {sweep}-pixel grids{shifted}"))
    est = plan.estimate
    if est is not None and est.likely_s >= LONG_SCAN_S:
        lines.append(f"[yellow]this scan should take {estimate_text(est)}[/] on this machine (from the model's FLOPs and a "
                     "measured forward+backward rate)")
    return lines


def estimate_text(est: ScanEstimate) -> str:
    """The estimate in words: "about 1 min 5 s (about 3 min 15 s if the first look is in doubt)", or "about 4 min 0 s"
    for a scan that looks once."""
    if est.first_look_s is None:
        return f"about {duration(est.full_s)}"
    return f"about {duration(est.first_look_s)} (about {duration(est.full_s)} if the first look is in doubt)"


#: scans estimated to take longer than this get a line saying so before they start
LONG_SCAN_S = 60.0


def duration(seconds: float) -> str:
    """``95`` -> "1 min 35 s", ``4000`` -> "1 h 7 min"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def verdict_line(doc: dict[str, Any]) -> str:
    """The one-line verdict: with the corrected p-value and α (schema 2), or the anomaly index (schema 1)."""
    v = doc["verdict"]
    p = v.get("p_value")
    by = f"{v['basis']} level" if v.get("basis") else str(v.get("detector") or dig_detector(v))
    look = (doc.get("config") or {}).get("second_look")
    if look and v.get("looks") in (1, 2):  # a two-look schedule: which look decided
        steps = (doc["config"].get("inversion") or {}).get("steps")
        by += f", first look after {look['first_steps']} steps" if v["looks"] == 1 else f", second look after {steps} steps"
    if v["status"] == "backdoor":
        if p is not None:
            index = f", anomaly index {v['anomaly_index']:.2f}" if "anomaly_index" in v else ""
            score = f"{_p(p)} ≤ α = {v['alpha']:g} ({by}{index})"
            return f"[bold red]BACKDOOR SUSPECTED[/]: target class {v['target']} ({escape(str(v['target_name']))}), {score}"
        score = f"anomaly index {v['anomaly_index']:.2f}" if "anomaly_index" in v else v.get("reason", "")
        return (f"[bold red]BACKDOOR SUSPECTED[/]: target class {v['target']} ({escape(str(v['target_name']))}), "
                f"{score} ({by}, threshold {v['threshold']:g})")
    if v["status"] == "clean":
        if p is not None:
            return f"[bold green]CLEAN[/]: no backdoor found (smallest {_p(p)} > α = {v['alpha']:g}, {by})"
        if "anomaly_index" in v:
            return f"[bold green]CLEAN[/]: no backdoor found (highest anomaly index {v['anomaly_index']:.2f} ≤ {v['threshold']:g})"
        return f"[bold green]CLEAN[/]: {escape(v['reason'])}"
    return f"[bold yellow]INCONCLUSIVE[/]: {escape(v['reason'])}"


def dig_detector(v: dict[str, Any]) -> str:
    """The deciding detector's name (schema 2's ``decided_by``), or ""."""
    d = v.get("decided_by")
    return str(d.get("detector", "")) if isinstance(d, dict) else ""


def _p(p: float) -> str:
    """The p-value in words: "p = 0.012", or "p < 0.0001" for a smaller one."""
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.2g}"


def print_scan(doc: dict[str, Any], quiet: bool) -> None:
    """The console verdict and, unless quiet, the per-class tables of each Neural Cleanse level."""
    from bdscan.report.charts import size_words
    from bdscan.report.suggest import repair_command

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
        words = size_words(doc, mode, a.get("min_label"), a.get("min_norm"))
        pv = f"{_p(a['p_value'])}, " if a.get("p_value") is not None else ""
        out.print(f"{mode}: {pv}median {a['median']:.2f}, MAD {a['mad']:.2f}, anomaly index {a['anomaly_index']:.2f} "
                  f"(class {a['min_label']}" + (f"; its trigger: {words}" if words else "") + ")"
                  if a["conclusive"] else f"{mode}: inconclusive (fewer than 3 classes reachable)")
    if len(doc.get("modes") or {}) > 1:
        out.print("pixel and patch levels " + ("agree" if doc["verdict"].get("modes_agree") else "disagree") + " on the smallest class")
    for e in doc["verdict"].get("evidence") or []:  # every other detector's conclusion, in one line each
        if e.get("detector") != "neural-cleanse" and e.get("reason"):
            pv = f" ({_p(e['p_value'])})" if e.get("p_value") is not None and "p = " not in e["reason"] else ""
            out.print(f"{escape(str(e.get('title') or e['detector']))}: {escape(e['reason'])}{pv}")
    out.print(line)
    cmd = repair_command(doc) if doc["verdict"].get("status") == "backdoor" else None
    if cmd:
        out.print(f"to remove it (from this folder): {escape(cmd)}")


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
    """The before/after table of a repair with 95 % intervals, its two checks and a one-line summary."""
    b, a = rep["before"], rep["after"]
    iv = rep.get("intervals") or {}

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def cell(when: str, key: str) -> str:
        ci = (iv.get(when) or {}).get(key)
        return pct(rep[when].get(key)) + (f" ({ci[0]:.0%}–{ci[1]:.0%})" if ci else "")

    passed = rep.get("passed", rep.get("within_tolerance", True))
    line = (f"repair ({rep['method']}): clean accuracy {pct(b['clean_accuracy'])} → {pct(a['clean_accuracy'])}, "
            f"attack success (trigger used) {pct(b['asr_reversed'])} → {pct(a['asr_reversed'])}"
            + (f", (original trigger) {pct(b['asr_original'])} → {pct(a['asr_original'])}" if b.get("asr_original") is not None else "")
            + ("; [bold green]PASSED[/]" if passed else "; [bold red]FAILED[/]"))
    if quiet:
        out.print(line)
        return
    t = Table(title=f"repair by {rep['method']} on {rep['holdout_images']} held-out images (95 % intervals)")
    for c in ("", "before", "after"):
        t.add_column(c, justify="right" if c else "left")
    rows = [("clean accuracy", "clean_accuracy"), ("attack success, trigger used", "asr_reversed"),
            ("attack success, original trigger", "asr_original"), ("sent to the target with no trigger", "target_without_trigger")]
    for title, key in rows:
        if b.get(key) is not None or a.get(key) is not None:
            t.add_row(title, cell("before", key), cell("after", key))
    out.print(t)
    for c in rep.get("checks") or []:
        out.print(("[green]✓[/] " if c["passed"] else "[red]✗[/] ") + f"{c['check']}: {escape(c['text'])}")
    out.print(line)


def warn(message: str) -> None:
    """A warning line on stderr (shown even with --quiet)."""
    err.print(f"[yellow]warning[/]: {escape(message)}")
