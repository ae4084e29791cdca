"""Progress is driven by optimisation steps across levels, with the time left (issue #27 item 9)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from bdscan.console import ConsoleEvents, planned_steps, progress_bar
from bdscan.detect import ScanSettings
from bdscan.detect.config import BUDGETS
from bdscan.detect.inversion import invert
from bdscan.detect.params import PixelTrigger
from bdscan.io import load_model
from bdscan.pipeline import ScanEvents, ScanPlan, configure, scan_loaded
from tests.conftest import SIZE


def test_inversion_progress_counts_label_steps_and_ends_at_its_total(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[int, int, dict[str, float]]] = []
    cfg = BUDGETS["smoke"].with_(steps=12, samples=48)
    res = invert(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, PixelTrigger(SIZE, SIZE), [0, 3, 7], cfg,
                 lambda d, t, s: calls.append((d, t, s)))
    assert {t for _, t, _ in calls} == {3 * 12}
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == 36  # moves every step, never back, ends full (early stops count as done)
    assert len(calls) == max(r.steps for r in res.labels)  # one call per optimisation step, not per finished class
    assert done[0] == 3  # after the first step every class has run one step: the bar moves from the start
    assert calls[-1][2]["labels_done"] == 3 and calls[-1][2]["steps"] == 12 and calls[0][2]["step"] == 1


def test_the_sequential_core_reports_in_the_same_units(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[int, int]] = []
    cfg = BUDGETS["smoke"].with_(steps=5, samples=48, batched=False)
    invert(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, PixelTrigger(SIZE, SIZE), [1, 2], cfg, lambda d, t, s: calls.append((d, t)))
    assert calls == [(5, 10), (10, 10)]


class _Recorder(ScanEvents):
    def __init__(self) -> None:
        self.plan: ScanPlan | None = None
        self.calls: list[tuple[str, int, int]] = []

    def planned(self, plan: ScanPlan) -> None:
        self.plan = plan

    def progress(self, task: str, done: int, total: int, stats: dict[str, float]) -> None:
        self.calls.append((task, done, total))


def test_one_bar_sums_both_levels_against_the_planned_total_with_time_left(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    settings = ScanSettings(budget="smoke", steps=6, samples=48, levels=("pixel", "patch"), workers=1)
    rec = _Recorder()
    scan_loaded(lm, tiny_bd.tiny.data, Path("data"), settings, activations=False, events=rec)
    assert rec.plan is not None and planned_steps(rec.plan) == 2 * 10 * 6  # two levels (a CNN: one 4-pixel grid), 10 classes
    assert {t for _, _, t in rec.calls} == {60}
    # replay the events into the console's bar, as the scan runs them (one level after the other here)
    bar = Progress(console=Console(file=io.StringIO()), auto_refresh=False)
    ev = ConsoleEvents(bar, quiet=True)
    ev.expected = planned_steps(rec.plan)
    seen = []
    for task, done, total in rec.calls:
        ev.progress(task, done, total, {"step": 1, "steps": 6})
        seen.append(bar.tasks[0].completed)
    t = bar.tasks[0]
    assert len(bar.tasks) == 1 and t.total == 120  # one bar for the whole scan, sized from the start
    assert seen == sorted(seen) and seen[-1] == 120 and seen[len(seen) // 2] < 120  # never jumps back when the patch level starts
    assert t.description.startswith("finishing")  # what the scan still does after the last step
    assert {type(c).__name__ for c in _columns()} >= {"TimeRemainingColumn", "TaskProgressColumn", "TimeElapsedColumn"}


def _columns() -> list[object]:
    with progress_bar(True) as p:
        assert p is not None
        return list(p.columns)


def test_planned_steps_is_zero_without_neural_cleanse(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    settings = ScanSettings(budget="smoke", steps=3)
    plan = ScanPlan(lm, tiny_bd.tiny.data, Path("d"), settings, ("x",), {}, "fp32")
    assert planned_steps(plan) == 0
    configs = configure(settings, ("neural-cleanse",))
    plan = ScanPlan(lm, tiny_bd.tiny.data, Path("d"), settings, ("neural-cleanse",), configs, "fp32")
    assert planned_steps(plan) == 2 * 10 * 3


class _Looks(_Recorder):
    def progress(self, task: str, done: int, total: int, stats: dict[str, float]) -> None:
        self.calls.append((task, done, total, stats.get("look"), stats.get("steps")))  # type: ignore[arg-type]


def test_a_two_look_scan_plans_its_first_look_and_the_bar_names_each_look(tiny_bd) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(tiny_bd.model)
    # alpha_first tiny, clean_above 1: the first look can neither flag nor stop, so the scan looks twice
    settings = ScanSettings(budget="smoke", steps=6, samples=48, levels=("pixel",), second_look=(2, 1e-300, 1.0))
    rec = _Looks()
    scan_loaded(lm, tiny_bd.tiny.data, Path("data"), settings, activations=False, events=rec)
    assert rec.plan is not None and planned_steps(rec.plan) == 10 * 2  # the first look's label-steps
    first = [c for c in rec.calls if c[3] == 1]
    second = [c for c in rec.calls if c[3] == 2]
    assert first and second and rec.calls == first + second
    assert {(t, s) for _, _, t, _, s in first} == {(20, 2)} and first[-1][1] == 20  # the first look fills its own total
    assert {t for _, _, t, _, _ in second} == {60} and second[-1][1] == 60
    bar = Progress(console=Console(file=io.StringIO()), auto_refresh=False)
    ev = ConsoleEvents(bar, quiet=True)
    ev.expected = planned_steps(rec.plan)
    ev.progress("pixel", first[0][1], first[0][2], {"look": 1})
    assert bar.tasks[0].description == "first look" and bar.tasks[0].total == 20
    ev.progress("pixel", second[0][1], second[0][2], {"look": 2})
    assert bar.tasks[0].description.startswith("second look") and bar.tasks[0].total == 60
