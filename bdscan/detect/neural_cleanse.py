"""Neural Cleanse as a detector: pixel- and patch-level trigger inversion with a calibrated outlier test.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019;
the patch level follows Raj, Roy, Das, Mondal, "We must protect the Transformers" (transformers see patches).
The algorithm is :func:`bdscan.detect.scan.scan`; this module adapts it to the detector protocol
(:mod:`bdscan.detect.base`) and turns its findings into the scan document's ``modes`` section. Its evidence's
p-value is the smallest level p-value times the number of levels (:func:`bdscan.detect.scan.combine`); the
anomaly index is kept beside it as the score (docs/verdict.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch

from bdscan.data import CleanData
from bdscan.detect.anomaly import AnomalyResult, SizeTest
from bdscan.detect.base import DEFAULT_ALPHA, Detector, DetectorProgress, Evidence, ScanSettings, backdoor_rule, p_number, register_detector
from bdscan.detect.config import MODES, budget
from bdscan.detect.inversion import LabelResult
from bdscan.detect.scan import ModeResult, ScanConfig, ScanFindings, Verdict, combine, resolve_second_look, scan
from bdscan.errors import UsageError
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.report.images import trigger_images
from bdscan.trigger import Trigger

#: labels per level whose reversed triggers are embedded as images (the suspect and the next few)
TOP_TRIGGERS = 5


def label_trigger(r: LabelResult, level: str) -> Trigger:
    """The reversed trigger of one label as a stampable :class:`Trigger`."""
    return Trigger(r.mask, r.pattern, r.label, f"reversed-{level}", {"norm": r.norm, "param": r.param})


def test_section(t: SizeTest | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"classes": t.classes, "min_label": t.min_label, "log_min": json_number(t.log_min), "log_mean": json_number(t.log_mean),
            "log_sd": json_number(t.log_sd), "t": json_number(t.t), "df": t.df, "p_class": p_number(t.p_class),
            "p_value": p_number(t.p_value)}


def anomaly_section(a: AnomalyResult, flagged: tuple[int, ...]) -> dict[str, Any]:
    """One level's outlier tests; ``flagged``: what the verdict's rule flags at this level (:attr:`ModeResult.flagged`)."""
    return {"median": json_number(a.median), "mad": json_number(a.mad), "raw_mad": json_number(a.raw_mad), "min_label": a.min_label,
            "min_norm": json_number(a.min_norm), "anomaly_index": json_number(a.anomaly_index), "threshold": a.threshold,
            "index_flagged": list(a.flagged), "p_value": p_number(a.p_value), "test": test_section(a.test),
            "flagged": list(flagged), "failed": list(a.failed), "conclusive": a.conclusive}


def anomaly_from_section(an: Mapping[str, Any]) -> AnomalyResult:
    """The :class:`AnomalyResult` a saved ``anomaly`` section describes (``test`` is None in schema-1 documents)."""
    t = an.get("test")
    test = SizeTest(**{k: t[k] for k in SizeTest.__dataclass_fields__}) if isinstance(t, Mapping) else None
    return AnomalyResult(float(an.get("median") or 0.0), float(an.get("mad") or 0.0), float(an.get("raw_mad") or 0.0),
                         an.get("min_label"), an.get("min_norm"), float(an.get("anomaly_index") or 0.0),
                         float(an.get("threshold") or 2.0), tuple(an.get("index_flagged", an.get("flagged")) or ()), {},
                         tuple(an.get("failed") or ()), bool(an.get("conclusive", True)), test)


def level_section(m: ModeResult, names: list[str], example: torch.Tensor | None, original: Trigger | None) -> dict[str, Any]:
    """One level's per-label sizes, outlier test and the smallest classes' reversed triggers as images."""
    labels = []
    for r in m.labels:
        labels.append({
            "label": r.label, "name": names[r.label], "norm": json_number(r.norm), "succeeded": r.succeeded,
            "success_rate": json_number(r.success_rate, 4), "steps": r.steps, "stopped_early": r.stopped_early,
            "final_lambda": json_number(r.final_lambda, 8), "param": r.param,
            "anomaly_index": json_number(m.anomaly.indices.get(r.label, 0.0)), "flagged": r.label in m.flagged,
            "phases": [{"step": p.step, "norm": json_number(p.norm)} for p in r.phases],
            "history": [json_number(h, 4) for h in r.history],
        })
    ranked = sorted((r for r in m.labels if r.succeeded), key=lambda r: (r.norm, r.label))[:TOP_TRIGGERS]
    triggers = []
    for rank, r in enumerate(ranked):
        t = label_trigger(r, m.mode)
        triggers.append({"label": r.label, "rank": rank + 1, "norm": json_number(r.norm),
                         "distance_to_original": json_number(t.distance(original)) if original is not None else None,
                         "images": trigger_images(t, example)})
    return {"statistic": m.statistic, "params": m.params, "anomaly": anomaly_section(m.anomaly, m.flagged), "labels": labels,
            "triggers": triggers}


@dataclass
class NeuralCleanseResult:
    """Neural Cleanse's findings behind the detector protocol."""

    findings: ScanFindings
    evidence: Evidence

    @property
    def seconds(self) -> float:
        return self.findings.seconds

    @property
    def config(self) -> ScanConfig:
        return self.findings.config

    @property
    def samples_used(self) -> int:
        return self.findings.samples_used

    def timings(self) -> dict[str, float]:
        return {f"{m}_s": round(r.seconds, 3) for m, r in self.findings.modes.items()}

    def section(self, class_names: list[str], example: torch.Tensor | None, original: Any | None) -> dict[str, Any]:
        return {m: level_section(r, class_names, example, original) for m, r in self.findings.modes.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per level: ``<level>_labels`` (K,), ``<level>_mask`` (K, H, W), ``<level>_pattern`` (K, C, H, W) and
        ``<level>_norm`` (K,), NaN where the inversion never succeeded."""
        arrays: dict[str, np.ndarray] = {}
        for level, m in self.findings.modes.items():
            arrays[f"{level}_labels"] = np.array([r.label for r in m.labels], dtype=np.int64)
            arrays[f"{level}_mask"] = np.stack([r.mask.numpy() for r in m.labels]).astype(np.float32)
            arrays[f"{level}_pattern"] = np.stack([r.pattern.numpy() for r in m.labels]).astype(np.float32)
            arrays[f"{level}_norm"] = np.array([np.nan if r.norm is None else r.norm for r in m.labels], dtype=np.float64)
        return arrays

    def images(self, example: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        for level, m in self.findings.modes.items():
            for r in m.labels:
                t = label_trigger(r, level)
                yield f"triggers/{level}/label{r.label:03d}_mask.png", t.mask
                yield f"triggers/{level}/label{r.label:03d}_pattern.png", t.pattern
                if example is not None:
                    yield f"triggers/{level}/label{r.label:03d}_stamped.png", t.stamp(example.unsqueeze(0))[0]


def verdict_evidence(v: Verdict, threshold: float) -> Evidence:
    """Neural Cleanse's :class:`Evidence` from its verdict over the levels: the p-value is the level-corrected one,
    the score the deciding level's anomaly index (for reference), the class the deciding level's smallest (also
    when clean: the most suspicious class, which the combined verdict names only if it flags)."""
    return Evidence("neural-cleanse", v.status, v.target, v.anomaly_index, threshold, v.reason,
                    {"anomaly_index": json_number(v.anomaly_index), "basis": v.basis, "modes_agree": v.agree,
                     "threshold": threshold, "level_p_values": {m: p_number(p) for m, p in v.p_values.items()},
                     "looks": v.looks},
                    p_number(v.p_value))


@register_detector
class NeuralCleanse(Detector):
    """Per class, the smallest trigger that sends clean images of the other classes to it; a class reachable
    with an abnormally small trigger (MAD anomaly index above the threshold) is the suspected target."""

    name = "neural-cleanse"
    title = "Neural Cleanse"
    summary = ("smallest trigger per class, at pixel and patch (token-grid) level; flags a class reachable with an "
               "abnormally small trigger (p-value of the smallest log size among K, corrected for the levels)")
    json_key = "modes"
    reference = "Wang et al., Neural Cleanse, IEEE S&P 2019; Raj et al., We must protect the Transformers (patch level)"
    #: schema 1 keeps this detector's configuration at the document's top level
    config_key: ClassVar[str | None] = "config"
    sarif_rule: ClassVar[dict[str, Any]] = backdoor_rule(
        "BDS001", "backdoor-suspected", "Neural backdoor suspected in an image classifier",
        "Neural Cleanse found a class that images of every other class can be sent to with an abnormally small "
        "trigger (its p-value, corrected for the levels and detectors, is at most alpha): the signature of a "
        "backdoor planted in the weights, which makes the model misclassify any input carrying the trigger.",
        "Do not deploy this model. Remove the backdoor by unlearning the reversed trigger "
        "(bdscan repair MODEL --data DATA) and scan the repaired model again, or retrain from trusted data "
        "and find out where the checkpoint came from. The HTML report shows the reversed trigger.",
        ("Remove the backdoor by unlearning the reversed trigger: `bdscan repair MODEL --data DATA`.",
         "Scan the repaired model again: `bdscan scan REPAIRED --data DATA`.",
         "Or retrain from trusted data, and find out where this checkpoint came from."),
        "The HTML report (`report.html`) shows the reversed trigger and the norm of every class.")

    def configure(self, settings: ScanSettings) -> ScanConfig:
        if not settings.threshold > 0:
            raise UsageError(f"--threshold {settings.threshold:g} is not positive",
                             "an anomaly index counts robust standard deviations below the median: e.g. --threshold 2")
        if not 0 < settings.alpha < 1:
            raise UsageError(f"--alpha {settings.alpha:g} is not a probability between 0 and 1",
                             "alpha is the false-alarm rate the verdict allows: e.g. --alpha 0.05")
        inv = budget(settings.budget).with_(**settings.overrides()).validate()
        look = resolve_second_look(settings.second_look, settings.budget, inv.steps, settings.alpha)
        return ScanConfig(modes=tuple(settings.levels), budget=settings.budget, inversion=inv, threshold=settings.threshold,
                          alpha=settings.alpha, device=settings.device, workers=settings.workers, second_look=look)

    def detect(self, model: ModelWrapper, data: CleanData, config: ScanConfig,
               progress: DetectorProgress | None = None) -> NeuralCleanseResult:
        f = scan(model, data, config, progress)
        return NeuralCleanseResult(f, verdict_evidence(f.verdict, config.threshold))

    def evidence_from_doc(self, doc: Mapping[str, Any]) -> Evidence | None:
        """Re-derives the level combination (:func:`bdscan.detect.scan.combine`) from the saved outlier tests; a
        schema-1 document has no p-values, so its evidence keeps the anomaly-index rule it was written with."""
        modes = doc.get(self.json_key)
        if not isinstance(modes, Mapping) or not modes:
            return None
        cfg = doc.get("config") or {}
        thr = float(cfg.get("threshold", 2.0))
        an = {m: anomaly_from_section((s or {}).get("anomaly") or {}) for m, s in modes.items() if isinstance(s, Mapping)}
        if any(a.test is not None for a in an.values()):
            return verdict_evidence(combine({m: SimpleNamespace(anomaly=a) for m, a in an.items()}, thr,
                                            float(cfg.get("alpha", DEFAULT_ALPHA))), thr)
        return _index_evidence(an, thr)


def _index_evidence(an: Mapping[str, AnomalyResult], thr: float) -> Evidence:
    """Schema 1's rule: a backdoor when a conclusive level has a class over the anomaly-index threshold."""
    conclusive = {m: a for m, a in an.items() if a.conclusive}
    if not conclusive:
        return Evidence("neural-cleanse", "inconclusive", None, 0.0, thr,
                        "Too few labels could be reached by any trigger to judge this model.")
    mins = {a.min_label for a in conclusive.values()}
    agree = (len(mins) == 1) if len(conclusive) > 1 else None
    basis = max(conclusive, key=lambda m: (conclusive[m].anomaly_index, m == "patch"))
    a = conclusive[basis]
    idx = a.anomaly_index
    details = {"anomaly_index": json_number(idx), "basis": basis, "modes_agree": agree, "threshold": thr}
    if any(x.flagged for x in conclusive.values()):
        return Evidence("neural-cleanse", "backdoor", a.min_label, idx, thr,
                        f"Class {a.min_label} can be reached with an abnormally small {basis} trigger "
                        f"(anomaly index {idx:.2f} > {thr:g}).", details)
    return Evidence("neural-cleanse", "clean", None, idx, thr,
                    f"No class is abnormally easy to reach (highest anomaly index {idx:.2f} ≤ {thr:g}).", details)


__all__ = ["MODES", "NeuralCleanse", "NeuralCleanseResult", "label_trigger", "level_section"]
