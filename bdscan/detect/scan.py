"""Pixel- and patch-level Neural Cleanse over all labels, and the detector's verdict over its levels.

This module is the scan's algorithm: it takes a model wrapper, clean data and a frozen
:class:`ScanConfig`, and returns a :class:`ScanFindings`. It knows nothing of files, the CLI or reports.
The levels are combined by :func:`combine` (Bonferroni over the levels' calibrated p-values; docs/verdict.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from bdscan.data import CleanData
from bdscan.detect.anomaly import AnomalyResult, level_anomaly
from bdscan.detect.base import DEFAULT_ALPHA
from bdscan.detect.config import BUDGET_SECOND_LOOK, BUDGETS, DEFAULT_BUDGET, MODES, SECOND_LOOK_HINT, InversionConfig
from bdscan.detect.inversion import Inversion, InversionResult, LabelResult, invert_prepared, prepared, resolve_precision
from bdscan.detect.params import BlendTrigger, PatchTrigger, PixelTrigger, TriggerParam, cnn_patch_sweep
from bdscan.errors import UsageError
from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: progress(inversion name, label-steps done, label-steps in all, stats): see :data:`bdscan.detect.inversion.Progress`
ScanProgress = Callable[[str, int, int, dict[str, float]], None]


@dataclass(frozen=True)
class SecondLook:
    """A two-look schedule: judge after ``first_steps``, run every class on only when the verdict is borderline.

    Neural Cleanse's masks are often still shrinking when a short schedule ends, and how far each class has got
    depends on the seed (docs/verdict.md, "Unconverged masks"). Running every class longer costs every scan that
    much more; this spends it only where the first verdict is in doubt. After ``first_steps`` the scan flags when its
    p-value is at most ``alpha_first`` and stops as clean when it exceeds ``clean_above``; otherwise every class
    (the same runs, continued: :class:`~bdscan.detect.inversion.Inversion`) goes on to the budget's ``steps`` and is
    judged again. The reported p-value is the first look's times ``alpha / alpha_first`` or the second's times
    ``alpha / (alpha - alpha_first)``: under the null, P(p <= t) <= t·alpha_first/alpha + t·(alpha - alpha_first)/alpha
    = t whatever ``clean_above`` (stopping as clean never adds a flag), so it is a valid p-value compared with
    ``alpha`` like any other.

    Attributes:
        first_steps: steps of the first look (fewer than the budget's).
        alpha_first: the share of alpha spent on the first look (0 < alpha_first < alpha).
        clean_above: a first-look p-value (before the look's correction) above which the scan stops as clean.
    """

    first_steps: int = 30
    alpha_first: float = 0.005
    clean_above: float = 0.5


def check_second_look(look: SecondLook, steps: int, alpha: float) -> None:
    """Raises :class:`UsageError` unless ``look`` fits a budget of ``steps`` steps and the verdict's ``alpha``."""
    if not (0 < look.first_steps < steps and 0 < look.alpha_first < alpha and 0 < look.clean_above <= 1):
        raise UsageError(f"second look {look.first_steps}:{look.alpha_first:g}:{look.clean_above:g} does not fit {steps} "
                         f"steps and α {alpha:g}", "give FIRST_STEPS:ALPHA_FIRST:CLEAN_ABOVE with FIRST_STEPS below the "
                         "budget's steps (--steps), 0 < ALPHA_FIRST < --alpha and 0 < CLEAN_ABOVE <= 1, e.g. 30:0.005:0.5 "
                         "with --steps 90")


def resolve_second_look(value: tuple[int, float, float] | str | None, budget: str, steps: int,
                        alpha: float) -> SecondLook | None:
    """The schedule a scan runs: ``value`` as ``--second-look`` gives it, for a budget of ``steps`` steps.

    Args:
        value: "auto" (the budget's own schedule, :data:`~bdscan.detect.config.BUDGET_SECOND_LOOK`, with its
            share of ``alpha``; one look when the budget has none or ``steps`` do not go past its first look),
            "off" or None (one look), or (first_steps, alpha_first, clean_above) as given.
        budget: the budget's name.
        steps: the resolved steps of the budget (``--steps`` applied): the second look's.
        alpha: the verdict's level.

    Raises:
        UsageError: an explicit schedule that does not fit ``steps`` and ``alpha``.
    """
    if value is None or value == "off":
        return None
    if value == "auto":
        own = BUDGET_SECOND_LOOK.get(budget)
        if own is None or own[0] >= steps:
            return None
        return SecondLook(own[0], own[1] * alpha, own[2])
    if isinstance(value, str):
        raise UsageError(f"unknown second look {value!r}", SECOND_LOOK_HINT)
    look = SecondLook(int(value[0]), float(value[1]), float(value[2]))
    check_second_look(look, steps, alpha)
    return look


@dataclass(frozen=True)
class ScanConfig:
    """What a scan does.

    Attributes:
        modes: subset of ("pixel", "patch").
        budget: the budget's name (for reports).
        inversion: the resolved inversion hyper-parameters.
        threshold: anomaly-index threshold of Neural Cleanse's own rule (2), reported for reference only.
        alpha: the level of the verdict: a backdoor is suspected when the smallest level p-value, times the
            number of levels, is at most ``alpha`` (docs/verdict.md).
        labels: candidate labels (None = all).
        device: "cpu" or "cuda".
        cnn_patch_sizes: grid sizes swept in patch mode for models without a token grid.
        cnn_patch_offsets: also sweep each grid shifted by half a patch (twice the cost).
        workers: inversions run at once on a CPU, each in its own thread with an equal share of the torch
            threads; None = automatic: one per torch thread, up to the number of inversions (2 for a default
            scan). Results do not depend on it (tested); the model's small matrix products use one core each
            better than two, so side by side is faster (benchmarks/README.md).
        second_look: a two-look schedule (:class:`SecondLook`), the budget's steps being the second look's;
            None: one look after the budget's steps.
    """

    modes: tuple[str, ...] = MODES
    budget: str = DEFAULT_BUDGET
    inversion: InversionConfig = field(default_factory=lambda: BUDGETS[DEFAULT_BUDGET])
    threshold: float = 2.0
    alpha: float = DEFAULT_ALPHA
    labels: tuple[int, ...] | None = None
    device: str = "cpu"
    # One 4-pixel grid: replaying recorded runs with fewer sweep members (`python -m benchmarks schedule --sweep`)
    # kept every right verdict of the wider sweep, removed one of its false alarms, and costs less.
    cnn_patch_sizes: tuple[int, ...] = (4,)
    cnn_patch_offsets: bool = False
    workers: int | None = None
    second_look: SecondLook | None = None

    def resolved_workers(self, inversions: int, threads: int) -> int:
        """How many of ``inversions`` run at once with ``threads`` torch threads in all."""
        if str(self.device).startswith("cuda"):
            return 1  # one GPU: the batched core already fills it
        want = self.workers if self.workers is not None else threads
        return max(1, min(want, inversions, threads))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inversion"] = self.inversion.to_dict()
        return d


@dataclass
class ModeResult:
    """One mode's per-label triggers and outlier test.

    Attributes:
        mode: "pixel" or "patch".
        statistic: what the per-label size measures.
        params: descriptions of the parametrisation(s) used (several for a CNN's patch sweep).
        labels: per label, its best result (for a sweep, the parametrisation with the smallest size).
        anomaly: the outlier tests over the sizes (the anomaly index and the calibrated p-value).
        flagged: the labels the verdict's rule flags at this level: its smallest class when the level's p-value,
            times the number of levels, is at most alpha (set by :func:`flag_levels`).
        seconds: the mode's own inversion time; when the levels run side by side it overlaps the other's.
        histories: per parametrisation (its ``name``), per label, the best size after each step; lets a
            benchmark replay the verdict a shorter run would have given (`python -m benchmarks schedule`).
    """

    mode: str
    statistic: str
    params: list[dict[str, Any]]
    labels: list[LabelResult]
    anomaly: AnomalyResult
    seconds: float
    histories: dict[str, dict[int, list[float | None]]] = field(default_factory=dict)
    flagged: tuple[int, ...] = ()

    def label(self, k: int) -> LabelResult:
        return next(r for r in self.labels if r.label == k)


@dataclass(frozen=True)
class Verdict:
    """Neural Cleanse's conclusion over its levels.

    Attributes:
        status: "backdoor", "clean" or "inconclusive".
        target: suspected target class (None when clean).
        anomaly_index: the anomaly index of the level the verdict rests on (for reference).
        basis: the level the verdict rests on ("pixel" or "patch"): the one with the smallest p-value.
        agree: whether the levels name the same smallest-size label (None with one level).
        reason: one plain sentence.
        p_value: the smallest level p-value times the number of conclusive levels (Bonferroni), capped at 1;
            None when no level is conclusive.
        p_values: each conclusive level's own p-value.
        alpha: the level the p-value was compared with.
        factor: the further correction in ``p_value`` (a two-look schedule's; 1 for one look).
        looks: the looks the verdict took (2: a two-look schedule's first look was in doubt; else 1).
    """

    status: str
    target: int | None
    anomaly_index: float
    basis: str | None
    agree: bool | None
    reason: str
    p_value: float | None = None
    p_values: dict[str, float] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    factor: float = 1.0
    looks: int = 1


@dataclass
class ScanFindings:
    """Everything the detection found, per mode, and the verdict."""

    config: ScanConfig
    modes: dict[str, ModeResult]
    verdict: Verdict
    samples_used: int
    seconds: float


def _pixel_params(model: ModelWrapper, sizes: tuple[int, ...], offsets: bool) -> list[TriggerParam]:
    _, h, w = model.input_size
    return [PixelTrigger(h, w)]


def _patch_params(model: ModelWrapper, sizes: tuple[int, ...], offsets: bool) -> list[TriggerParam]:
    _, h, w = model.input_size
    grid = model.token_grid
    if grid is None:  # a CNN has no patches of its own: a sweep of grids
        return list(cnn_patch_sweep(h, w, sizes, offsets))
    return [PatchTrigger(grid, h, w)]


def _blend_params(model: ModelWrapper, sizes: tuple[int, ...], offsets: bool) -> list[TriggerParam]:
    _, h, w = model.input_size
    return [BlendTrigger(h, w)]


#: level -> (model, CNN patch sizes, half offsets) -> the parametrisations that level inverts
LEVEL_PARAMS: dict[str, Callable[[ModelWrapper, tuple[int, ...], bool], list[TriggerParam]]] = {
    "pixel": _pixel_params,
    "patch": _patch_params,
    "blend": _blend_params,
}


def params_for(model: ModelWrapper, mode: str, cnn_sizes: tuple[int, ...], cnn_offsets: bool) -> list[TriggerParam]:
    """The parametrisations a level (``mode``) uses on ``model``."""
    make = LEVEL_PARAMS.get(mode)
    if make is None:
        raise UsageError(f"unknown scan level {mode!r}", f"use one of {', '.join(LEVEL_PARAMS)}")
    return make(model, cnn_sizes, cnn_offsets)


def combine(results: Mapping[str, Any], threshold: float, alpha: float = DEFAULT_ALPHA, factor: float = 1.0,
            look: str = "") -> Verdict:
    """Neural Cleanse's verdict over its levels (docs/verdict.md).

    Rule: each conclusive level has a calibrated p-value for its smallest trigger
    (:func:`bdscan.detect.anomaly.min_size_test`); the verdict rests on the level with the smallest one, whose
    smallest class is the suspected target, and a backdoor is suspected when that p-value times the number of
    conclusive levels (Bonferroni: valid however the levels depend on each other) is at most ``alpha``. A level
    with fewer than 3 successful labels is inconclusive and is not a test; with no conclusive level the verdict
    is "inconclusive". ``threshold`` (the anomaly index's) is only quoted.

    Args:
        results: level -> anything with an ``anomaly`` (:class:`~bdscan.detect.anomaly.AnomalyResult`), e.g.
            :class:`ModeResult`.
        threshold: Neural Cleanse's anomaly-index threshold (reported, not applied).
        alpha: the verdict's level.
        factor: a further correction of the p-value (a two-look schedule's, :class:`SecondLook`); 1 for one look.
        look: a clause naming the look the verdict comes from ("" for one look).
    """
    tests = {m: r.anomaly.test for m, r in results.items() if r.anomaly.conclusive and r.anomaly.test is not None}
    mins = {m: t.min_label for m, t in tests.items()}
    agree = (len(set(mins.values())) == 1) if len(mins) > 1 else None
    if not tests:
        return Verdict("inconclusive", None, 0.0, None, None,
                       "Too few labels could be reached by any trigger to judge this model.", alpha=alpha)
    # smallest p first; on a tie the larger t, then the patch level (the transformers' case, Raj et al.)
    basis = min(tests, key=lambda m: (tests[m].p_value, -tests[m].t, m != "patch"))
    t = tests[basis]
    corrected = {m: min(1.0, factor * len(tests) * tt.p_value) for m, tt in tests.items()}
    p = corrected[basis]
    index = results[basis].anomaly.anomaly_index
    levels = f"corrected for {len(tests)} levels" if len(tests) > 1 else "1 level"
    levels += f", {look}" if look else ""
    how = (f"{levels}; its log size lies {t.t:.1f} predictive standard deviations below the other {t.classes - 1} classes'; "
           f"anomaly index {index:.2f}")
    p_values = {m: tt.p_value for m, tt in tests.items()}
    if p <= alpha:
        # another level that would flag on its own but names another class: the verdict keeps the smallest p-value's
        # class (its rule) and says so, as the combined verdict does for detectors (docs/verdict.md, rule 4); an
        # auditor then sees both candidates, and repairing by either trigger is a choice the report should not hide
        others = [f" The {m} level suspects class {tt.min_label} instead (p = {corrected[m]:.2g})."
                  for m, tt in tests.items() if m != basis and tt.min_label != t.min_label and corrected[m] <= alpha]
        return Verdict("backdoor", t.min_label, index, basis, agree,
                       f"Class {t.min_label} can be reached with an abnormally small {basis} trigger: p = {p:.2g} ≤ α = "
                       f"{alpha:g} ({how})." + "".join(others), p, p_values, alpha, factor)
    return Verdict("clean", None, index, basis, agree,
                   f"No class is abnormally easy to reach: the smallest trigger ({basis} level, class {t.min_label}) has "
                   f"p = {p:.2g} > α = {alpha:g} ({how}, reference threshold {threshold:g}).", p, p_values, alpha, factor)


def flag_levels(results: Mapping[str, ModeResult], verdict: Verdict) -> None:
    """Sets each level's :attr:`ModeResult.flagged`: its smallest class when its own p-value, times the number
    of conclusive levels (and the verdict's further correction), is at most alpha (so a level flags exactly when it
    alone would decide the verdict)."""
    n = len(verdict.p_values) * verdict.factor
    for m, r in results.items():
        p = verdict.p_values.get(m)
        r.flagged = (r.anomaly.min_label,) if p is not None and r.anomaly.min_label is not None and n * p <= verdict.alpha else ()


def scan(model: ModelWrapper, data: CleanData, cfg: ScanConfig, progress: ScanProgress | None = None) -> ScanFindings:
    """Runs Neural Cleanse at the configured levels and combines them.

    Every (level, parametrisation) pair is one inversion over all labels. On a CPU with several torch threads
    the inversions run side by side, each on its share of the threads: the model's small matrix products use
    one core each better than two, and the inversions are independent, so the results are those of running them
    one after the other (tested).

    Args:
        model: the suspect model.
        data: clean samples of its classes.
        cfg: the scan configuration.
        progress: optional ``(mode, done, total, stats)`` callback; called from the inversions' threads.

    Returns:
        :class:`ScanFindings`.
    """
    t0 = time.perf_counter()
    labels = list(cfg.labels) if cfg.labels is not None else list(range(model.num_classes))
    bad = [k for k in labels if not 0 <= k < model.num_classes]
    if bad:
        raise UsageError(f"label {bad[0]} is not a class of this model (0..{model.num_classes - 1})", "check --labels")
    cfg.inversion.validate()
    if cfg.second_look is not None:
        check_second_look(cfg.second_look, cfg.inversion.steps, cfg.alpha)
    jobs: list[tuple[str, str, TriggerParam]] = []  # (mode, name, parametrisation), in report order
    for mode in cfg.modes:
        params = params_for(model, mode, cfg.cnn_patch_sizes, cfg.cnn_patch_offsets)
        jobs += [(mode, mode if len(params) == 1 else f"{mode} ({pi + 1}/{len(params)})", p) for pi, p in enumerate(params)]
    threads = torch.get_num_threads()
    workers = cfg.resolved_workers(len(jobs), threads)
    per_worker = max(1, threads // workers)
    # resolve the label chunk, precision and workers now, so that the findings (and every report) carry the
    # values that ran
    cfg = replace(cfg, workers=workers, inversion=cfg.inversion.with_(
        label_chunk=cfg.inversion.resolved_label_chunk(cfg.device, per_worker),
        precision=resolve_precision(cfg.inversion.precision, model, cfg.device)))

    stop = threading.Event()  # set when one inversion failed or the user interrupted: the others end at their next step

    def run(job: tuple[str, str, TriggerParam]) -> InversionResult:
        _, name, param = job
        return invert_prepared(model, data, param, labels, cfg.inversion, _job_progress(name, stop, progress), cfg.device)

    # one path for any number of workers: with one, the pool runs the inversions one after the other
    with prepared(model, cfg.inversion.precision, cfg.device), torch_threads(per_worker), \
            ThreadPoolExecutor(workers, thread_name_prefix="bdscan-inversion") as pool:
        if cfg.second_look is None:
            outs = _run_all(pool, stop, run, jobs)
            results, samples_used = _mode_results(cfg, jobs, outs, labels)
            verdict = combine(results, cfg.threshold, cfg.alpha)
        else:
            results, samples_used, verdict = _two_looks(model, data, cfg, jobs, labels, pool, stop, progress)
    flag_levels(results, verdict)
    return ScanFindings(cfg, results, verdict, samples_used, time.perf_counter() - t0)


def _job_progress(name: str, stop: threading.Event, progress: ScanProgress | None) -> Callable[[int, int, dict[str, float]], None]:
    """One inversion's progress callback: ends it at its next step once ``stop`` is set (another inversion failed, or
    Ctrl-C), and passes its progress on under ``name``."""

    def cb(done: int, total: int, stats: dict[str, float]) -> None:
        if stop.is_set():
            raise _Stopped
        if progress:
            progress(name, done, total, stats)

    return cb


def _run_all(pool: ThreadPoolExecutor, stop: threading.Event, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``fn`` over ``items`` in the pool; the first failure (or Ctrl-C) stops the others at their next step."""
    futures = [pool.submit(fn, it) for it in items]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:  # e.g. Ctrl-C: do not sit out the other inversions
        stop.set()
        raise
    if any(f.done() and f.exception() is not None for f in futures):
        stop.set()
        wait(futures)
        # the real failure, not the _Stopped it caused in the others
        raise next(e for e in [f.exception() for f in futures] if e is not None and not isinstance(e, _Stopped))
    return [f.result() for f in futures]


def _two_looks(model: ModelWrapper, data: CleanData, cfg: ScanConfig, jobs: list[tuple[str, str, TriggerParam]],
               labels: list[int], pool: ThreadPoolExecutor, stop: threading.Event,
               progress: ScanProgress | None) -> tuple[dict[str, ModeResult], int, Verdict]:
    """The :class:`SecondLook` schedule: every inversion to ``first_steps``, a look, and on only if in doubt."""
    sl = cfg.second_look
    assert sl is not None
    final = cfg.inversion.steps

    def advance(item: tuple[Inversion, str], until: int | None) -> None:
        run, name = item
        run.advance(until, _job_progress(name, stop, _look_progress(progress, until, final)))

    runs = [(Inversion(model, data, param, labels, cfg.inversion, cfg.device), name) for _, name, param in jobs]
    _run_all(pool, stop, lambda it: advance(it, sl.first_steps), runs)
    results, samples_used = _mode_results(cfg, jobs, [r.result() for r, _ in runs], labels)
    p1 = combine(results, cfg.threshold, cfg.alpha).p_value
    first = f"first look after {sl.first_steps} of {final} steps, α {sl.alpha_first:g} of {cfg.alpha:g}"
    # an inconclusive first look (too few classes reached yet) is in doubt too: more steps are what it lacks
    if (p1 is not None and (p1 <= sl.alpha_first or p1 > sl.clean_above)) or all(r.finished for r, _ in runs):
        log.info("first look after %d steps: p %s, no second look", sl.first_steps, p1)
        return results, samples_used, combine(results, cfg.threshold, cfg.alpha, cfg.alpha / sl.alpha_first, first)
    log.info("first look after %d steps: p %s, in doubt: every class runs on to %d steps", sl.first_steps, p1, final)
    _run_all(pool, stop, lambda it: advance(it, None), runs)
    results, samples_used = _mode_results(cfg, jobs, [r.result() for r, _ in runs], labels)
    gave = "was inconclusive" if p1 is None else f"gave {p1:.2g}"
    second = (f"second look after {final} steps (the first, after {sl.first_steps}, {gave}), "
              f"α {cfg.alpha - sl.alpha_first:g} of {cfg.alpha:g}")
    verdict = combine(results, cfg.threshold, cfg.alpha, cfg.alpha / (cfg.alpha - sl.alpha_first), second)
    return results, samples_used, replace(verdict, looks=2)


def _look_progress(progress: ScanProgress | None, until: int | None, final: int) -> ScanProgress | None:
    """Progress of one look: the first counts against its own steps (a scan that stops there ends at 100 %), the
    second against the budget's; each names its look in the stats (``look``: 1 or 2)."""
    if progress is None:
        return None
    if until is None:
        return lambda name, done, total, st: progress(name, done, total, st | {"look": 2})

    def first(name: str, done: int, total: int, st: dict[str, float]) -> None:
        progress(name, min(done, total * until // final), total * until // final, st | {"steps": until, "look": 1})

    return first


def _mode_results(cfg: ScanConfig, jobs: list[tuple[str, str, TriggerParam]], outs: list[InversionResult],
                  labels: list[int]) -> tuple[dict[str, ModeResult], int]:
    """Each level's per-label best triggers and outlier tests from its inversions, and the samples they used."""
    results: dict[str, ModeResult] = {}
    samples_used = 0
    for mode in cfg.modes:
        mine = [(name, param, res) for (m, name, param), res in zip(jobs, outs, strict=True) if m == mode]
        best: dict[int, LabelResult] = {}
        histories: dict[str, dict[int, list[float | None]]] = {}
        for name, _, res in mine:
            samples_used = res.samples_used
            histories[name] = {r.label: r.history for r in res.labels}
            for r in res.labels:
                cur = best.get(r.label)
                if cur is None or _smaller(r, cur):
                    best[r.label] = r
        ordered = [best[k] for k in labels]
        an = level_anomaly({r.label: r.norm for r in ordered}, mode, cfg.threshold)
        # the mode's own computing time (its inversions may have overlapped with the other mode's)
        seconds = sum(res.seconds for _, _, res in mine)
        results[mode] = ModeResult(mode, mine[0][1].statistic, [p.describe() for _, p, _ in mine], ordered, an,
                                   seconds, histories)
        log.info("%s: p %s, anomaly index %.2f (min label %s)", mode, an.p_value, an.anomaly_index, an.min_label)
    return results, samples_used


class _Stopped(Exception):
    """Ends an inversion early because another one failed or the scan was interrupted."""


def _smaller(a: LabelResult, b: LabelResult) -> bool:
    if a.norm is None:
        return False
    return b.norm is None or a.norm < b.norm
