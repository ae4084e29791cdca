"""The detector plug-in point: what every detector takes and returns, the registry, and the combined verdict.

A detector (captum's "one verb per algorithm family") is an object with a name and one verb,
:meth:`Detector.detect`: it takes the suspect model's wrapper, clean data and its own frozen configuration,
and returns a :class:`DetectorResult`. It knows nothing of files, the CLI or report formats.

Adding a detector is one new module that defines the class and registers it with :func:`register_detector`
(timm's ``@register_model`` pattern); a built-in one is also named in :data:`BUILTIN_DETECTORS`, so that the
registry imports it (and so registers it) the first time it is read.
Everything the reports show of it comes from what its result returns:

* :meth:`DetectorResult.section`: its section of the scan document, stored under :attr:`Detector.json_key`;
* :meth:`DetectorResult.arrays` and :meth:`DetectorResult.images`: what the scan folder stores of it;
* its :class:`Evidence` (status, suspected class, score): the combined verdict, the SARIF result and the
  HTML summary. :meth:`Detector.evidence_from_doc` reads it back from a saved document, so that a report can
  be re-rendered from JSON alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from bdscan.data import CleanData
from bdscan.detect.config import ALPHA_PROVISIONAL, DEFAULT_ALPHA, MODES
from bdscan.errors import UsageError
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.registry import LazyRegistry

#: the verdicts a detector (and the combined scan) can reach
STATUSES = ("backdoor", "clean", "inconclusive")

__all__ = [
    "ALPHA_PROVISIONAL",
    "BUILTIN_DETECTORS",
    "COMBINE_RULE",
    "DEFAULT_ALPHA",
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "STATUSES",
    "CombinedVerdict",
    "Detector",
    "DetectorProgress",
    "DetectorResult",
    "Evidence",
    "ScanSettings",
    "backdoor_rule",
    "combine",
    "detectors_in",
    "get_detector",
    "p_number",
    "parse_detectors",
    "register_detector",
]

#: the name of the rule :func:`combine` applies, as the scan document records it (docs/verdict.md). With equal
#: weights it is the plain Bonferroni rule that documents of schema ``bdscan.scan/2`` name "bonferroni-min-p".
COMBINE_RULE = "weighted-bonferroni-min-p"

#: progress(task, done, total, stats): ``task`` names one unit of work (e.g. "pixel"), called from worker threads
DetectorProgress = Callable[[str, int, int, dict[str, float]], None]


@dataclass(frozen=True)
class ScanSettings:
    """The options every detector is configured from (the command line's scan options, budget included).

    Attributes:
        budget: the budget's name (``bdscan.detect.config.BUDGETS``).
        levels: the Neural Cleanse levels to run (:data:`bdscan.detect.config.LEVELS`; default
            :data:`~bdscan.detect.config.MODES`).
        threshold: Neural Cleanse's anomaly-index threshold (reported for reference; the verdict uses ``alpha``).
        alpha: the level of the verdict: the largest corrected p-value that still suspects a backdoor
            (:func:`combine`; default :data:`DEFAULT_ALPHA`).
        seed: seed of every random choice a detector makes.
        device: "cpu" or "cuda".
        workers: work items run at once on a CPU (None = automatic).
        steps: override of the budget's optimisation steps.
        samples: override of the budget's clean samples.
        precision: override of the budget's arithmetic ("auto", "fp32", "bf16").
        second_look: Neural Cleanse's two-look schedule (:class:`bdscan.detect.scan.SecondLook`; the budget's steps
            are the second look's): "auto" (the budget's own, ``bdscan.detect.config.BUDGET_SECOND_LOOK``), "off"
            (one look), or (first_steps, alpha_first, clean_above).
    """

    budget: str = "fast"
    levels: tuple[str, ...] = MODES
    threshold: float = 2.0
    alpha: float = DEFAULT_ALPHA
    seed: int = 0
    device: str = "cpu"
    workers: int | None = None
    steps: int | None = None
    samples: int | None = None
    precision: str | None = None
    second_look: tuple[int, float, float] | str = "auto"

    def overrides(self) -> dict[str, Any]:
        """The inversion overrides the user set (seed always), as ``InversionConfig.with_`` takes them."""
        over: dict[str, Any] = {"seed": self.seed}
        for k in ("steps", "samples", "precision"):
            if getattr(self, k) is not None:
                over[k] = getattr(self, k)
        return over


@dataclass(frozen=True)
class Evidence:
    """One detector's conclusion about one model.

    Attributes:
        detector: the detector's registry name.
        status: "backdoor", "clean" or "inconclusive".
        target: the suspected target class (None when the detector names none).
        score: the detector's own statistic for the suspected (or most suspicious) class.
        threshold: the score above which the detector flags a class.
        reason: one plain sentence.
        details: further JSON-able fields the verdict section carries when this detector decides it.
        p_value: the calibrated per-model score: the probability that a clean model of the same class count
            shows evidence at least this strong (None when the detector cannot calibrate, e.g. it did not run).
        weight: the detector's weight in the combined verdict (:attr:`Detector.weight`; :func:`combine`).
    """

    detector: str
    status: str
    target: int | None
    score: float
    threshold: float
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)
    p_value: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if self.p_value is not None and not 0.0 <= self.p_value <= 1.0:
            raise ValueError(f"p_value {self.p_value!r} is not a probability")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight {self.weight!r} is not a positive number")


def p_number(p: float | None) -> float | None:
    """A p-value for JSON: four significant digits (:func:`~bdscan.jsonnum.json_number`'s fixed six decimals would
    write a small one as 0)."""
    if p is None or not p > 0:
        return json_number(p)
    return json_number(p, max(6, 3 - math.floor(math.log10(p))))


@runtime_checkable
class DetectorResult(Protocol):
    """What a detector returns (a dataclass of its own).

    Attributes:
        evidence: its conclusion.
        config: the frozen configuration that ran (with a ``to_dict()``), as resolved by the detector.
        seconds: its wall time.

    A result may also define ``timings() -> dict[str, float]`` (the document's ``timings`` entries; default
    ``{"<name>_s": seconds}``) and ``samples_used`` (clean images the detector drew).
    """

    evidence: Evidence
    config: Any
    seconds: float

    def section(self, class_names: list[str], example: torch.Tensor | None, original: Any | None) -> dict[str, Any]:
        """Its section of the scan document (JSON-able).

        Args:
            class_names: the model's class names.
            example: a clean image (C, H, W) in [0, 1] to stamp in pictures, or None.
            original: the model's own trigger (a :class:`bdscan.trigger.Trigger`, lab models only), or None.
        """
        ...

    def arrays(self) -> dict[str, np.ndarray]:
        """Full-precision arrays the scan folder keeps (``triggers.npz``); names must not clash across detectors."""
        ...

    def images(self, example: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(relative path, image (C, H, W) or (H, W) in [0, 1])`` pairs the scan folder writes as PNGs."""
        ...


class Detector:
    """Base of every detector: its identity, its configuration and its one verb.

    Subclasses set the class attributes and implement :meth:`configure` and :meth:`detect`.
    """

    #: registry name, used by ``--detectors`` (lowercase, dashes)
    name: ClassVar[str] = ""
    #: human name, for reports
    title: ClassVar[str] = ""
    #: one line for ``bdscan detectors``
    summary: ClassVar[str] = ""
    #: the scan document's key that holds this detector's section
    json_key: ClassVar[str] = ""
    #: where the document keeps this detector's configuration: a top-level key, or None for ``section["config"]``
    config_key: ClassVar[str | None] = None
    #: citation of the method
    reference: ClassVar[str] = ""
    #: the SARIF rule this detector's findings are reported under (id, name, descriptions, help)
    sarif_rule: ClassVar[dict[str, Any]] = {}
    #: its weight in the combined verdict's weighted Bonferroni (:func:`combine`): its share of α is its weight over
    #: the sum of the weights of the detectors that gave a p-value; chosen on the evaluation zoo's calibration half
    #: (docs/verdict.md)
    weight: ClassVar[float] = 1.0

    def configure(self, settings: ScanSettings) -> Any:
        """This detector's frozen configuration for ``settings`` (raises :class:`UsageError` when invalid)."""
        raise NotImplementedError

    def detect(self, model: ModelWrapper, data: CleanData, config: Any,
               progress: DetectorProgress | None = None) -> DetectorResult:
        """Runs the detector on ``model`` with ``data`` (clean images of its classes)."""
        raise NotImplementedError

    def passes(self, model: ModelWrapper, images: int, config: Any) -> float:
        """At most how many images this detector puts through ``model`` forward and backward (a forward alone counts
        a third) with ``images`` clean images: the scan's time estimate (:func:`bdscan.models.cost.estimate_seconds`)
        adds it to Neural Cleanse's, whose own arithmetic (two looks, parallel levels) the estimate models itself,
        so Neural Cleanse leaves this at 0."""
        return 0.0

    def evidence_from_doc(self, doc: Mapping[str, Any]) -> Evidence | None:
        """This detector's evidence as a saved scan document holds it (None when it did not run).

        The default reads ``doc[json_key]["evidence"]``; a detector whose section stores its evidence elsewhere
        overrides it.
        """
        sec = doc.get(self.json_key)
        ev = sec.get("evidence") if isinstance(sec, Mapping) else None
        if not isinstance(ev, Mapping):
            return None
        return Evidence(self.name, str(ev.get("status", "inconclusive")), ev.get("target"), float(ev.get("score") or 0.0),
                        float(ev.get("threshold") or 0.0), str(ev.get("reason") or ""), dict(ev.get("details") or {}),
                        None if ev.get("p_value") is None else float(ev["p_value"]), float(ev.get("weight") or 1.0))


#: the built-in detectors' modules, in registry order (Neural Cleanse first, so that its SARIF rule BDS001 stays first).
#: They are imported by the registry rather than by this package's ``__init__`` (modelscan names its scanners by
#: module path the same way), so that reading a budget or the command line's help does not import torch's models.
BUILTIN_DETECTORS: tuple[str, ...] = ("bdscan.detect.neural_cleanse", "bdscan.detect.mmbd", "bdscan.detect.neuron_noise")


#: every registered detector, by name
DETECTORS: LazyRegistry[Detector] = LazyRegistry(BUILTIN_DETECTORS, lambda d: type(d).__module__)
#: the detectors a scan runs when none are named: Neural Cleanse, and neuron noise (which applies to models with a
#: LayerNorm only, and says "not applicable" elsewhere), adopted on the evaluation zoo's calibration half
#: (docs/verdict.md, "Neuron noise")
DEFAULT_DETECTORS: tuple[str, ...] = ("neural-cleanse", "neuron-noise")


def backdoor_rule(rule_id: str, name: str, short: str, full: str, help_text: str, steps: tuple[str, ...],
                  note: str = "") -> dict[str, Any]:
    """A detector's SARIF rule for a suspected backdoor (an error, security-tagged), with the advice every such
    finding carries: do not deploy, the numbered ``steps`` (markdown), and a closing ``note`` (markdown)."""
    markdown = "**Do not deploy this model.**\n\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": help_text, "markdown": markdown + (f"\n\n{note}" if note else "")},
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "machine-learning", "backdoor"], "precision": "medium", "security-severity": "8.8"},
    }


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: adds one instance of ``cls`` to :data:`DETECTORS` under ``cls.name``."""
    if not cls.name or not cls.json_key:
        raise ValueError(f"{cls.__name__} needs a name and a json_key")
    clash = [d.name for d in DETECTORS.values() if d.json_key == cls.json_key and d.name != cls.name]
    if clash:
        raise ValueError(f"{cls.__name__}: json_key {cls.json_key!r} is already used by {clash[0]}")
    DETECTORS[cls.name] = cls()
    return cls


def get_detector(name: str) -> Detector:
    """The registered detector ``name``; raises :class:`UsageError` naming the registered ones."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise UsageError(f"unknown detector {name!r}", f"use one of: {', '.join(DETECTORS)} (see `bdscan detectors`)") from None


def parse_detectors(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"a,b"`` (or a list of names) -> validated, de-duplicated names in the given order; None -> the default."""
    if spec is None:
        return DEFAULT_DETECTORS
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n and n not in out:
            get_detector(n)
            out.append(n)
    if not out:
        raise UsageError("--detectors names no detector", f"use one of: {', '.join(DETECTORS)}")
    return tuple(out)


def detectors_in(doc: Mapping[str, Any]) -> list[Detector]:
    """The registered detectors whose section a scan document holds, in registry order."""
    return [d for d in DETECTORS.values() if isinstance(doc.get(d.json_key), Mapping)]


@dataclass(frozen=True)
class CombinedVerdict:
    """The scan's verdict over all detectors that ran (the rule: :func:`combine`).

    Attributes:
        status: "backdoor", "clean" or "inconclusive".
        target: the suspected target class, or None.
        decided_by: the evidence the verdict rests on (None when no detector ran).
        evidence: every detector's evidence, in the order they ran.
        p_value: the deciding p-value corrected for the tests (None when no evidence is calibrated).
        tests: how many detectors' p-values were compared.
        alpha: the level the corrected p-value was compared with.
        calibrated: whether the verdict rests on p-values (False: no detector could calibrate, and the detectors'
            own statuses decided).
        disagree: other detectors that would flag on their own (corrected p <= alpha) but name another class:
            ``(detector, class)`` pairs.
        reason: one plain sentence.
        factors: ``(detector, factor)`` for every test: what its p-value was multiplied by (the sum of the tests'
            weights over its own; ``tests`` for each when the weights are equal).
    """

    status: str
    target: int | None
    decided_by: Evidence | None
    evidence: tuple[Evidence, ...]
    p_value: float | None = None
    tests: int = 0
    alpha: float = DEFAULT_ALPHA
    calibrated: bool = False
    disagree: tuple[tuple[str, int], ...] = ()
    reason: str = "No detector ran."
    factors: tuple[tuple[str, float], ...] = ()


def combine(evidence: Iterable[Evidence], alpha: float = DEFAULT_ALPHA) -> CombinedVerdict:
    """The one rule that combines detectors (docs/verdict.md, "The combined verdict").

    Every detector that reached a verdict with a calibrated p-value (:attr:`Evidence.p_value`; a detector
    corrects for its own tests inside it, e.g. Neural Cleanse for its levels) is one test, with its weight
    (:attr:`Evidence.weight`). With tests of weights ``w_1 .. w_m`` summing to ``W``, test i's corrected p-value is
    ``min(1, p_i · W / w_i)`` (a weighted Bonferroni: test i is held to ``α · w_i / W``, and the shares sum to α,
    so the rule is valid however the detectors' evidence depends on each other; with equal weights the factor is
    ``m``). The verdict rests on the smallest corrected p-value (ties: the first detector in the order they ran);
    a backdoor is suspected when it is at most ``alpha``, and the suspected class is that detector's. When another
    detector would flag on its own (corrected p <= alpha) but names another class, the verdict keeps the deciding
    detector's class and lists the other in ``disagree``.

    Evidence without a p-value (a detector that cannot calibrate, or one that was inconclusive) is not a test:
    it is reported beside the verdict and never overrules calibrated evidence. Only when no detector has a
    p-value does the uncalibrated rule decide: a backdoor when any detector suspects one (the first such
    decides), else clean when one could judge the model, else inconclusive.

    Args:
        evidence: every detector's evidence, in the order they ran.
        alpha: the verdict's level (default :data:`DEFAULT_ALPHA`).
    """
    ev = tuple(evidence)
    tests = [e for e in ev if e.p_value is not None and e.status != "inconclusive"]
    if not tests:
        for status in STATUSES:  # uncalibrated: backdoor first, then clean, then inconclusive
            hit = next((e for e in ev if e.status == status), None)
            if hit is not None:
                return CombinedVerdict(status, hit.target if status == "backdoor" else None, hit, ev, alpha=alpha, reason=hit.reason)
        return CombinedVerdict("inconclusive", None, None, ev, alpha=alpha)
    m = len(tests)
    total = math.fsum(e.weight for e in tests)
    # equal weights give exactly m (not W / w with its rounding), so that the plain rule's figures are reproduced
    equal = len({e.weight for e in tests}) == 1
    factor = [float(m) if equal else total / e.weight for e in tests]
    ps = [min(1.0, f * float(e.p_value)) for e, f in zip(tests, factor, strict=True)]  # type: ignore[arg-type]
    i = ps.index(min(ps))  # the first of equals
    best, p = tests[i], ps[i]
    factors = tuple((e.detector, f) for e, f in zip(tests, factor, strict=True))
    if m > 1:
        how = f"Corrected for {m} detectors" + ("" if equal else f" (weights {', '.join(f'{e.detector} {e.weight:g}' for e in tests)})")
        notes = [f"{how}: p = {p:.2g}."]
    else:
        notes = []
    if p <= alpha and best.target is not None:
        disagree = tuple((e.detector, int(e.target)) for e, q in zip(tests, ps, strict=True)
                         if e is not best and e.target is not None and q <= alpha and e.target != best.target)
        notes += [f"{d} suspects class {k} instead." for d, k in disagree]
        return CombinedVerdict("backdoor", best.target, best, ev, p, m, alpha, True, disagree, " ".join([best.reason, *notes]), factors)
    notes += [f"{e.detector} (uncalibrated) suspects class {e.target}." for e in ev if e.p_value is None and e.status == "backdoor"]
    first = best.reason if best.status == "clean" else (
        f"No detector's evidence is strong enough: the smallest corrected p-value ({best.detector}) is {p:.2g} > α = {alpha:g}.")
    return CombinedVerdict("clean", None, best, ev, p, m, alpha, True, (), " ".join([first, *notes]), factors)
