"""The paper's study over a model zoo, resumable, written as JSON, Markdown and a self-contained HTML page.

:func:`run_study` goes through every *built* model of a zoo manifest (``benchmarks/lab_zoo/zoo.json``) and, per model,
saves ``out_dir/models/<name>.json`` atomically; a model whose file is already there with the same
configuration hash is not computed again (so an interrupted study resumes). :func:`write_study` turns the
per-model dicts into ``study.json``, ``study.md``, ``study.html`` and ``figures/*.png``.

Per model (see :func:`study_model`):

* **scan** (Table 1): every configured mode; anomaly index, norm of the true target's reversed mask, smallest-norm
  label, whether the target was identified (that label is the true target and the mode flags it).
* **manifest** (Tables 2-3): clean accuracy, attack success, clean twin's accuracy, as the zoo recorded them.
* **repair** (Tables 4-5, backdoored models with an original trigger): unlearning on a copy with the reversed
  trigger of the verdict's suspect in the verdict's basis mode (when the scan named no suspect: the true
  target's reversed trigger, marked ``fallback``) and, separately, with the original trigger.
* **activations** (Table 6): % of Conv2d/Linear neurons activated by the original trigger and by the target
  class's reversed trigger (each mode), in the poisoned model and in its clean twin (the same triggers stamped).
* **precision** (Tables 7-9): precision@k between the neuron rankings under the original trigger and under the
  target class's best reversed trigger at the end of each third of the inversion (``LabelResult.phases``).
* **phase norms** (Figures 3-5): smallest norm per class at the end of each third.
* **distance** (section 5.4): :meth:`Trigger.distance` between the original and the target's reversed trigger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdscan import machine
from bdscan.analysis.activations import PAPER_KS, ActivationProfile, activation_profile, compare_profiles, precision_at_k, probe_images
from bdscan.atomic import atomic_write_text
from bdscan.data import CleanData, load_clean_data
from bdscan.detect import ScanSettings, get_detector
from bdscan.detect.config import LEVELS
from bdscan.detect.config import budget as budget_config
from bdscan.detect.scan import MODES, ModeResult, ScanConfig, ScanFindings
from bdscan.errors import BdscanError, UsageError
from bdscan.io import load_model
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.pipeline import detect
from bdscan.repair import RepairConfig, repair, reversed_trigger_from_findings
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

SCHEMA = "bdscan.study/1"
#: progress(model name, models done, models total)
StudyProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StudyConfig:
    """What the study does.

    Attributes:
        budget: the inversion budget's name (:data:`bdscan.detect.config.BUDGETS`).
        modes: scan modes, a subset of ("pixel", "patch").
        seed: seed of the inversion and of the repair.
        repair: run the unlearning experiments (Tables 4-5).
        repair_epochs: unlearning epochs (RepairConfig.epochs).
        repair_lr: unlearning learning rate.
        models: only these manifest names (None = every built model); not part of the configuration hash.
        activation_threshold: share of a layer's largest clean activation a neuron must rise by (Table 6).
        activation_images: clean images (none of the target class) the activation statistics average over.
        ks: the k of precision@k (Tables 7-9).
        threshold: anomaly-index threshold.
        device: "cpu" or "cuda".
    """

    budget: str = "fast"
    modes: tuple[str, ...] = MODES
    seed: int = 0
    repair: bool = True
    repair_epochs: int = 8
    repair_lr: float = 1e-3
    models: tuple[str, ...] | None = None
    activation_threshold: float = 0.1
    activation_images: int = 128
    ks: tuple[int, ...] = PAPER_KS
    threshold: float = 2.0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = list(self.modes)
        d["ks"] = list(self.ks)
        d["models"] = None if self.models is None else list(self.models)
        return d

    def validate(self) -> StudyConfig:
        budget_config(self.budget)
        bad = [m for m in self.modes if m not in LEVELS]
        if bad or not self.modes:
            raise UsageError(f"unknown scan mode {bad[0] if bad else '(none)'!r}", f"use {', '.join(LEVELS)}")
        if self.repair_epochs < 1 or self.activation_images < 1 or any(k < 1 for k in self.ks):
            raise UsageError("repair epochs, activation images and every k must be positive", "check the study options")
        return self

    def hash_for(self, entry: dict[str, Any]) -> str:
        """The hash a saved model result must carry to be reused: this configuration (less ``models``) and the
        manifest entry's own build hash (a rebuilt model is studied again)."""
        d = self.to_dict()
        d.pop("models")
        # the resolved scan configuration (the budget's values, the CNN sweep), not only the budget's name: a
        # changed preset must not reuse results of the old one. The label chunk is left out: it changes how
        # labels are grouped per forward, not what is computed.
        scan = self.scan_config().to_dict()
        scan["inversion"].pop("label_chunk")
        if scan["inversion"]["precision"] == "auto":  # what "auto" resolves to depends on this CPU
            scan["inversion"]["cpu_native_bf16"] = self.device == "cpu" and machine.cpu_has_native_bf16()
        d["scan"] = scan
        key = json.dumps({"study": d, "model": entry.get("config_hash"), "file": entry.get("file")}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def settings(self) -> ScanSettings:
        """The scan options every model of the study is scanned with."""
        return ScanSettings(budget=self.budget, levels=tuple(self.modes), threshold=self.threshold, seed=self.seed,
                            device=self.device)

    def scan_config(self) -> ScanConfig:
        """Neural Cleanse's resolved configuration for :meth:`settings`."""
        return get_detector("neural-cleanse").configure(self.settings())

    def repair_config(self) -> RepairConfig:
        return RepairConfig(epochs=self.repair_epochs, lr=self.repair_lr, seed=self.seed, device=self.device)


@dataclass
class StudyResult:
    """What :func:`run_study` produced.

    Attributes:
        config: the configuration.
        manifest: the manifest's path.
        models: per-model result dicts, in manifest order (computed now or reused).
        computed: names computed in this run.
        reused: names whose saved result was reused.
        skipped: name -> why it was left out (not built, file missing).
        machine: platform, cores, torch version, threads.
        seconds: wall time of this run.
    """

    config: StudyConfig
    manifest: Path
    models: list[dict[str, Any]]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def compute_seconds(self) -> float:
        """Wall time of all models' computations, including those of earlier (resumed) runs."""
        return float(sum(m.get("seconds") or 0.0 for m in self.models))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "config": self.config.to_dict(), "manifest": str(self.manifest), "machine": self.machine,
                "seconds": round(self.seconds, 3), "compute_seconds": round(self.compute_seconds, 3), "computed": self.computed,
                "reused": self.reused, "skipped": self.skipped, "models": self.models}


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """The zoo manifest's entries (a JSON list, or an object with a ``models`` list)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable zoo manifest ({type(e).__name__})", "give benchmarks/lab_zoo/zoo.json") from e
    entries = doc.get("models") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise UsageError(f"{path}: not a zoo manifest (expected a list of models with names)", "give benchmarks/lab_zoo/zoo.json")
    return entries


def is_built(entry: dict[str, Any], root: Path) -> str | None:
    """None when the entry can be studied, else why not."""
    if entry.get("status") != "built":
        return f"status {entry.get('status') or 'not built'}"
    if not entry.get("file") or not (root / entry["file"]).is_file():
        return f"file {entry.get('file')} missing"
    return None


# ---------------------------------------------------------------------------------------------------------------
# One model


def _samples(wrapper: ModelWrapper, root: Path, name: str) -> CleanData:
    rel = (wrapper.info.metadata or {}).get("samples")
    if not rel:
        raise UsageError(f"{name}: its metadata names no bundled clean samples (extra.samples)", "rebuild it with the zoo")
    return load_clean_data(root / rel, wrapper.input_size, wrapper.num_classes, wrapper.info.class_names)


def _mode_summary(mr: ModeResult, target: int | None) -> dict[str, Any]:
    an = mr.anomaly
    norms = {r.label: r.norm for r in mr.labels}
    ok = sorted((n, k) for k, n in norms.items() if n is not None)
    tnorm = norms.get(target) if target is not None else None
    rank = None if tnorm is None else 1 + sum(1 for n, _ in ok if n < tnorm)
    return {
        "statistic": mr.statistic,
        "anomaly_index": json_number(an.anomaly_index),
        "min_label": an.min_label,
        "min_norm": json_number(an.min_norm),
        "median": json_number(an.median),
        "suspected": an.suspected,
        "flagged": list(an.flagged),
        "conclusive": an.conclusive,
        "target_norm": json_number(tnorm),
        "target_rank": rank,
        "target_index": json_number(an.indices.get(target)) if target is not None else None,
        "identified": None if target is None else bool(an.suspected and an.min_label == target),
        "norms": [json_number(norms[r.label]) for r in mr.labels],
        "labels": [r.label for r in mr.labels],
        "phase_norms": [[json_number(r.phases[i].norm) if i < len(r.phases) else None for r in mr.labels] for i in range(3)],
        "phase_steps": [[r.phases[i].step if i < len(r.phases) else None for r in mr.labels] for i in range(3)],
        "steps": [r.steps for r in mr.labels],
        "seconds": round(mr.seconds, 3),
    }


def _reversed(findings: ScanFindings, mode: str, label: int) -> Trigger | None:
    """The final reversed trigger of ``label`` in ``mode`` (None when its inversion never succeeded)."""
    r = findings.modes[mode].label(label)
    if not r.succeeded:
        return None
    return Trigger(r.mask, r.pattern, label, f"reversed-{mode}", {"norm": r.norm, "param": r.param})


def _repair_entry(res: Any) -> dict[str, Any]:
    d = res.to_dict()
    return {k: d[k] for k in ("before", "after", "acc_drop", "within_tolerance", "holdout_images", "repair_images", "seconds")}


def _repairs(wrapper: ModelWrapper, data: CleanData, findings: ScanFindings, original: Trigger, target: int,
             cfg: StudyConfig) -> dict[str, Any]:
    rc = cfg.repair_config()
    out: dict[str, Any] = {"config": rc.to_dict()}
    v = findings.verdict
    if v.status == "backdoor" and v.target is not None and v.basis is not None:
        mode, label, fallback = v.basis, int(v.target), False
    else:
        mode = v.basis or min(findings.modes, key=lambda m: findings.modes[m].label(target).norm or math.inf)
        label, fallback = target, True
    try:
        trig = reversed_trigger_from_findings(findings, mode, label=label)
        res = repair(wrapper, data, trig, rc, original=original)
        out["reversed"] = {"mode": mode, "label": label, "fallback": fallback, "correct_label": label == target,
                           **_repair_entry(res)}
        if fallback:
            out["reversed"]["note"] = "the scan named no suspect: the true target's reversed trigger was unlearned"
    except BdscanError as e:
        out["reversed"] = None
        out["skipped"] = f"reversed-trigger unlearning not run: {e}"
    try:
        out["original"] = _repair_entry(repair(wrapper, data, original, rc, original=original))
    except BdscanError as e:
        out["original"] = None
        out["skipped"] = f"{out.get('skipped', '')}; original-trigger unlearning not run: {e}".lstrip("; ")
    return out


def _activation_block(wrapper: ModelWrapper, x: torch.Tensor, triggers: dict[str, Trigger | None], original: Trigger,
                      threshold: float) -> tuple[dict[str, Any], dict[str, torch.Tensor], ActivationProfile]:
    """Fractions of activated neurons for the original and each mode's reversed trigger; the rankings; the clean profile."""
    clean = activation_profile(wrapper, x, None, None)
    ranks: dict[str, torch.Tensor] = {}
    st, ranks["original"] = compare_profiles(clean, activation_profile(wrapper, x, original, None), original, threshold, 0)
    block: dict[str, Any] = {"neurons": clean.neurons, "layers": len(clean.layers), "original": json_number(st.fraction), "reversed": {}}
    for mode, t in triggers.items():
        if t is None:
            block["reversed"][mode] = None
            continue
        st, ranks[mode] = compare_profiles(clean, activation_profile(wrapper, x, t, None), t, threshold, 0)
        block["reversed"][mode] = json_number(st.fraction)
    return block, ranks, clean


def _twin_wrapper(entry: dict[str, Any], by_name: dict[str, dict[str, Any]], root: Path) -> tuple[ModelWrapper | None, str | None]:
    twin = entry.get("clean_twin")
    if not twin:
        return None, "the manifest names no clean twin"
    te = by_name.get(twin)
    if te is None:
        return None, f"clean twin {twin} is not in the manifest"
    why = is_built(te, root)
    if why:
        return None, f"clean twin {twin}: {why}"
    return load_model(root / te["file"]).wrapper, None


def study_model(entry: dict[str, Any], root: Path, cfg: StudyConfig, by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the study measures on one built model (a JSON-able dict; see the module docstring)."""
    t0 = time.perf_counter()
    name = entry["name"]
    lm = load_model(root / entry["file"])
    w = lm.wrapper
    data = _samples(w, root, name)
    original = lm.original_trigger
    target = entry.get("target")
    if target is None and original is not None:
        target = original.target
    target = None if target is None else int(target)
    out: dict[str, Any] = {
        "name": name, "arch": entry.get("arch"), "dataset": entry.get("dataset"), "kind": entry.get("kind"), "target": target,
        "clean_twin": entry.get("clean_twin"), "file": entry.get("file"), "sha256": lm.sha256,
        "samples": len(data), "classes": w.num_classes,
        "manifest": {k: entry.get(k) for k in ("clean_acc", "asr", "clean_twin_acc", "val_acc", "counts")},
        "original_trigger": None if original is None else {"kind": original.kind, "target": original.target,
                                                          "l1": json_number(original.l1())},
        "timings": {},
    }
    ts = time.perf_counter()
    findings = detect(lm, data, cfg.settings(), ("neural-cleanse",)).results["neural-cleanse"].findings
    out["timings"]["scan"] = round(time.perf_counter() - ts, 3)
    v = findings.verdict
    out["verdict"] = {"status": v.status, "target": v.target, "anomaly_index": json_number(v.anomaly_index), "basis": v.basis,
                      "agree": v.agree, "reason": v.reason}
    out["scan"] = {mode: _mode_summary(mr, target) for mode, mr in findings.modes.items()}
    out["repair"] = out["activations"] = out["precision"] = out["distance"] = None
    if original is not None and target is not None and entry.get("kind") != "clean":
        reversed_t = {mode: _reversed(findings, mode, target) for mode in findings.modes}
        out["distance"] = {mode: None if t is None else json_number(original.distance(t)) for mode, t in reversed_t.items()}
        if cfg.repair:
            ts = time.perf_counter()
            out["repair"] = _repairs(w, data, findings, original, target, cfg)
            out["timings"]["repair"] = round(time.perf_counter() - ts, 3)
        ts = time.perf_counter()
        try:
            out["activations"], out["precision"] = _activations(w, data, findings, original, target, reversed_t, entry, by_name, root, cfg)
        except ValueError as e:  # a model without hookable layers
            out["activations"] = {"computed": False, "reason": str(e)}
        out["timings"]["activations"] = round(time.perf_counter() - ts, 3)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _activations(w: ModelWrapper, data: CleanData, findings: ScanFindings, original: Trigger, target: int,
                 reversed_t: dict[str, Trigger | None], entry: dict[str, Any], by_name: dict[str, dict[str, Any]], root: Path,
                 cfg: StudyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    x = probe_images(data, [target], cfg.activation_images)
    poisoned, ranks, clean = _activation_block(w, x, reversed_t, original, cfg.activation_threshold)
    acts: dict[str, Any] = {"computed": True, "threshold": cfg.activation_threshold, "images": len(x), "poisoned": poisoned, "clean": None}
    twin, why = _twin_wrapper(entry, by_name, root)
    if twin is not None:
        acts["clean"] = _activation_block(twin, x, reversed_t, original, cfg.activation_threshold)[0]
    else:
        acts["clean_reason"] = why
    precision: dict[str, Any] = {}
    for mode in findings.modes:
        r = findings.modes[mode].label(target)
        entry_p: dict[str, Any] = {"label": target, "neurons": poisoned["neurons"], "final": None, "phases": []}
        if mode in ranks:
            entry_p["final"] = precision_at_k(ranks["original"], ranks[mode], cfg.ks).to_list()
        for i, p in enumerate(r.phases[:3]):
            ph: dict[str, Any] = {"phase": i + 1, "step": p.step, "norm": json_number(p.norm), "precision": None}
            if p.mask is not None and p.pattern is not None:
                pt = Trigger(p.mask, p.pattern, target, f"reversed-{mode}-phase{i + 1}")
                rank = compare_profiles(clean, activation_profile(w, x, pt, None), pt, cfg.activation_threshold, 0)[1]
                ph["precision"] = precision_at_k(ranks["original"], rank, cfg.ks).to_list()
            else:
                ph["reason"] = "no trigger had reached the success threshold by the end of this phase"
            entry_p["phases"].append(ph)
        precision[mode] = entry_p
    return acts, precision


# ---------------------------------------------------------------------------------------------------------------
# The whole zoo


def run_study(manifest: Path, out_dir: Path, cfg: StudyConfig, progress: StudyProgress | None = None) -> StudyResult:
    """Runs the study over every built model of ``manifest`` (filtered by ``cfg.models``), resumably.

    Args:
        manifest: the zoo manifest (``benchmarks/lab_zoo/zoo.json``); model files and samples are relative to its folder.
        out_dir: where ``models/<name>.json`` go (and, with :func:`write_study`, the documents).
        cfg: the configuration.
        progress: optional ``(model name, models done, models total)``, called before each model and once at the end
            with name ``"done"``.

    Returns:
        :class:`StudyResult` (not yet written: call :func:`write_study`).

    Raises:
        UsageError: unreadable manifest, bad configuration, or a ``cfg.models`` name not in the manifest.
    """
    cfg = cfg.validate()
    t0 = time.perf_counter()
    manifest = Path(manifest)
    root = manifest.parent
    entries = load_manifest(manifest)
    by_name = {e["name"]: e for e in entries}
    if cfg.models is not None:
        unknown = [n for n in cfg.models if n not in by_name]
        if unknown:
            raise UsageError(f"{unknown[0]!r} is not a model of {manifest}", f"choose from: {', '.join(by_name)}")
        entries = [e for e in entries if e["name"] in set(cfg.models)]
    result = StudyResult(cfg, manifest, [], machine=machine.info())
    todo = []
    for e in entries:
        why = is_built(e, root)
        if why:
            result.skipped[e["name"]] = why
        else:
            todo.append(e)
    models_dir = Path(out_dir) / "models"
    for i, e in enumerate(todo):
        name = e["name"]
        if progress:
            progress(name, i, len(todo))
        path = models_dir / f"{name}.json"
        h = cfg.hash_for(e)
        saved = _read_saved(path)
        if saved is not None and saved.get("study_hash") == h:
            result.models.append(saved)
            result.reused.append(name)
            continue
        log.info("studying %s", name)
        try:
            d = study_model(e, root, cfg, by_name)
        except BdscanError as err:  # a damaged file, missing samples: the other models still run; retried next time
            log.warning("%s: %s", name, err)
            result.skipped[name] = f"failed: {err}"
            continue
        d["study_hash"] = h
        atomic_write_text(path, json.dumps(d, indent=1))
        result.models.append(d)
        result.computed.append(name)
    if progress:
        progress("done", len(todo), len(todo))
    result.seconds = time.perf_counter() - t0
    return result


def _read_saved(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None
