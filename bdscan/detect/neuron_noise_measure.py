"""Neuron noise's measurement and its test: the noise on a model's normalisation layers, its readout, and the
calibrated test of the class its errors collapse onto. The detector that reports them, and why each choice was made,
is :mod:`bdscan.detect.neuron_noise` (Xu et al., "BAN", NeurIPS 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.func import functional_call

from bdscan.data import CleanData, balanced_sample
from bdscan.detect.anomaly import SizeTest, SpreadFloor, min_size_test
from bdscan.detect.base import DetectorProgress
from bdscan.detect.config import images_per_chunk
from bdscan.detect.inversion import prepared
from bdscan.errors import NumericalError, UsageError
from bdscan.models.wrapper import ModelWrapper

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

#: splits of the images with fewer than ``NeuronNoiseConfig.splits_below`` of them: the seed's own and ``SPLITS - 1``
#: more, split r drawn by the seed ``seed + r * SPLIT_SEED_STRIDE``; the smallest p-value times ``SPLITS`` is reported
SPLITS = 3
SPLIT_SEED_STRIDE = 1_000_003

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
        splits_below: with fewer images than this (after the cap), the noise runs on :data:`SPLITS` splits of the
            images and the smallest p-value times :data:`SPLITS` is reported (Bonferroni over the splits). 0: never.
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
    splits_below: int = 0

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


#: how the images of one split are used (:func:`layout`): halves, one noise found on one half and read on the other;
#: "cross-fit", two noises, each read on the half the other was found on; "whole", one noise found and read on all
LAYOUTS = ("halves", "cross-fit", "whole")


def layout(cfg: NeuronNoiseConfig, images: int) -> str:
    """How :func:`measure` uses ``images`` clean images (after the cap), one of :data:`LAYOUTS`."""
    if images < cfg.no_split_below:
        return "whole"
    return "cross-fit" if images < cfg.cross_fit_below else "halves"


def split_seeds(cfg: NeuronNoiseConfig, images: int) -> list[int]:
    """The seeds of the splits a detector run measures with ``images`` clean images (before the cap): the
    configuration's own, and with fewer than ``cfg.splits_below`` images (after the cap) :data:`SPLITS` - 1 more."""
    if min(images, cfg.max_images) < cfg.splits_below:
        return [cfg.seed + r * SPLIT_SEED_STRIDE for r in range(SPLITS)]
    return [cfg.seed]


def joint_test(tests: Sequence[InflowTest | None]) -> tuple[int, InflowTest] | None:
    """The splits' joint test (:func:`split_seeds`): the split with the smallest p-value, and its test with that
    p-value times the number of splits (Bonferroni, valid whatever their dependence; one split: its own test).
    None when no split could be tested."""
    tested = [(i, t) for i, t in enumerate(tests) if t is not None]
    if not tested:
        return None
    i, best = min(tested, key=lambda it: it[1].p_value)
    return (i, best) if len(tests) == 1 else (i, replace(best, p_value=min(1.0, best.p_value * len(tests))))


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
    how = layout(cfg, n)
    if how == "whole":  # every image finds the noise and is read (the split's draw keeps the start's)
        both = _join(opt, read)
        rounds = [(both, both)]
    else:
        rounds = [(opt, read), (read, opt)] if how == "cross-fit" else [(opt, read)]
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
    images = (len(opt), len(read)) if how == "halves" else (n, n)
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


__all__ = [
    "CPU_CHUNK_PIXELS",
    "DEGENERATE_SHARE",
    "GPU_CHUNK_PIXELS",
    "LAYOUTS",
    "MIN_LOG_SD",
    "NORM_LAYERS",
    "P_RULES",
    "SMOOTHING",
    "SPLITS",
    "SPLIT_SEED_STRIDE",
    "STEPS",
    "InflowTest",
    "NeuronNoiseConfig",
    "NoiseRun",
    "ascend",
    "collapsed_without_noise",
    "count_p",
    "critical_share",
    "has_layer_norm",
    "inflow_test",
    "joint_test",
    "layout",
    "measure",
    "noisy_names",
    "noisy_params",
    "split_halves",
    "split_seeds",
]
