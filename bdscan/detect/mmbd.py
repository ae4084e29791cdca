"""MM-BD as a detector: per class, the largest logit margin an input can reach, and a calibrated test of the maximum.

Wang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types
Using a Maximum Margin Statistic", IEEE S&P 2024; reference code github wanghangpsu/MM-BD (``univ_bd.py``).

A backdoor teaches a model one feature (the trigger) that overrides everything else in the image and sends it to
the target class. Such a shortcut lets an optimised input drive the target's logit abnormally far above every
other logit, whatever the trigger looks like (patch, blend, warp, full image): MM-BD's evidence is that margin,
not the trigger's size. For every class k the detector maximises the margin ``z_k(x) - max_{j != k} z_j(x)`` over
inputs ``x`` in the valid image box [0, 1] (through the wrapper's own normalisation), from several random starting
images (no clean data needed) and, optionally, from clean images of the other classes; the statistic of a class is
the largest margin any of its starts reached. The K statistics are then tested with
:func:`bdscan.detect.mmbd_stats.max_statistic_test`: a Gamma null fitted to the K - 1 classes left when the largest
is set aside, the largest judged as the maximum of K draws, the p-value calibrated by a parametric bootstrap.

Differences from the reference, and why (measurements: benchmarks/README.md, "MM-BD"):

* Adam on the pixels, projected back onto [0, 1] after every step (the reference: plain SGD at lr 0.01 on a
  clamped input, 300 steps, 30 starts per class). Adam's step does not depend on the model's logit scale, so one
  learning rate serves every model; the reference schedule is the ``original`` budget.
* All classes' starts are optimised together in one batch (chunked by :attr:`MMBDConfig.chunk`); the loss is a sum
  over independent inputs and Adam's update is per pixel, so batching changes no input's trajectory.
* How the margin is read (``statistic``): ``"logit"`` is the reference's. ``"prenorm"`` (the default) reads it with
  the division by the per-sample standard deviation in the model's last LayerNorm replaced by a constant (that
  deviation's median on the starting images). A LayerNorm before the head bounds every logit, and a transformer
  trained with label smoothing puts every class's maximum near the same ceiling, so the reference statistic sees
  no outlier there; without the division, the trigger's abnormally strong activation shows again. On a model
  without a LayerNorm (most CNNs) the two are the same.
* A per-class baseline (``baseline``), when clean images of every class are given: each class's maximum less the
  median margin of its own clean images. On an imbalanced data set (GTSRB: 210 to 2250 training images a class)
  the maximum a clean class reaches grows with how much of it the model saw, which widens the null until a
  backdoor's maximum no longer stands out; the class's own images measure that scale. Without clean data the raw
  maximum is tested, as in the reference.
* The null and its p-value (:mod:`bdscan.detect.mmbd_stats`): the reference's plug-in p-value flags 10-30 % of
  samples drawn from the null itself at 0.05; it is calibrated here by a parametric bootstrap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from bdscan.data import CleanData
from bdscan.detect.base import Detector, DetectorProgress, Evidence, ScanSettings, backdoor_rule, register_detector
from bdscan.detect.config import BUDGETS, images_per_chunk
from bdscan.detect.inversion import prepared
from bdscan.detect.mmbd_stats import MIN_CLASSES, MaxTest, max_statistic_test
from bdscan.errors import NumericalError, UsageError
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.report.images import data_uri

log = logging.getLogger(__name__)

#: the optimisers of the margin, by name: (parameters, learning rate) -> optimiser
OPTIMISERS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    # the reference builds a new SGD (momentum 0.2) every step, so its momentum never acts: plain SGD
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
}

#: images per forward on a CPU at 3×32×32 (scaled down for larger inputs): all of a 43-class model's starts at once
CPU_CHUNK_PIXELS = 256 * 3 * 32 * 32
#: the same on a GPU
GPU_CHUNK_PIXELS = 4096 * 3 * 32 * 32


@dataclass(frozen=True)
class Schedule:
    """How hard MM-BD searches: optimisation steps, random starts per class, optimiser and learning rate."""

    steps: int
    random_starts: int
    optimiser: str = "adam"
    lr: float = 0.05


#: MM-BD's schedule for each of bdscan's budget names (:data:`bdscan.detect.config.BUDGETS`). "original" is the
#: reference's own (SGD, lr 0.01, 300 steps, 30 random starts per class); the others use Adam, whose maxima change
#: little after about 60 steps (and "thorough" changed no verdict of "fast" where both ran: benchmarks/README.md, "MM-BD").
SCHEDULES: dict[str, Schedule] = {
    "original": Schedule(steps=300, random_starts=30, optimiser="sgd", lr=0.01),
    "thorough": Schedule(steps=200, random_starts=8),
    "fast": Schedule(steps=60, random_starts=4),
    "quick": Schedule(steps=30, random_starts=2),
    "smoke": Schedule(steps=8, random_starts=1),
}

#: per-class baselines subtracted from the maximum margins: "clean-median" (the median margin of the class's own
#: clean images, when every class has at least :data:`MIN_BASELINE_IMAGES`) or "none" (the reference's raw maximum)
BASELINES = ("clean-median", "none")
MIN_BASELINE_IMAGES = 3

#: how a class's margin is read off the model (see the module docstring), and what reports call it
STATISTIC_TITLES: dict[str, str] = {"prenorm": "margin before the last LayerNorm's scaling", "logit": "logit margin"}
STATISTICS = tuple(STATISTIC_TITLES)


@dataclass(frozen=True)
class MMBDConfig:
    """MM-BD's configuration.

    Attributes:
        budget: the budget name the schedule came from.
        steps: optimisation steps per start.
        random_starts: uniformly random starting images per class (seeded by ``(seed, class)``).
        clean_starts: clean images of the other classes used as further starts per class (0 = none, the default:
            the reference needs none, and in a pilot on the GTSRB ViT clean starts ranked the target lower than
            random ones while the maxima stayed the same). Classes get fewer when the data has fewer images; with
            no data, none.
        optimiser: "adam" or "sgd" (:data:`OPTIMISERS`).
        lr: learning rate in pixel units.
        statistic: "prenorm" or "logit" (:data:`STATISTICS`).
        baseline: "clean-median" or "none" (:data:`BASELINES`): what is subtracted from each class's maximum.
        alpha: significance level: the model is flagged when the calibrated p-value is below it.
        bootstrap: parametric bootstrap samples of the p-value's calibration.
        chunk: images per batched forward; None = automatic (:data:`CPU_CHUNK_PIXELS`, :data:`GPU_CHUNK_PIXELS`).
        seed: seed of the starts, the choice of clean starts and the bootstrap.
        device: "cpu" or "cuda".
    """

    budget: str = "fast"
    steps: int = SCHEDULES["fast"].steps
    random_starts: int = SCHEDULES["fast"].random_starts
    clean_starts: int = 0
    optimiser: str = "adam"
    lr: float = SCHEDULES["fast"].lr
    statistic: str = "prenorm"
    baseline: str = "clean-median"
    alpha: float = 0.05
    bootstrap: int = 2000
    chunk: int | None = None
    seed: int = 0
    device: str = "cpu"

    def with_(self, **changes: Any) -> MMBDConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> MMBDConfig:
        if self.steps < 1 or self.random_starts < 0 or self.clean_starts < 0 or self.random_starts + self.clean_starts < 1:
            raise UsageError("MM-BD needs at least one step and one start per class", "check --steps and --budget")
        if self.optimiser not in OPTIMISERS:
            raise UsageError(f"unknown MM-BD optimiser {self.optimiser!r}", f"use one of: {', '.join(OPTIMISERS)}")
        if self.baseline not in BASELINES:
            raise UsageError(f"unknown MM-BD baseline {self.baseline!r}", f"use one of: {', '.join(BASELINES)}")
        if self.statistic not in STATISTICS:
            raise UsageError(f"unknown MM-BD statistic {self.statistic!r}", f"use one of: {', '.join(STATISTICS)}")
        if not (0 < self.alpha < 1) or not self.lr > 0 or (self.chunk is not None and self.chunk < 1):
            raise UsageError("MM-BD's alpha must be in (0, 1), its learning rate and chunk positive", "e.g. alpha 0.05, lr 0.05")
        if self.bootstrap + 1 < 2 / self.alpha:  # fewer samples could never give a p-value below alpha
            raise UsageError(f"MM-BD's bootstrap of {self.bootstrap} cannot reach p < {self.alpha:g}",
                             f"use at least {math.ceil(2 / self.alpha) - 1} bootstrap samples")
        return self

    def resolved_chunk(self, input_size: tuple[int, ...]) -> int:
        return images_per_chunk(self.chunk, self.device, input_size, CPU_CHUNK_PIXELS, GPU_CHUNK_PIXELS)


# ---------------------------------------------------------------------------------------------- the statistic


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_k - max_{j != k} z_j`` per row: (N, K) logits and (N,) classes k -> (N,) margins."""
    zk = logits.gather(1, labels[:, None])[:, 0]
    return zk - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


def last_layer_norm(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.LayerNorm | None:
    """The LayerNorm a forward of ``x`` calls last (a transformer's final norm before its head), or None."""
    called: list[torch.nn.Module] = []
    # a norm over the last axis only: :func:`unnormalised` re-does exactly that normalisation
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) == 1]
    hooks = [m.register_forward_hook(lambda mod, i, o: called.append(mod)) for m in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return called[-1] if called else None


@contextlib.contextmanager
def unnormalised(norm: torch.nn.LayerNorm, scale: float) -> Iterator[None]:
    """For the duration, ``norm`` divides by the constant ``scale`` instead of each sample's standard deviation
    (it still centres, then applies its affine weights), so the logits after it are no longer bounded."""

    def hook(mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        h = inputs[0]
        y = (h - h.mean(-1, keepdim=True)) / scale
        if norm.weight is not None:
            y = y * norm.weight
        return y + norm.bias if norm.bias is not None else y

    handle = norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def norm_scale(model: torch.nn.Module, norm: torch.nn.LayerNorm, x: torch.Tensor) -> float:
    """The median per-token standard deviation of ``norm``'s input over images ``x``: the constant
    :func:`unnormalised` divides by, so that margins start on the model's own scale."""
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach().float().std(-1, unbiased=False).flatten()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return max(float(torch.cat(seen).median()), 1e-6)


# ---------------------------------------------------------------------------------------------- the optimisation


@dataclass
class MarginRun:
    """The margins MM-BD reached.

    Attributes:
        per_start: (K, S) the best margin of each start (random starts first, then clean ones).
        inputs: (K, C, H, W) the input of each class that reached its best margin.
        history: (steps, K) each class's best margin so far after every step.
        baseline: (K,) the median margin of each class's own clean images, or None (no baseline).
    """

    per_start: np.ndarray
    inputs: torch.Tensor
    history: np.ndarray
    baseline: np.ndarray | None = None

    @property
    def maxima(self) -> np.ndarray:
        """(K,) the largest margin of each class's starts."""
        return self.per_start.max(1)

    @property
    def statistics(self) -> np.ndarray:
        """(K,) each class's statistic: its largest margin, less its clean baseline when there is one."""
        return self.maxima - self.baseline if self.baseline is not None else self.maxima


def starting_images(model: ModelWrapper, data: CleanData | None, cfg: MMBDConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every class's starts: ``cfg.random_starts`` uniform images seeded by ``(seed, class)`` (so a class's starts
    do not depend on the class count), then up to ``cfg.clean_starts`` clean images of other classes.

    Returns:
        (images (K·S, C, H, W), classes (K·S,), S): class k's starts are rows k·S .. k·S + S - 1.
    """
    k_all = model.num_classes
    xs: list[torch.Tensor] = []
    clean = 0
    have = data is not None and len(data) > 0
    if cfg.clean_starts and have:
        assert data is not None
        clean = min(cfg.clean_starts, min(int((data.y != k).sum()) for k in range(k_all)))
    for k in range(k_all):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        xs.append(torch.rand((cfg.random_starts, *model.input_size), generator=g))
        if clean:
            assert data is not None
            pool = (data.y != k).nonzero().flatten()
            xs.append(data.x[pool[torch.randperm(len(pool), generator=g)[:clean]]].float())
    s = cfg.random_starts + clean
    return torch.cat(xs), torch.arange(k_all).repeat_interleave(s), s


def maximise_margins(model: ModelWrapper, x0: torch.Tensor, labels: torch.Tensor, starts: int, cfg: MMBDConfig,
                     progress: DetectorProgress | None = None) -> MarginRun:
    """Maximises each start's margin for its class by projected gradient ascent in [0, 1].

    Args:
        model: the wrapper (eval mode, on ``cfg.device``, parameters frozen: see :func:`prepared`).
        x0: (K·S, C, H, W) starting images in [0, 1].
        labels: (K·S,) the class of each start.
        starts: S, starts per class.
        cfg: steps, optimiser, learning rate, chunk, device.
        progress: called after every 10 steps of a chunk.

    Raises:
        NumericalError: the model returns NaN or inf logits on an input in [0, 1].
    """
    dev = torch.device(cfg.device)
    n = len(x0)
    k_all = n // starts
    chunk = cfg.resolved_chunk(tuple(x0.shape[1:]))
    best = torch.full((n,), -math.inf)
    best_x = x0.clone()
    history = torch.full((cfg.steps, n), -math.inf)
    total = math.ceil(n / chunk) * cfg.steps
    done = 0
    for lo in range(0, n, chunk):
        xc, yc = x0[lo : lo + chunk].to(dev), labels[lo : lo + chunk].to(dev)
        x = xc.clone().requires_grad_(True)
        opt = OPTIMISERS[cfg.optimiser]([x], cfg.lr)
        b = torch.full((len(xc),), -math.inf, device=dev)
        bx = xc.clone()
        for step in range(cfg.steps):
            m = margins(model(x).float(), yc)
            if not torch.isfinite(m).all():  # a NaN would never count as "better" and pass unnoticed
                raise NumericalError("the model returns NaN or inf logits on images in [0, 1]",
                                     "check the model's weights (bdscan inspect MODEL); MM-BD cannot measure margins")
            md = m.detach()
            better = md > b
            b = torch.where(better, md, b)
            bx[better] = x.detach()[better]
            history[step, lo : lo + len(xc)] = b.cpu()
            opt.zero_grad(set_to_none=True)
            (-m.sum()).backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)  # projection onto the image box: every input scored is a valid image
            done += 1
            if progress is not None and ((step + 1) % 10 == 0 or step + 1 == cfg.steps):
                progress("mm-bd", done, total, {"max_margin": float(b.max())})
        best[lo : lo + len(xc)] = b.cpu()
        best_x[lo : lo + len(xc)] = bx.cpu()
    per_start = best.view(k_all, starts)
    top = per_start.argmax(1)
    inputs = best_x.view(k_all, starts, *x0.shape[1:])[torch.arange(k_all), top]
    hist = history.view(cfg.steps, k_all, starts).amax(2).numpy()
    return MarginRun(per_start.numpy().astype(np.float64), inputs, hist)


@torch.no_grad()
def clean_baseline(model: ModelWrapper, data: CleanData | None, cfg: MMBDConfig) -> np.ndarray | None:
    """(K,) the median margin of each class's own clean images for that class (as the model's logits are read at
    the time), or None when some class has fewer than :data:`MIN_BASELINE_IMAGES` images."""
    k_all = model.num_classes
    if data is None or len(data) == 0:
        return None
    y = data.y.long()
    if int(torch.bincount(y, minlength=k_all)[:k_all].min()) < MIN_BASELINE_IMAGES:
        return None
    chunk = cfg.resolved_chunk(tuple(data.x.shape[1:]))
    m = torch.cat([margins(model(data.x[i : i + chunk].to(cfg.device).float()).float(), y[i : i + chunk].to(cfg.device)).cpu()
                   for i in range(0, len(y), chunk)])
    if not torch.isfinite(m).all():
        raise NumericalError("the model returns NaN or inf logits on the clean images", "check the model's weights and the data")
    return np.array([float(m[y == k].median()) for k in range(k_all)], dtype=np.float64)


def measure(model: ModelWrapper, data: CleanData | None, cfg: MMBDConfig,
            progress: DetectorProgress | None = None) -> tuple[MarginRun, dict[str, Any]]:
    """MM-BD's per-class margins for ``model`` (see :func:`maximise_margins`), with the statistic in force.

    Returns:
        (the run, what was measured: statistic in force, norm and its scale, starts used).
    """
    x0, labels, s = starting_images(model, data, cfg)
    used: dict[str, Any] = {"statistic": cfg.statistic, "random_starts": cfg.random_starts, "clean_starts": s - cfg.random_starts}
    with prepared(model, "fp32", cfg.device):
        norm = last_layer_norm(model, x0[:1].to(cfg.device)) if cfg.statistic == "prenorm" else None
        ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if norm is not None:
            scale = norm_scale(model, norm, x0[: cfg.resolved_chunk(tuple(x0.shape[1:]))].to(cfg.device))
            used.update(norm=type(norm).__name__, norm_scale=scale)
            ctx = unnormalised(norm, scale)
        elif cfg.statistic == "prenorm":
            used["statistic"] = "logit"  # no LayerNorm: the logits have no such ceiling, and both statistics agree
            used["note"] = "the model has no LayerNorm; the logit margin was measured"
        with ctx:
            run = maximise_margins(model, x0, labels, s, cfg, progress)
            if cfg.baseline == "clean-median":
                run.baseline = clean_baseline(model, data, cfg)
    used["baseline"] = "clean-median" if run.baseline is not None else "none"
    if cfg.baseline == "clean-median" and run.baseline is None:
        used["baseline_note"] = f"no clean baseline: some class has fewer than {MIN_BASELINE_IMAGES} clean images"
    return run, used


# ---------------------------------------------------------------------------------------------- the detector


@dataclass
class MMBDResult:
    """MM-BD's findings behind the detector protocol.

    Attributes:
        evidence: the conclusion (p-value, suspected class).
        config: the configuration that ran.
        seconds: wall time.
        run: the margins reached (None when too few classes to test).
        test: the calibrated test of the largest statistic (None when too few classes).
        measured: what was measured (statistic in force, norm scale, baseline, starts used).
        class_names: the model's class names.
    """

    evidence: Evidence
    config: MMBDConfig
    seconds: float
    run: MarginRun | None
    test: MaxTest | None
    measured: dict[str, Any]
    class_names: list[str]
    _figure: torch.Tensor | None = field(default=None, repr=False)

    def figure(self) -> torch.Tensor | None:
        """The null-density picture (3, H, W), drawn once."""
        if self._figure is None and self.run is not None and self.test is not None:
            from bdscan.detect.mmbd_plot import null_figure

            what = STATISTIC_TITLES[str(self.measured.get("statistic"))]
            xlabel = "per class: the largest margin an optimised input reaches"
            if self.run.baseline is not None:
                xlabel += ",\nless the median margin of the class's own clean images"
            self._figure = null_figure(self.run.statistics, self.test, self.class_names, f"MM-BD ({what})", xlabel)
        return self._figure

    def section(self, class_names: list[str], example: torch.Tensor | None, original: Any | None) -> dict[str, Any]:
        """Per-class statistics (``scores``, as the HTML lists them), the fitted null, the p-values, the pictures."""
        sec: dict[str, Any] = {"measured": {k: json_number(v) if isinstance(v, float) else v for k, v in self.measured.items()}}
        if self.run is None or self.test is None:
            return sec
        run, stats = self.run, self.run.statistics
        sec["scores"] = [{"label": k, "name": class_names[k] if k < len(class_names) else str(k), "score": json_number(float(v), 4),
                          "max_margin": json_number(float(run.maxima[k]), 4),
                          "baseline": None if run.baseline is None else json_number(float(run.baseline[k]), 4),
                          "starts": [json_number(float(u), 4) for u in run.per_start[k]]} for k, v in enumerate(stats)]
        sec["null"] = {k: json_number(v) if isinstance(v, float) else v for k, v in self.test.to_dict().items()}
        sec["max_label"] = self.test.target
        sec["max_statistic"] = json_number(self.test.top, 4)
        sec["median_statistic"] = json_number(float(np.median(np.delete(stats, self.test.target))), 4)  # of the other classes
        sec["p_value"] = json_number(self.test.p_value)
        fig = self.figure()
        images = {"null": data_uri(fig)} if fig is not None else {}
        images["input"] = data_uri(run.inputs[self.test.target], upscale=4)
        sec["images"] = images
        return sec

    def arrays(self) -> dict[str, np.ndarray]:
        """``mmbd_stats`` (K,) the tested statistics, ``mmbd_max`` (K,) the maxima, ``mmbd_baseline`` (K,) (when
        there is one), ``mmbd_starts`` (K, S), ``mmbd_history`` (steps, K) and ``mmbd_inputs`` (K, C, H, W)."""
        if self.run is None:
            return {}
        run = self.run
        out = {"mmbd_stats": run.statistics.astype(np.float64), "mmbd_max": run.maxima.astype(np.float64),
               "mmbd_starts": run.per_start.astype(np.float64), "mmbd_history": run.history.astype(np.float64),
               "mmbd_inputs": run.inputs.numpy().astype(np.float32)}
        if run.baseline is not None:
            out["mmbd_baseline"] = run.baseline.astype(np.float64)
        return out

    def images(self, example: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        fig = self.figure()
        if fig is not None:
            yield "mm-bd/null.png", fig
        if self.run is not None and self.test is not None:
            yield f"mm-bd/label{self.test.target:03d}_input.png", self.run.inputs[self.test.target]


def _name(names: list[str], k: int) -> str:
    return f"class {k}" if k >= len(names) or names[k] == str(k) else f"class {k} ({names[k]})"


def mmbd_evidence(test: MaxTest, run: MarginRun, names: list[str], statistic: str) -> Evidence:
    """The evidence of one test: "backdoor" when the calibrated p-value is below alpha, else "clean"."""
    stats = run.statistics
    med = float(np.median(np.delete(stats, test.target)))
    cls = _name(names, test.target)
    what = STATISTIC_TITLES.get(statistic, statistic)
    details = {"p_value": json_number(test.p_value), "p_raw": json_number(test.p_raw), "max_statistic": json_number(test.top, 4),
               "median_statistic": json_number(med, 4), "critical": json_number(test.critical, 4), "alpha": test.alpha,
               "statistic": statistic, "baseline": "clean-median" if run.baseline is not None else "none"}
    if run.baseline is not None:
        reach = (f"pushes {cls}'s {what} {test.top:.3g} beyond the median of its own clean images, far more than the "
                 f"other classes (median {med:.3g})")
    else:
        reach = f"drives {cls} to a {what} of {test.top:.3g}, far beyond the other classes (median {med:.3g})"
    if test.p_value < test.alpha:
        reason = (f"An optimised input {reach}: a clean model of {test.classes} classes shows a maximum this extreme "
                  f"with probability p = {test.p_value:.2g} < {test.alpha:g}.")
        return Evidence("mm-bd", "backdoor", test.target, test.top, test.critical, reason, details, test.p_value)
    reason = (f"No class's maximum {what} is abnormal: the largest, {cls} at {test.top:.3g} (other classes' median "
              f"{med:.3g}{', both less their clean medians' if run.baseline is not None else ''}), is what the largest of "
              f"{test.classes} classes of a clean model reaches with probability p = {test.p_value:.2g} ≥ {test.alpha:g}.")
    return Evidence("mm-bd", "clean", test.target, test.top, test.critical, reason, details, test.p_value)


@register_detector
class MMBD(Detector):
    """Per class, the largest margin an optimised input reaches; a class whose maximum is too large for the other
    classes' Gamma distribution (calibrated p-value below alpha) is the suspected target."""

    name = "mm-bd"
    title = "MM-BD (maximum margin)"
    summary = ("per class, the largest logit margin an optimised input reaches (no clean data needed); flags a class whose "
               "maximum is an outlier of the others' Gamma fit (calibrated p < 0.05)")
    json_key = "mm_bd"
    reference = ("Wang, Miller, Kesidis, MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern "
                 "Types Using a Maximum Margin Statistic, IEEE S&P 2024")
    sarif_rule: ClassVar[dict[str, Any]] = backdoor_rule(
        "BDS004", "backdoor-suspected-max-margin", "Neural backdoor suspected: abnormally large maximum margin of one class",
        "MM-BD found a class whose logit can be driven abnormally far above all others by an optimised input, "
        "further than the other classes' distribution allows (calibrated p-value below 0.05). A backdoor trigger is "
        "such a shortcut to its target class, whatever its shape (patch, blend, warp or whole-image pattern).",
        "Do not deploy this model. Find the trigger (bdscan scan MODEL --detectors neural-cleanse shows reversed "
        "triggers), remove the backdoor (bdscan repair MODEL --data DATA) and scan again, or retrain from "
        "trusted data and find out where the checkpoint came from. The report shows every class's maximum "
        "margin against the fitted null distribution.",
        ("See the reversed trigger: `bdscan scan MODEL --detectors neural-cleanse,mm-bd --report report.html`.",
         "Remove the backdoor: `bdscan repair MODEL --data DATA`, and scan the repaired model again.",
         "Or retrain from trusted data, and find out where this checkpoint came from."),
        "The scan folder's `mm-bd/null.png` shows every class's maximum margin against the fitted null.")

    def configure(self, settings: ScanSettings) -> MMBDConfig:
        """The budget's schedule (:data:`SCHEDULES`), ``--steps`` and ``--seed`` applied. ``--samples`` sets the
        clean starts only when clean starts are in use (their total over the classes); the other scan options
        (levels, threshold, precision, workers) are Neural Cleanse's."""
        if settings.budget not in BUDGETS or settings.budget not in SCHEDULES:
            raise UsageError(f"unknown budget {settings.budget!r}", f"use one of: {', '.join(SCHEDULES)}")
        sch = SCHEDULES[settings.budget]
        cfg = MMBDConfig(budget=settings.budget, steps=sch.steps, random_starts=sch.random_starts, optimiser=sch.optimiser,
                         lr=sch.lr, seed=settings.seed, device=settings.device)
        if settings.steps is not None:
            cfg = cfg.with_(steps=settings.steps)
        return cfg.validate()

    def passes(self, model: ModelWrapper, images: int, config: MMBDConfig) -> float:
        """Every class's starts, each through every step (clean starts counted in full)."""
        return float(model.num_classes * (config.random_starts + config.clean_starts) * config.steps)

    def detect(self, model: ModelWrapper, data: CleanData | None, config: MMBDConfig,
               progress: DetectorProgress | None = None) -> MMBDResult:
        t0 = time.perf_counter()
        names = [model.info.class_name(k) for k in range(model.num_classes)]
        if model.num_classes < MIN_CLASSES:
            ev = Evidence(self.name, "inconclusive", None, 0.0, 0.0,
                          f"MM-BD needs at least {MIN_CLASSES} classes to fit a null distribution; this model has {model.num_classes}.")
            return MMBDResult(ev, config, time.perf_counter() - t0, None, None, {}, names)
        run, measured = measure(model, data, config, progress)
        test = max_statistic_test(run.statistics, config.alpha, config.bootstrap, config.seed)
        ev = mmbd_evidence(test, run, names, str(measured["statistic"]))
        log.info("mm-bd: max %s margin %.4g (class %d), p = %.3g", measured["statistic"], test.top, test.target, test.p_value)
        return MMBDResult(ev, config, time.perf_counter() - t0, run, test, measured, names)


__all__ = ["BASELINES", "MMBD", "OPTIMISERS", "SCHEDULES", "STATISTICS", "MMBDConfig", "MMBDResult", "MarginRun", "Schedule",
           "clean_baseline", "last_layer_norm", "margins", "maximise_margins", "measure", "mmbd_evidence", "starting_images",
           "unnormalised"]
