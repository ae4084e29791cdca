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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bdscan.data import CleanData
from bdscan.detect.anomaly import MIN_CLASSES
from bdscan.detect.base import Detector, DetectorProgress, Evidence, ScanSettings, backdoor_rule, p_number, register_detector
from bdscan.detect.config import BUDGETS
from bdscan.detect.neuron_noise_measure import (  # the measurement and the test, re-exported
    DEGENERATE_SHARE,
    NORM_LAYERS,
    P_RULES,
    SPLITS,
    STEPS,
    InflowTest,
    NeuronNoiseConfig,
    NoiseRun,
    ascend,
    collapsed_without_noise,
    count_p,
    critical_share,
    has_layer_norm,
    inflow_test,
    joint_test,
    layout,
    measure,
    noisy_names,
    noisy_params,
    split_halves,
    split_seeds,
)
from bdscan.errors import UsageError
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.report.images import data_uri

log = logging.getLogger(__name__)


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
        reads; two noises with a cross-fit; each split again. 0 where the detector does not apply."""
        if (config.layer_norm_only and not has_layer_norm(model)) or images < 4:
            return 0.0
        n = min(images, config.max_images)
        how = layout(config, n)
        one = config.steps * n + 2 / 3 * n if how == "whole" else config.steps * (n // 2) + 2 / 3 * (n - n // 2)
        return len(split_seeds(config, images)) * (2 if how == "cross-fit" else 1) * one

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
        seeds = split_seeds(config, len(data))
        measured = []
        for i, seed in enumerate(seeds):  # one split, or SPLITS of them on small data (one progress bar over all)
            tick = None if progress is None else (
                lambda task, done, total, stats, i=i: progress(task, i * total + done, len(seeds) * total, stats))
            run = measure(model, data, config.with_(seed=seed), tick)
            already = collapsed_without_noise(run)
            if already is not None:
                return self._inconclusive(
                    f"Inconclusive: without any noise the model already sends {already[1]:.0%} of the images of other "
                    f"classes to {_name(names, already[0])}, so a collapse under noise says nothing about a backdoor (an "
                    "untrained or broken model does this).", config, t0, names, run)
            measured.append((run, inflow_test(run, config.p_rule)))
        joint = joint_test([test for _, test in measured])
        if joint is None:
            return self._inconclusive("Too few classes had images of other classes in the readout half to test.", config, t0,
                                      names, measured[0][0])
        run, test = measured[joint[0]][0], joint[1]
        ev = noise_evidence(test, run, names, config)
        log.info("neuron-noise: class %d takes %.3f of the other classes' images, p = %.3g", test.target,
                 float(run.shares[test.target]), test.p_value)
        return NeuronNoiseResult(ev, config, time.perf_counter() - t0, run, test, names)


__all__ = [
    "DEGENERATE_SHARE",
    "NORM_LAYERS",
    "P_RULES",
    "SPLITS",
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
    "joint_test",
    "layout",
    "measure",
    "noise_evidence",
    "noisy_names",
    "noisy_params",
    "split_halves",
    "split_seeds",
]
