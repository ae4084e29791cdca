"""Adversarial neuron noise as a detector: whether a small perturbation of the network's normalisation layers makes
its errors collapse onto one class.

Xu, Liu, Koffas, Lagendijk, Picek, "BAN: Detecting Backdoors Activated by Adversarial Neuron Noise", NeurIPS 2024;
reference code github xiaoyunxxy/ban (``ban_detection.py``).

Neural Cleanse asks how small an input trigger can send every image to a class, and misses triggers that are not
small (full-image, blended, warping, noise). BAN perturbs the network instead: a backdoor is a pathway that a
small change to the neurons can switch on for every input, and a clean model has no such pathway. The noise is
multiplicative, ``w' = w · (1 + δ)`` with ``|δ| <= ε``, on the gain and shift of every normalisation layer
(BatchNorm, LayerNorm, GroupNorm), found by signed-gradient steps that raise the cross-entropy of half of the clean
images (started uniformly in the box). The other half is then classified through the noisy model, and the
evidence is where its errors go.

Differences from the reference, and why (measured on the evaluation zoo's calibration half: docs/verdict.md,
"Neuron noise"; benchmarks/README.md):

* The readout. BAN also learns a mask on the head's features and reads the accuracy of the masked, noisy model;
  on this zoo that mask alone sent every CIFAR-10 model to one class whatever its backdoor. Here the noise is read
  alone, and as a per-class statistic rather than one accuracy: for each class c its inflow ``n_c`` (images of
  other classes predicted c) over ``N_c`` (images not of c). Neural Cleanse's size test
  (:func:`bdscan.detect.anomaly.min_size_test`) on the "sizes" ``N_c / (n_c + 0.5)`` names the class the errors
  collapse onto and gives a p-value calibrated for K classes, with the other classes as the null (no clean
  models needed). The 0.5 keeps a class that received no error finite. When the noise causes few errors and
  they all go to one class, the other classes' sizes differ only by their exposures and that test would call
  even a handful of errors an outlier; an accurate clean model does that when the noise pushes one class onto
  its nearest neighbour. A backdoor's collapse is different: *most classes'* errors go to the target. So the
  p-value is the larger of the size test's and a count test over the classes that made errors (:func:`count_p`:
  could that many of them, each sending its errors mainly to a random other class, pick the suspect?). Either
  alone is valid, so their maximum is; on the calibration half the count test never changed a verdict
  (docs/verdict.md).
* Where it applies. On the BatchNorm CNNs of the zoo the noise sends the errors to one "sink" class whatever the
  backdoor (ε >= 0.05), and below that no target stands out; on LayerNorm models (every transformer) the
  backdoors' targets stand out at ε = 0.1 and clean models' sinks do not. So a model with no LayerNorm gets
  "not applicable" without a p-value (not a test: it costs the other detectors nothing), and ε is 0.1.
* In the combined verdict its weight is 0.1 (:attr:`NeuronNoise.weight`): its evidence, when present, is
  overwhelming (p far below 0.001 on most calibration detections), while Neural Cleanse's detections near α would
  be lost to an equal split of α.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.func import functional_call

from bdscan.data import CleanData, balanced_sample
from bdscan.detect.anomaly import MIN_CLASSES, SizeTest, SpreadFloor, min_size_test
from bdscan.detect.base import Detector, DetectorProgress, Evidence, ScanSettings, backdoor_rule, p_number, register_detector
from bdscan.detect.config import BUDGETS, images_per_chunk
from bdscan.detect.inversion import prepared
from bdscan.errors import NumericalError, UsageError
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.report.images import data_uri

log = logging.getLogger(__name__)

#: the layers whose affine gain and shift carry the noise
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
#: added to every class's inflow before the ratio (a class that received no error keeps a finite size)
SMOOTHING = 0.5
#: the least spread of the other classes' log sizes (only to avoid dividing by zero; never reached on the zoo)
MIN_LOG_SD = 1e-9
#: images per forward on a CPU at 3×32×32, scaled down for larger inputs: the zoo's 43-class halves in one forward
CPU_CHUNK_PIXELS = 512 * 3 * 32 * 32
#: the same on a GPU
GPU_CHUNK_PIXELS = 4096 * 3 * 32 * 32

#: signed-gradient steps per budget (:data:`bdscan.detect.config.BUDGETS`); ε stays 0.1 whatever the budget, since
#: the test was calibrated there. "fast" (20 steps) is what the calibration half measured.
STEPS: dict[str, int] = {"original": 20, "thorough": 20, "fast": 20, "quick": 10, "smoke": 4}


@dataclass(frozen=True)
class NeuronNoiseConfig:
    """Neuron noise's configuration.

    Attributes:
        budget: the budget name the steps came from.
        eps: the noise's bound: every gain and shift is multiplied by a factor in [1 - eps, 1 + eps].
        steps: signed-gradient steps; each moves δ by ``2 · eps / steps``, so the steps can cross the box.
        max_images: at most this many clean images are used (a balanced draw by the seed when there are more),
            half to find the noise and half to read it.
        alpha: the level at which the detector's own status says "backdoor" (the combined verdict applies its own).
        seed: draws the split into halves (and the balanced draw) and the noise's starting point.
        device: "cpu" or "cuda".
        chunk: images per forward; None = automatic (:data:`CPU_CHUNK_PIXELS`, :data:`GPU_CHUNK_PIXELS`).
        layer_norm_only: report "not applicable" (no p-value) for a model without a LayerNorm (the calibrated
            default); False measures any model with a normalisation layer, uncalibrated there.
        cross_fit_below: with fewer images than this (after the cap), also find a second noise on the readout half
            (from its own random start) and read the first half through it, pooling both readouts (a cross-fit):
            every image is read once, by a noise that did not see it, for twice the readout at twice the cost. The
            test's power grows with the readout (docs/scanning.md), and a small one is where it is short. 0: never.
        no_split_below: with fewer images than this (after the cap), the noise is found on all of them and all of
            them are read (no halves): the search has every image and the readout is twice as large. 0: never.
        p_rule: how the p-value joins the size test and the count test (:data:`P_RULES`).
    """

    budget: str = "fast"
    eps: float = 0.1
    steps: int = STEPS["fast"]
    max_images: int = 1024
    alpha: float = 0.05
    seed: int = 0
    device: str = "cpu"
    chunk: int | None = None
    layer_norm_only: bool = True
    cross_fit_below: int = 0
    no_split_below: int = 0
    p_rule: str = "larger"

    def with_(self, **changes: Any) -> NeuronNoiseConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> NeuronNoiseConfig:
        if not (0 < self.eps < 1):
            raise UsageError(f"neuron noise's bound {self.eps:g} is not in (0, 1)", "use e.g. 0.1")
        if self.steps < 1 or self.max_images < 4 or (self.chunk is not None and self.chunk < 1):
            raise UsageError("neuron noise needs at least one step, four images and a positive chunk", "check --budget")
        if not (0 < self.alpha < 1):
            raise UsageError(f"alpha {self.alpha:g} is not in (0, 1)", "use e.g. 0.05")
        if self.p_rule not in P_RULES:
            raise UsageError(f"neuron noise's p-value rule {self.p_rule!r} is not one of {', '.join(P_RULES)}",
                             "use \"larger\"")
        return self

    def resolved_chunk(self, input_size: tuple[int, ...]) -> int:
        return images_per_chunk(self.chunk, self.device, input_size, CPU_CHUNK_PIXELS, GPU_CHUNK_PIXELS)


# ---------------------------------------------------------------------------------------------- the noise


def noisy_names(model: nn.Module) -> list[str]:
    """The parameter names that carry noise: every normalisation layer's affine gain and shift, in module order."""
    names = []
    for mn, mod in model.named_modules():
        if isinstance(mod, NORM_LAYERS) and getattr(mod, "weight", None) is not None:
            names.append(f"{mn}.weight")
            if getattr(mod, "bias", None) is not None:
                names.append(f"{mn}.bias")
    return names


def has_layer_norm(model: nn.Module) -> bool:
    """Whether the model has a LayerNorm (timm's and Hugging Face's are subclasses of torch's)."""
    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def noisy_params(params: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with each one named in ``deltas`` multiplied by ``1 + δ`` (for :func:`torch.func.functional_call`)."""
    return {n: p * (1 + deltas[n]) if n in deltas else p for n, p in params.items()}


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def ascend(model: nn.Module, params: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], x: torch.Tensor,
           y: torch.Tensor, eps: float, steps: int, chunk: int, progress: DetectorProgress | None = None,
           sign: float = 1.0) -> list[float]:
    """Signed-gradient ascent of the mean cross-entropy of ``(x, y)`` over the noise ``deltas`` (in place), or with
    ``sign`` -1 descent (a noise that sends the images *to* ``y``: the benchmark's per-class mode).

    Args:
        model: the wrapper, eval mode, parameters frozen.
        params: its parameters by name (the noise multiplies those named in ``deltas``).
        deltas: name -> δ of the parameter's shape, in [-eps, eps]; updated in place.
        x: (N, C, H, W) images in [0, 1], on the model's device; y: (N,) their classes.
        eps: the bound of δ.
        steps: signed-gradient steps of ``2 · eps / steps``.
        chunk: images per forward; the gradient is accumulated over chunks (one chunk: the plain mean).
        progress: called after every step.
        sign: +1 raises the cross-entropy (the detector's noise), -1 lowers it.

    Returns:
        the cross-entropy before each step.

    Raises:
        NumericalError: the noisy model's loss is NaN or infinite.
    """
    n = len(y)
    for v in deltas.values():
        v.requires_grad_(True)
    losses = []
    for step in range(steps):
        grads = [torch.zeros_like(v) for v in deltas.values()]
        total = 0.0
        for sl in _chunks(n, chunk):
            # weighted so that the chunks' gradients add up to the mean's (a weight of exactly 1.0 for one chunk)
            loss = F.cross_entropy(functional_call(model, noisy_params(params, deltas), (x[sl],)).float(), y[sl]) * ((sl.stop - sl.start) / n)
            if not torch.isfinite(loss):
                raise NumericalError("the model's loss under neuron noise is NaN or infinite",
                                     "check the model's weights (bdscan inspect MODEL); neuron noise cannot be measured")
            for acc, g in zip(grads, torch.autograd.grad(loss, list(deltas.values())), strict=True):
                acc.add_(g)
            total += float(loss.detach())
        losses.append(total)
        with torch.no_grad():
            for v, g in zip(deltas.values(), grads, strict=True):
                v.add_(eps / steps * 2 * sign * g.sign()).clamp_(-eps, eps)
        if progress is not None:
            progress("neuron-noise", step + 1, steps, {"loss": total})
    for v in deltas.values():
        v.requires_grad_(False)
    return losses


@dataclass
class NoiseRun:
    """What one noise did.

    Attributes:
        confusion: (K, K) readout images by true class (rows) and prediction under the noise (columns).
        clean_accuracy: the readout half's accuracy without noise.
        noisy_accuracy: its accuracy under the noise.
        losses: (steps,) the optimisation half's cross-entropy before each step (cross-fit: (2 · steps,), the first
            noise's then the second's).
        images: how many images found the noise and how many were read (cross-fit: every image both).
        noisy_layers: how many parameters carried noise.
        clean_confusion: (K, K) the same readout images by true class and prediction without noise (None when not
            measured, e.g. a recording made before it was kept).
    """

    confusion: np.ndarray
    clean_accuracy: float
    noisy_accuracy: float
    losses: np.ndarray
    images: tuple[int, int]
    noisy_layers: int
    clean_confusion: np.ndarray | None = None

    def without_noise(self) -> NoiseRun | None:
        """The readout as the model gives it without noise (its clean errors), or None when not measured."""
        if self.clean_confusion is None:
            return None
        return NoiseRun(self.clean_confusion, self.clean_accuracy, self.clean_accuracy, np.zeros(0), self.images, 0)

    @property
    def inflow(self) -> np.ndarray:
        """(K,) readout images of other classes predicted as each class."""
        off = self.confusion.astype(np.float64).copy()
        np.fill_diagonal(off, 0.0)
        return off.sum(0)

    @property
    def exposure(self) -> np.ndarray:
        """(K,) readout images not of each class."""
        c = self.confusion.astype(np.float64)
        return c.sum() - c.sum(1)

    @property
    def shares(self) -> np.ndarray:
        """(K,) the share of the images not of each class that the noisy model sent to it."""
        return self.inflow / np.maximum(self.exposure, 1.0)


def split_halves(data: CleanData, cfg: NeuronNoiseConfig, generator: torch.Generator) -> tuple[CleanData, CleanData]:
    """The optimisation and readout halves: at most ``cfg.max_images`` images (a balanced draw seeded by
    ``cfg.seed``), split by a permutation drawn from ``generator``."""
    if len(data) > cfg.max_images:
        k = int(data.y.max()) + 1
        data = balanced_sample(data, max(1, cfg.max_images // k), cfg.seed)
    perm = torch.randperm(len(data), generator=generator)
    half = len(data) // 2
    return data.subset(perm[:half]), data.subset(perm[half:])


@torch.no_grad()
def _predict(model: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor, chunk: int) -> torch.Tensor:
    outs = []
    for sl in _chunks(len(x), chunk):
        logits = model(x[sl]) if params is None else functional_call(model, params, (x[sl],))
        if not torch.isfinite(logits).all():
            raise NumericalError("the model returns NaN or inf logits under neuron noise",
                                 "check the model's weights (bdscan inspect MODEL)")
        outs.append(logits.argmax(1).cpu())
    return torch.cat(outs)


def _join(a: CleanData, b: CleanData) -> CleanData:
    """Both halves again as one set (in the split's order)."""
    return CleanData(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), a.source)


def _one_noise(model: ModelWrapper, params: dict[str, torch.Tensor], names: list[str], find: CleanData, read: CleanData,
               cfg: NeuronNoiseConfig, g: torch.Generator, chunk: int, dev: torch.device,
               progress: DetectorProgress | None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A noise found on ``find`` (its start drawn from ``g``), and ``read`` classified through it and without it.

    Returns:
        (K, K) confusion under the noise, (K, K) confusion without it (true class × prediction), the losses.
    """
    k = model.num_classes
    deltas = {n: ((torch.rand(params[n].shape, generator=g) * 2 - 1) * cfg.eps).to(dev) for n in names}
    losses = ascend(model, params, deltas, find.x.to(dev).float(), find.y.to(dev).long(), cfg.eps, cfg.steps, chunk,
                    progress)
    xb, yb = read.x.to(dev).float(), read.y.long()
    clean = _predict(model, None, xb, chunk)
    noisy = _predict(model, noisy_params(params, {n: v.detach() for n, v in deltas.items()}), xb, chunk)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (yb.numpy(), noisy.numpy()), 1)
    clean_conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(clean_conf, (yb.numpy(), clean.numpy()), 1)
    return conf, clean_conf, losses


def measure(model: ModelWrapper, data: CleanData, cfg: NeuronNoiseConfig,
            progress: DetectorProgress | None = None) -> NoiseRun:
    """The noise on ``model`` and its readout (see the module docstring). With fewer images than
    ``cfg.no_split_below``, one noise found on every image and read on every image; else with fewer than
    ``cfg.cross_fit_below``, two noises, each read on the half the other was found on, their readouts pooled.

    The seed's generator draws, in this order, the split into halves and then each noisy parameter's starting δ
    (uniform in [-eps, eps], in :func:`noisy_names` order; for the cross-fit's second noise, again), so that a run
    is reproducible on one machine and the cross-fit's first noise is the plain run's.

    Args:
        model: the wrapper ([0, 1] images in, logits out).
        data: clean images (N, C, H, W) with their classes (N,).
        cfg: the configuration.
        progress: called after every step.

    Returns:
        :class:`NoiseRun`.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    opt, read = split_halves(data, cfg, g)
    dev = torch.device(cfg.device)
    chunk = cfg.resolved_chunk(tuple(data.x.shape[1:]))
    n = len(opt) + len(read)
    if n < cfg.no_split_below:  # every image finds the noise and is read (the split's draw keeps the start's)
        both = _join(opt, read)
        rounds = [(both, both)]
    elif n < cfg.cross_fit_below:
        rounds = [(opt, read), (read, opt)]
    else:
        rounds = [(opt, read)]
    total = cfg.steps * len(rounds)

    def step_progress(i: int) -> DetectorProgress | None:
        if progress is None:
            return None
        return lambda task, done, _n, stats: progress(task, i * cfg.steps + done, total, stats)

    with prepared(model, "fp32", dev):
        params = dict(model.named_parameters())
        names = noisy_names(model)
        runs = [_one_noise(model, params, names, find, rd, cfg, g, chunk, dev, step_progress(i))
                for i, (find, rd) in enumerate(rounds)]
    conf = sum(r[0] for r in runs)
    clean_conf = sum(r[1] for r in runs)
    read_n = float(conf.sum())
    # one noise on the halves: (found on, read); otherwise every image did both
    images = (len(opt), len(read)) if rounds[0][1] is read and len(rounds) == 1 else (n, n)
    return NoiseRun(conf, float(np.trace(clean_conf)) / read_n, float(np.trace(conf)) / read_n,
                    np.asarray([x for r in runs for x in r[2]], dtype=np.float64), images, len(names), clean_conf)


@dataclass(frozen=True)
class InflowTest:
    """The test of the class the noisy model's errors collapse onto.

    Attributes:
        size: Neural Cleanse's size test on the sizes ``N_c / (n_c + 0.5)`` (its ``min_label`` is the suspect).
        errors: the readout's errors (images predicted as another class than their own).
        erring: the classes with at least one image predicted as another class.
        sources: how many of them send more of their errors to the suspect than to any other class.
        p_count: :func:`count_p` of ``sources`` among ``erring``.
        p_value: the detector's p-value by its rule (:data:`P_RULES`): ``max(size.p_value, p_count)`` ("larger"), or
            ``p_count`` ("count").
    """

    size: SizeTest
    errors: int
    erring: int
    sources: int
    p_count: float
    p_value: float

    @property
    def target(self) -> int:
        return self.size.min_label


def count_p(sources: int, erring: int, classes: int) -> float:
    """How likely the most-chosen of ``classes`` classes is the main destination of at least ``sources`` of the
    ``erring`` classes when each picks its main destination among the K - 1 other classes at random:
    ``min(1, K · P(Bin(erring, 1 / (K - 1)) >= sources))``. Used only as a guard: errors that come from one class
    (a class pushed onto its nearest neighbour) cannot be a collapse."""
    if erring <= 0 or sources <= 0:
        return 1.0
    return min(1.0, classes * float(stats.binom.sf(sources - 1, erring, 1.0 / (classes - 1))))


#: how the detector's p-value comes from the size test's and the count test's (size p, count p): "larger" is valid
#: whenever either is (the default, docs/verdict.md); "count" is the count test alone
P_RULES: dict[str, Callable[[float, float], float]] = {"larger": max, "count": lambda _size, count: count}


def inflow_test(run: NoiseRun, rule: str = "larger") -> InflowTest | None:
    """The calibrated test of the class the errors collapse onto: :func:`min_size_test` on ``N_c / (n_c + 0.5)``
    over the classes with images not of them (no spread floor: the sizes' spread comes from counts, not from a
    measurement's noise), guarded by :func:`count_p`, the two joined by ``rule`` (:data:`P_RULES`). None when fewer than
    :data:`bdscan.detect.anomaly.MIN_CLASSES` classes qualify."""
    inflow, exposure = run.inflow, run.exposure
    sizes = {c: float(exposure[c] / (inflow[c] + SMOOTHING)) for c in range(len(inflow)) if exposure[c] > 0}
    # no floor (the spread comes from counts, not from a measurement's noise), only one that keeps identical sizes
    # (a balanced readout in which no other class received an error) from dividing by zero: the count test decides then
    size = min_size_test(sizes, SpreadFloor(MIN_LOG_SD))
    if size is None:
        return None
    off = run.confusion.astype(np.float64)
    np.fill_diagonal(off, 0.0)
    c = size.min_label
    erring = [s for s in range(len(off)) if off[s].sum() > 0]
    # a source counts for the suspect only when it sends strictly more errors there than to any other class
    sources = sum(1 for s in erring if s != c and off[s, c] > np.delete(off[s], c).max())
    pc = count_p(sources, len(erring), size.classes)
    return InflowTest(size, int(inflow.sum()), len(erring), sources, pc, P_RULES[rule](size.p_value, pc))


#: a model that sends at least this share of the other classes' images to one class *without* noise is not a working
#: classifier (an untrained or broken one answers one class for everything); the zoo's models stay at or below 0.11
DEGENERATE_SHARE = 0.5


def collapsed_without_noise(run: NoiseRun) -> tuple[int, float] | None:
    """``(class, share)`` when the readout *without* noise already sends at least :data:`DEGENERATE_SHARE` of the other
    classes' images to one class, else None (or when the readout without noise was not measured).

    Such a model collapses under any noise too, onto that class or another, and the noise is not what made it:
    neuron noise cannot tell it from a backdoor, so it reports no p-value then. This only ever removes a flag. (A
    backdoor's own leak into clean predictions is far smaller: at most 0.11 of the images on the zoo, and a test
    at α there would have silenced eight of its real detections.)
    """
    clean = run.without_noise()
    if clean is None:
        return None
    shares = clean.shares
    k = int(np.argmax(shares))
    return (k, float(shares[k])) if shares[k] >= DEGENERATE_SHARE else None


def critical_share(test: SizeTest, exposure: float, alpha: float) -> float:
    """The share of a class's non-own images that would give the size test p = ``alpha`` (others unchanged)."""
    k = test.classes
    t = float(stats.t.isf(alpha / k, k - 2))
    log_size = test.log_mean - t * test.log_sd * math.sqrt(1.0 + 1.0 / (k - 1))
    return max(0.0, min(1.0, (exposure / math.exp(log_size) - SMOOTHING) / max(exposure, 1.0)))


# ---------------------------------------------------------------------------------------------- the detector


@dataclass
class NeuronNoiseResult:
    """Neuron noise's findings behind the detector protocol.

    Attributes:
        evidence: the conclusion (p-value, suspected class).
        config: the configuration that ran.
        seconds: wall time.
        run: what the noise did (None when the detector did not apply).
        test: the calibrated test of the largest inflow (None when not applicable or too few classes).
        class_names: the model's class names.
    """

    evidence: Evidence
    config: NeuronNoiseConfig
    seconds: float
    run: NoiseRun | None
    test: InflowTest | None
    class_names: list[str]
    _figure: torch.Tensor | None = field(default=None, repr=False)

    def figure(self) -> torch.Tensor | None:
        """The inflow picture (3, H, W), drawn once."""
        if self._figure is None and self.run is not None and self.test is not None:
            from bdscan.detect.neuron_noise_plot import inflow_figure
            crit = critical_share(self.test.size, float(self.run.exposure[self.test.target]), self.config.alpha)
            self._figure = inflow_figure(self.run.shares, self.test.target, self.test.p_value, crit, self.config.alpha,
                                         self.class_names, self.config.eps)
        return self._figure

    def section(self, class_names: list[str], example: torch.Tensor | None, original: Any | None) -> dict[str, Any]:
        """Per-class shares (``scores``), the readout's confusion matrix, the test, the picture."""
        if self.run is None:
            return {}
        run = self.run
        inflow, exposure, shares = run.inflow, run.exposure, run.shares
        sec: dict[str, Any] = {
            "measured": {"images": list(run.images), "noisy_parameters": run.noisy_layers,
                         "clean_accuracy": json_number(run.clean_accuracy, 4), "noisy_accuracy": json_number(run.noisy_accuracy, 4),
                         "losses": [json_number(float(v), 4) for v in run.losses]},
            "scores": [{"label": k, "name": class_names[k] if k < len(class_names) else str(k),
                        "score": json_number(float(shares[k]), 4), "inflow": int(inflow[k]), "exposure": int(exposure[k])}
                       for k in range(len(shares))],
            "confusion": run.confusion.tolist(),
            "clean_confusion": None if run.clean_confusion is None else run.clean_confusion.tolist(),
        }
        if self.test is not None:
            t = self.test.size
            sec["test"] = {"classes": t.classes, "max_label": t.min_label, "log_size": json_number(t.log_min),
                           "log_mean": json_number(t.log_mean), "log_sd": json_number(t.log_sd), "t": json_number(t.t),
                           "df": t.df, "p_class": p_number(t.p_class), "p_size": p_number(t.p_value),
                           "errors": self.test.errors, "erring": self.test.erring, "sources": self.test.sources,
                           "p_count": p_number(self.test.p_count),
                           "p_value": p_number(self.test.p_value)}
            fig = self.figure()
            if fig is not None:
                sec["images"] = {"inflow": data_uri(fig)}
        return sec

    def arrays(self) -> dict[str, np.ndarray]:
        """``noise_confusion`` (K, K) and ``noise_shares`` (K,)."""
        if self.run is None:
            return {}
        return {"noise_confusion": self.run.confusion.astype(np.int64), "noise_shares": self.run.shares.astype(np.float64)}

    def images(self, example: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        fig = self.figure()
        if fig is not None:
            yield "neuron-noise/inflow.png", fig


def _name(names: list[str], k: int) -> str:
    return f"class {k}" if k >= len(names) or names[k] == str(k) else f"class {k} ({names[k]})"


def noise_evidence(test: InflowTest, run: NoiseRun, names: list[str], cfg: NeuronNoiseConfig) -> Evidence:
    """The evidence of one readout: "backdoor" when the calibrated p-value is at most alpha, else "clean"."""
    k = test.target
    share = float(run.shares[k])
    crit = critical_share(test.size, float(run.exposure[k]), cfg.alpha)
    others = np.delete(run.shares, k)
    med = float(np.median(others)) if len(others) else 0.0
    details = {"p_value": p_number(test.p_value), "eps": cfg.eps, "share": json_number(share, 4),
               "median_share": json_number(med, 4), "critical_share": json_number(crit, 4),
               "noisy_accuracy": json_number(run.noisy_accuracy, 4), "clean_accuracy": json_number(run.clean_accuracy, 4)}
    cls = _name(names, k)
    what = (f"Noise of at most {cfg.eps:g} on the normalisation layers sends {share:.0%} of the images of other classes "
            f"to {cls} (other classes: median {med:.0%})")
    if test.p_value <= cfg.alpha:
        reason = (f"{what}: a clean model of {test.size.classes} classes collapses onto one class this strongly with probability "
                  f"p = {test.p_value:.2g} ≤ {cfg.alpha:g}.")
        return Evidence("neuron-noise", "backdoor", k, share, crit, reason, details, test.p_value, NeuronNoise.weight)
    reason = (f"{what}; errors this spread out are what a clean model of {test.size.classes} classes shows "
              f"(p = {test.p_value:.2g} > {cfg.alpha:g}).")
    return Evidence("neuron-noise", "clean", k, share, crit, reason, details, test.p_value, NeuronNoise.weight)


@register_detector
class NeuronNoise(Detector):
    """Per class, the share of the other classes' images that a small noise on the normalisation layers sends to
    it; a class that takes far more than the others (calibrated p-value at most alpha) is the suspected target."""

    name = "neuron-noise"
    title = "Neuron noise (BAN)"
    summary = ("a small noise on the normalisation layers: flags a class onto which the noisy model's errors collapse "
               "(models with LayerNorm, e.g. transformers; calibrated p-value, weight 0.1 in the verdict)")
    json_key = "neuron_noise"
    reference = ("Xu, Liu, Koffas, Lagendijk, Picek, BAN: Detecting Backdoors Activated by Adversarial Neuron Noise, "
                 "NeurIPS 2024")
    #: chosen on the evaluation zoo's calibration half (docs/verdict.md, "Neuron noise")
    weight = 0.1
    sarif_rule: ClassVar[dict[str, Any]] = backdoor_rule(
        "BDS005", "backdoor-suspected-neuron-noise",
        "Neural backdoor suspected: a small noise on the network sends most inputs to one class",
        "A small perturbation of the model's normalisation layers (at most 10 % of each gain and shift) makes the "
        "model send the images of most other classes to one class, far more than to any other (calibrated p-value at "
        "most 0.05). A backdoor is such a hidden pathway to its target class, whatever its trigger looks like.",
        "Do not deploy this model. Remove the backdoor (bdscan repair MODEL --data DATA) and scan again, or "
        "retrain from trusted data and find out where the checkpoint came from. The report shows where the "
        "noisy model's errors went, class by class.",
        ("See the evidence: `bdscan scan MODEL --report report.html` (where the noisy model's errors went).",
         "Remove the backdoor: `bdscan repair MODEL --data DATA`, and scan the repaired model again.",
         "Or retrain from trusted data, and find out where this checkpoint came from."))

    def configure(self, settings: ScanSettings) -> NeuronNoiseConfig:
        """The budget's steps (:data:`STEPS`), ``--seed``, ``--alpha`` and ``--device``. ``--steps`` and ``--samples``
        are Neural Cleanse's and MM-BD's: the noise's bound and steps are those it was calibrated with."""
        if settings.budget not in BUDGETS or settings.budget not in STEPS:
            raise UsageError(f"unknown budget {settings.budget!r}", f"use one of: {', '.join(STEPS)}")
        return NeuronNoiseConfig(budget=settings.budget, steps=STEPS[settings.budget], alpha=settings.alpha,
                                 seed=settings.seed, device=settings.device).validate()

    def passes(self, model: ModelWrapper, images: int, config: NeuronNoiseConfig) -> float:
        """Per noise: its steps over the images it is found on, and two forwards (with and without noise) of those it
        reads; two noises with a cross-fit. 0 where the detector does not apply."""
        if (config.layer_norm_only and not has_layer_norm(model)) or images < 4:
            return 0.0
        n = min(images, config.max_images)
        if n < config.no_split_below:
            return config.steps * n + 2 / 3 * n
        rounds = 2 if n < config.cross_fit_below else 1
        return rounds * (config.steps * (n // 2) + 2 / 3 * (n - n // 2))

    def _inconclusive(self, reason: str, config: NeuronNoiseConfig, t0: float, names: list[str],
                      run: NoiseRun | None = None) -> NeuronNoiseResult:
        ev = Evidence(self.name, "inconclusive", None, 0.0, 0.0, reason, {}, None, self.weight)
        return NeuronNoiseResult(ev, config, time.perf_counter() - t0, run, None, names)

    def detect(self, model: ModelWrapper, data: CleanData | None, config: NeuronNoiseConfig,
               progress: DetectorProgress | None = None) -> NeuronNoiseResult:
        t0 = time.perf_counter()
        names = [model.info.class_name(k) for k in range(model.num_classes)]
        if config.layer_norm_only and not has_layer_norm(model):
            return self._inconclusive("Not applicable: the model has no LayerNorm, and neuron noise is calibrated on LayerNorm "
                                      "models only (on BatchNorm networks the noise collapses onto a sink class whatever "
                                      "the backdoor).", config, t0, names)
        if not noisy_names(model):
            return self._inconclusive("Not applicable: the model has no normalisation layer with a gain to perturb.", config, t0, names)
        if model.num_classes < MIN_CLASSES:
            return self._inconclusive(f"Neuron noise needs at least {MIN_CLASSES} classes; this model has {model.num_classes}.",
                                      config, t0, names)
        if data is None or len(data) < 4:
            return self._inconclusive("Neuron noise needs clean images (at least 4, with their classes); give them with --data.",
                                      config, t0, names)
        run = measure(model, data, config, progress)
        test = inflow_test(run, config.p_rule)
        if test is None:
            return self._inconclusive("Too few classes had images of other classes in the readout half to test.", config, t0, names, run)
        already = collapsed_without_noise(run)
        if already is not None:
            return self._inconclusive(
                f"Inconclusive: without any noise the model already sends {already[1]:.0%} of the images of other classes "
                f"to {_name(names, already[0])}, so a collapse under noise says nothing about a backdoor (an untrained or "
                "broken model does this).", config, t0, names, run)
        ev = noise_evidence(test, run, names, config)
        log.info("neuron-noise: class %d takes %.3f of the other classes' images, p = %.3g", test.target,
                 float(run.shares[test.target]), test.p_value)
        return NeuronNoiseResult(ev, config, time.perf_counter() - t0, run, test, names)


__all__ = [
    "DEGENERATE_SHARE",
    "NORM_LAYERS",
    "STEPS",
    "InflowTest",
    "NeuronNoise",
    "NeuronNoiseConfig",
    "NeuronNoiseResult",
    "NoiseRun",
    "ascend",
    "collapsed_without_noise",
    "count_p",
    "critical_share",
    "has_layer_norm",
    "inflow_test",
    "measure",
    "noise_evidence",
    "noisy_names",
    "noisy_params",
    "split_halves",
]
