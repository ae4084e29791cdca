"""Building an input guard from a trigger: Neural Cleanse's first mitigation (Wang et al., S&P 2019,
section VI-A, "Filter for detecting adversarial inputs").

Neural Cleanse flags an input when the neurons its reversed trigger drives most (the top 1 % of the second to
last layer) fire above a threshold set for a chosen false-positive rate on clean images, and reports under 2 %
of triggered inputs missed at 5 % false positives on BadNets. bdscan does the same, with these choices:

1. **Split.** The clean images are split three ways, stratified by class and seeded
   (:func:`bdscan.repair.split_data` twice): *fit* (choose the neurons), *calibration* (set the threshold) and
   *test* (measure). No image is used by two steps, so the reported rates are measured on images the guard
   never saw.
2. **Neurons.** On the fit images, each feature of the watched layer (:mod:`bdscan.guard.features`) gets its
   clean mean μ and spread σ, and the trigger's effect ``(mean on stamped − μ) / σ``, stamping only images not
   of the trigger's target. The ``neurons`` share with the largest effect is kept (Neural Cleanse: 1 %; at least
   :data:`MIN_NEURONS`, because 1 % of a small model's 96 features would be one neuron). σ is floored at a tenth
   of the layer's median σ, so a neuron that never moves on clean images cannot dominate the score.
3. **Score.** ``suspicion(x) = mean over the kept neurons of (f(x) − μ) / σ``: Neural Cleanse's activation of
   the top neurons, standardised so neurons of different scales weigh alike.
4. **Threshold.** The conformal quantile of the calibration scores: with ``n`` calibration images the
   threshold is the ``⌈(n + 1)(1 − fpr)⌉``-th smallest score, and an input is flagged when its suspicion is
   strictly above it. For exchangeable clean inputs this keeps the false-positive rate at or under ``fpr``
   (Vovk et al. 2005; Angelopoulos & Bates 2021, section 1.1); it needs ``n ≥ 1/fpr − 1`` images.
5. **Measure**, on the test images: the false-positive rate on clean images (with a 95 % Clopper-Pearson
   interval), the share of stamped images (not of the target class) flagged, for the trigger the guard was
   built from and, for a lab model, for its original trigger; and the share flagged among the stamped images
   the model actually sends to the target (the attacks that worked: a stamped image the backdoor ignores is
   classified as it would be clean, and missing it costs nothing).

**Cannot reach the rate** (:class:`GuardRateError`): too few calibration images for ``fpr``, or a test
false-positive rate significantly above ``fpr`` (one-sided exact binomial test, p < :data:`RATE_P`). The
measurements are still returned (``GuardResult.reached`` is False) so they can be reported; exporting refuses.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

import bdscan
from bdscan.data import CleanData
from bdscan.errors import NumericalError, UsageError
from bdscan.guard.features import FeatureLayer, features, resolve_layer
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair import split_data, trigger_summary
from bdscan.repair.core import check_trigger, infer_target
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

#: fewest neurons a guard scores (1 % of a small layer would be a single neuron)
MIN_NEURONS = 4
#: significance of the test that the measured false-positive rate is above the requested one
RATE_P = 0.01
#: σ floor, as a share of the layer's median clean σ
SIGMA_FLOOR = 0.1
#: the guard document's schema
SCHEMA = "bdscan.guard/1"


class GuardRateError(UsageError):
    """The guard cannot keep false positives at the requested rate (exit code 2 on the command line).

    Attributes:
        result: the measurements, for the report.
    """

    def __init__(self, message: str, hint: str | None = None, result: GuardResult | None = None) -> None:
        super().__init__(message, hint)
        self.result = result


@dataclass(frozen=True)
class GuardConfig:
    """How a guard is built.

    Attributes:
        fpr: the requested false-positive rate on clean inputs (Neural Cleanse's operating point: 0.05).
        neurons: share of the layer's features scored (Neural Cleanse: 0.01); at least :data:`MIN_NEURONS`.
        layer: "penultimate", "tokens" or a module name (see :mod:`bdscan.guard.features`).
        calibration_fraction: share of the clean images that set the threshold.
        test_fraction: share of the clean images the rates are measured on.
        seed: seed of the split.
        batch_size: images per forward.
        device: "cpu" or "cuda".
    """

    fpr: float = 0.05
    neurons: float = 0.01
    layer: str = "penultimate"
    calibration_fraction: float = 0.35
    test_fraction: float = 0.35
    seed: int = 0
    batch_size: int = 128
    device: str = "cpu"

    def with_(self, **changes: Any) -> GuardConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> GuardConfig:
        """Returns self; raises :class:`UsageError` for values that cannot work."""
        if not 0 < self.fpr < 1:
            raise UsageError(f"--fpr {self.fpr:g} is not a rate in (0, 1)", "e.g. --fpr 0.05 (5 % of clean inputs flagged)")
        if not 0 < self.neurons <= 1:
            raise UsageError(f"--neurons {self.neurons:g} is not a share in (0, 1]", "Neural Cleanse scores the top 1 %: --neurons 0.01")
        fit = 1 - self.calibration_fraction - self.test_fraction
        if min(self.calibration_fraction, self.test_fraction, fit) <= 0:
            raise UsageError("the calibration and test shares must be positive and leave images to fit on",
                             "e.g. calibration 0.35, test 0.35")
        if self.batch_size < 1:
            raise UsageError("batch size must be positive", "e.g. 128")
        return self


@dataclass(frozen=True)
class Scorer:
    """The suspicion score: ``mean_j (f[:, idx_j] − mu_j) / sigma_j`` over the kept neurons.

    Attributes:
        idx: (k,) indices of the kept features.
        mu: (k,) their clean means.
        sigma: (k,) their floored clean spreads.
        effect: (k,) the trigger's standardised effect on each (largest first).
    """

    idx: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    effect: torch.Tensor

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        """(N, width) features -> (N,) suspicion."""
        return ((f.index_select(1, self.idx.to(f.device)) - self.mu.to(f)) / self.sigma.to(f)).mean(dim=1)


def select_neurons(clean: torch.Tensor, stamped: torch.Tensor, share: float) -> Scorer:
    """The neurons the trigger drives most (see the module docstring, step 2).

    Args:
        clean: (N, D) features of clean images.
        stamped: (M, D) features of stamped images.
        share: share of the D features kept (at least :data:`MIN_NEURONS`, at most D).
    """
    d = clean.shape[1]
    mu = clean.mean(0)
    sd = clean.std(0, unbiased=True) if len(clean) > 1 else torch.zeros(d)
    positive = sd[sd > 0]
    floor = SIGMA_FLOOR * float(positive.median()) if positive.numel() else 1.0
    sigma = sd.clamp_min(max(floor, 1e-12))
    effect = (stamped.mean(0) - mu) / sigma
    if not torch.isfinite(effect).all():
        raise NumericalError("the model's features are NaN or infinite on clean or stamped images", "check the model")
    k = min(d, max(MIN_NEURONS, math.ceil(share * d - 1e-9)))
    order = torch.argsort(effect, descending=True, stable=True)[:k]
    return Scorer(order, mu[order].clone(), sigma[order].clone(), effect[order].clone())


def conformal_threshold(scores: torch.Tensor, fpr: float) -> float | None:
    """The ``⌈(n + 1)(1 − fpr)⌉``-th smallest of ``scores`` (n of them); None when that rank exceeds n."""
    n = int(scores.numel())
    rank = math.ceil((n + 1) * (1 - fpr) - 1e-9)
    if n == 0 or rank > n:
        return None
    return float(scores.sort().values[rank - 1])


def min_calibration_images(fpr: float) -> int:
    """Fewest calibration images :func:`conformal_threshold` needs for ``fpr``."""
    n = 1
    while math.ceil((n + 1) * (1 - fpr) - 1e-9) > n:
        n += 1
    return n


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided confidence interval of a binomial share ``k / n`` (bisection on the binomial tails)."""
    if n == 0:
        return 0.0, 1.0
    a = (1 - level) / 2

    def solve(f: Any) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: binomial_tail(k, n, p) < a)
    upper = 1.0 if k == n else solve(lambda p: 1 - binomial_tail(k + 1, n, p) > a)
    return lower, upper


@dataclass
class Rate:
    """A measured share: ``flagged`` of ``images``; for stamped images also how many the trigger sent to its target
    (``to_target``: the attacks that worked) and how many of those were flagged (``flagged_to_target``)."""

    images: int
    flagged: int
    to_target: int | None = None
    flagged_to_target: int | None = None

    @property
    def rate(self) -> float | None:
        return self.flagged / self.images if self.images else None

    def to_dict(self) -> dict[str, Any]:
        lo, hi = clopper_pearson(self.flagged, self.images)
        d: dict[str, Any] = {"images": self.images, "flagged": self.flagged, "rate": json_number(self.rate),
                             "ci95": [json_number(lo), json_number(hi)] if self.images else None}
        if self.to_target is not None:
            d["attack_success"] = json_number(self.to_target / self.images if self.images else None)
            d["successful"] = self.to_target
            worked = self.to_target and self.flagged_to_target is not None
            d["flagged_successful"] = json_number(self.flagged_to_target / self.to_target) if worked else None
        return d


@dataclass
class GuardResult:
    """A guard and what it measured.

    Attributes:
        wrapper: the guarded model (unchanged; eval mode).
        layer: the watched layer.
        scorer: the suspicion score.
        threshold: flag when suspicion > threshold (None when no threshold could be set).
        trigger: the trigger the neurons were chosen with (target filled in).
        original: a lab model's original trigger, measured when known.
        config: the configuration.
        split: images per part: ``fit``, ``calibration``, ``test``.
        calibration: flagged share of the calibration images.
        clean: flagged share of the test images (the measured false-positive rate).
        stamped: flagged share of test images not of the target, stamped with ``trigger``.
        stamped_original: the same with ``original`` (None without one).
        scores: test-image suspicions: ``clean``, ``stamped``, ``original`` (for the histograms).
        reached: whether the requested rate was reached (see the module docstring).
        reason: why not, when not.
        seconds: wall time.
        holdout: the test images (the export's parity check runs on them).
    """

    wrapper: ModelWrapper
    layer: FeatureLayer
    scorer: Scorer
    threshold: float | None
    trigger: Trigger
    original: Trigger | None
    config: GuardConfig
    split: dict[str, int]
    calibration: Rate
    clean: Rate
    stamped: Rate
    stamped_original: Rate | None
    scores: dict[str, list[float]]
    reached: bool
    reason: str | None
    seconds: float
    holdout: CleanData | None = field(default=None, repr=False)

    def check(self) -> GuardResult:
        """Returns self when the rate was reached; else raises :class:`GuardRateError` (carrying self)."""
        if not self.reached:
            raise GuardRateError(self.reason or "the guard cannot reach the requested false-positive rate",
                                 _rate_hint(self.config, self.split), self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The guard document's measured part (see :func:`bdscan.guard.report.guard_document`)."""
        return {
            "fpr_requested": self.config.fpr,
            "threshold": json_number(self.threshold),
            "reached": self.reached,
            "reason": self.reason,
            "layer": self.layer.to_dict(),
            "neurons": {"count": int(self.scorer.idx.numel()), "share": self.config.neurons, "of": self.layer.width,
                        "indices": [int(i) for i in self.scorer.idx], "effect": [json_number(float(e), 4) for e in self.scorer.effect]},
            "trigger": trigger_summary(self.trigger),
            "original_trigger": trigger_summary(self.original) if self.original is not None else None,
            "split": dict(self.split),
            "calibration": self.calibration.to_dict(),
            "test": {"clean": self.clean.to_dict(), "stamped": self.stamped.to_dict(),
                     "stamped_original": self.stamped_original.to_dict() if self.stamped_original else None},
            "scores": {k: [json_number(v, 4) for v in vs] for k, vs in self.scores.items()},
            "config": self.config.to_dict(),
            "seconds": round(self.seconds, 3),
        }

    def metadata(self) -> dict[str, Any]:
        """What the exported file carries about the guard: threshold, layer, neurons, rates (no score lists)."""
        d = self.to_dict()
        d.pop("scores")
        d["neurons"].pop("effect")
        d["bdscan"] = bdscan.__version__
        d["date"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return d


def _rate_hint(cfg: GuardConfig, split: dict[str, int]) -> str:
    need = min_calibration_images(cfg.fpr)
    total = math.ceil(need / cfg.calibration_fraction)
    return (f"give more clean images with --data (at least {total} for --fpr {cfg.fpr:g}; {split.get('calibration', 0)} of yours "
            "set the threshold) or ask for a higher --fpr")


def split_guard_data(data: CleanData, cfg: GuardConfig) -> tuple[CleanData, CleanData, CleanData]:
    """(fit, calibration, test): stratified by class, seeded (see the module docstring, step 1)."""
    rest, test = split_data(data, cfg.test_fraction, cfg.seed)
    fit, cal = split_data(rest, cfg.calibration_fraction / (1 - cfg.test_fraction), cfg.seed + 1)
    return fit, cal, test


def not_target(data: CleanData, trigger: Trigger) -> torch.Tensor:
    """Images of ``data`` not of the trigger's target (all of them when it has none, or when all are of it)."""
    keep = data.y != int(trigger.target) if trigger.target is not None else torch.ones(len(data), dtype=torch.bool)
    return data.x[keep] if bool(keep.any()) else data.x


def _rate(scores: torch.Tensor, threshold: float | None, logits: torch.Tensor | None = None, target: int | None = None) -> Rate:
    flags = scores > threshold if threshold is not None else torch.zeros_like(scores, dtype=torch.bool)
    if logits is None or target is None:
        return Rate(int(scores.numel()), int(flags.sum()))
    hits = logits.argmax(1) == target
    return Rate(int(scores.numel()), int(flags.sum()), int(hits.sum()), int((flags & hits).sum()))


def build_guard(
    model: ModelWrapper,
    data: CleanData,
    trigger: Trigger,
    cfg: GuardConfig,
    original: Trigger | None = None,
) -> GuardResult:
    """Builds and measures a guard for ``model`` (see the module docstring).

    Args:
        model: the (backdoored) model; its weights are never changed (it is moved to ``cfg.device``).
        data: clean labelled images of its classes (a few hundred), split into fit, calibration and test parts.
        trigger: the trigger to choose neurons with (usually the scan's reversed trigger); one without a target
            gets the class it sends most fit images to.
        cfg: the configuration.
        original: the model's original trigger when known (lab models): its detection is measured too.

    Returns:
        :class:`GuardResult`; ``reached`` is False (and ``reason`` says why) when the rate cannot be kept;
        call :meth:`GuardResult.check` to raise :class:`GuardRateError` then.

    Raises:
        UsageError: a bad configuration, a trigger that does not fit the model, too little data, a layer that
            cannot be watched.
        NumericalError: NaN or infinite features.
    """
    cfg = cfg.validate()
    t0 = time.perf_counter()
    trigger = check_trigger(trigger, model)
    original = check_trigger(original, model) if original is not None else None
    fit, cal, test = split_guard_data(data, cfg)
    model = model.to(cfg.device).eval()
    if trigger.target is None:
        target = infer_target(model, fit, trigger)
        log.info("the trigger has no target; it sends most fit images to class %d", target)
        trigger = replace(trigger, target=target, params={**trigger.params, "target_inferred": True})
    layer = resolve_layer(model, cfg.layer)
    bs = cfg.batch_size
    f_clean, _ = features(model, layer, fit.x, bs)
    f_stamped, _ = features(model, layer, trigger.stamp(not_target(fit, trigger)), bs)
    scorer = select_neurons(f_clean, f_stamped, cfg.neurons)
    s_cal = scorer(features(model, layer, cal.x, bs)[0])
    threshold = conformal_threshold(s_cal, cfg.fpr)
    s_test = scorer(features(model, layer, test.x, bs)[0])
    f_t, l_t = features(model, layer, trigger.stamp(not_target(test, trigger)), bs)
    s_stamped = scorer(f_t)
    scores = {"clean": s_test.tolist(), "stamped": s_stamped.tolist()}
    stamped_original = None
    if original is not None:
        f_o, l_o = features(model, layer, original.stamp(not_target(test, original)), bs)
        s_orig = scorer(f_o)
        scores["original"] = s_orig.tolist()
        stamped_original = _rate(s_orig, threshold, l_o, original.target)
    if not all(torch.isfinite(s).all() for s in (s_cal, s_test, s_stamped)):
        raise NumericalError("the suspicion score is NaN or infinite on some images", "check the model and the data")
    clean = _rate(s_test, threshold)
    split = {"fit": len(fit), "calibration": len(cal), "test": len(test)}
    reached, reason = True, None
    if threshold is None:
        reached = False
        reason = (f"{len(cal)} calibration images cannot set a threshold for a false-positive rate of {cfg.fpr:g} "
                  f"(it needs at least {min_calibration_images(cfg.fpr)})")
    elif binomial_tail(clean.flagged, clean.images, cfg.fpr) < RATE_P:
        reached = False
        reason = (f"the guard flags {clean.flagged} of {clean.images} held-out clean images ({100 * (clean.rate or 0):.1f} %), "
                  f"significantly more than the requested {100 * cfg.fpr:g} % (binomial test, p < {RATE_P:g})")
    result = GuardResult(
        wrapper=model, layer=layer, scorer=scorer, threshold=threshold, trigger=trigger, original=original, config=cfg,
        split=split, calibration=_rate(s_cal, threshold), clean=clean, stamped=_rate(s_stamped, threshold, l_t, trigger.target),
        stamped_original=stamped_original, scores=scores, reached=reached, reason=reason,
        seconds=time.perf_counter() - t0, holdout=test,
    )
    log.info("guard: threshold %s, test false positives %s, stamped flagged %s", threshold, clean.rate, result.stamped.rate)
    return result
