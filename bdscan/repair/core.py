"""What every repair method shares: the result, the clean-data split, the before/after measurements, and
:func:`repair`, which runs one of them.

The clean data is split once, stratified by class and seeded: the *repair* part is what a method works on
(unlearning trains on it, pruning ranks neurons and decides with it); the *held-out* part is never used by a
method and is where ``before`` and ``after`` are measured. Attack success (``asr_*``) is the share of held-out
images **not of the trigger's target class** that the stamped trigger sends to the target.

Every measurement comes with its 95 % interval, and a repair passes or fails two checks (clean accuracy within
tolerance, the backdoor gone): :mod:`bdscan.repair.checks`.

The configuration and the table of methods live in :mod:`bdscan.repair.config` (imported here, so that a method
module imports everything it needs from this one).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bdscan.data import CleanData
from bdscan.errors import UsageError, first_line
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair.checks import Check, judge, outcomes, predict
from bdscan.repair.config import (  # noqa: F401  (re-exported: the methods and the package import them from here)
    BUILTIN_METHODS,
    DEFAULT_LR,
    OPTIMIZERS,
    TARGETS,
    RepairConfig,
    RepairMethod,
    RepairProgress,
    get_method,
    register_method,
    repair_methods,
)
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)


#: confidence of every interval a repair reports
CONFIDENCE = 0.95
#: fewest clean images a repair accepts (both parts of the split need a few of them)
MIN_IMAGES = 10


# ------------------------------------------------------------------------------------------ the result


@dataclass
class RepairResult:
    """A repaired model and what the repair did to it.

    Attributes:
        wrapper: the repaired model (a copy; the input model is untouched), in eval mode, no gradients.
        method: the repair method's name ("unlearn", "prune").
        trigger: the trigger the repair used (its ``target`` filled in if it had to be inferred).
        original: the model's original trigger when known (lab models), measured as ``asr_original``.
        before: held-out metrics of the input model: ``clean_accuracy``, ``asr_reversed``, ``asr_original``, and
            ``target_without_trigger`` (the share of images of other classes it sends to the target with no
            trigger at all: the floor below which no attack success can go).
        after: the same metrics of the repaired model.
        acc_drop: ``before.clean_accuracy - after.clean_accuracy`` (negative when accuracy rose).
        tolerance: the configured ``max_acc_drop``.
        within_tolerance: the clean-accuracy check (not *shown* beyond tolerance; :mod:`bdscan.repair.checks`).
        config: the configuration.
        repair_images: clean images the repair used.
        holdout_images: clean images held out for measuring.
        seconds: wall time of the repair (split, training or pruning, measuring).
        details: method-specific facts (unlearning: epochs, stamped images, loss per epoch; pruning: neurons
            pruned, layer, stop reason).
        holdout: the held-out images (used by :func:`~bdscan.repair.export.export_repaired` for parity checks).
        backdoor_removed: the attack-success check: every measured trigger at most ``config.max_asr`` after.
        intervals: 95 % intervals: ``{"before": {metric: (lo, hi)}, "after": {...}, "acc_drop": (lo, hi)}``.
        counts: the images behind each rate: ``clean`` (held-out images), ``attack`` (those not of the target),
            ``lost``/``gained`` (images classified correctly before and not after / after and not before).
        checks: the two checks with their sentences.
    """

    wrapper: ModelWrapper
    method: str
    trigger: Trigger
    original: Trigger | None
    before: dict[str, float | None]
    after: dict[str, float | None]
    acc_drop: float
    tolerance: float
    within_tolerance: bool
    config: RepairConfig
    repair_images: int
    holdout_images: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    holdout: CleanData | None = field(default=None, repr=False)
    backdoor_removed: bool = True
    intervals: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Both checks passed: the export needs no ``force``."""
        return self.within_tolerance and self.backdoor_removed

    def trigger_dict(self) -> dict[str, Any]:
        return trigger_summary(self.trigger)

    def to_dict(self) -> dict[str, Any]:
        """The scan document's ``repair`` section (rendered by the HTML report's Repair page; docs/scan-json.md)."""
        return {
            "method": self.method,
            "trigger": self.trigger_dict(),
            "before": {k: _r(v) for k, v in self.before.items()},
            "after": {k: _r(v) for k, v in self.after.items()},
            "intervals": _jsonable({"confidence": CONFIDENCE, **self.intervals}),
            "counts": dict(self.counts),
            "acc_drop": _r(self.acc_drop),
            "tolerance": self.tolerance,
            "within_tolerance": self.within_tolerance,
            "max_asr": self.config.max_asr,
            "backdoor_removed": self.backdoor_removed,
            "passed": self.passed,
            "checks": [{"check": c.name, "passed": c.passed, "text": c.text} for c in self.checks],
            "config": self.config.to_dict(),
            "holdout_images": self.holdout_images,
            "repair_images": self.repair_images,
            "seconds": round(self.seconds, 3),
            "details": _jsonable(self.details),
        }


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(float(x), nd)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 6)
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


def trigger_summary(t: Trigger) -> dict[str, Any]:
    """A small JSON description of a trigger: kind, target, mask L1 norm, shape, and its scalar parameters."""
    d: dict[str, Any] = {"kind": t.kind, "target": None if t.target is None else int(t.target), "l1": _r(t.l1()),
                         "size": list(t.mask.shape)}
    d.update({k: _jsonable(v) for k, v in t.params.items()
              if k not in d and (isinstance(v, (str, int, float, bool)) or v is None)})
    return d


# ------------------------------------------------------------------------------------------ shared steps


def check_trigger(trigger: Trigger, model: ModelWrapper) -> Trigger:
    """The trigger as float tensors on the CPU; raises :class:`UsageError` when it does not fit the model."""
    c, h, w = model.input_size
    mask, pattern = trigger.mask.detach().float().cpu(), trigger.pattern.detach().float().cpu()
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if pattern.dim() == 2:
        pattern = pattern.unsqueeze(0).expand(c, -1, -1)
    if pattern.dim() == 3 and pattern.shape[0] == 1 and c > 1:
        pattern = pattern.expand(c, -1, -1)
    if tuple(mask.shape) != (h, w) or tuple(pattern.shape) != (c, h, w):
        raise UsageError(
            f"the trigger (mask {tuple(mask.shape)}, pattern {tuple(pattern.shape)}) does not fit the model's "
            f"{c}x{h}x{w} input",
            f"give a mask of shape ({h}, {w}) and a pattern of shape ({c}, {h}, {w})",
        )
    if not (torch.isfinite(mask).all() and torch.isfinite(pattern).all()):
        raise UsageError("the trigger contains NaN or inf values", "give a mask and pattern in [0, 1]")
    if trigger.target is not None and not 0 <= int(trigger.target) < model.num_classes:
        raise UsageError(f"the trigger's target {trigger.target} is not a class of this model (0..{model.num_classes - 1})",
                         "check the trigger's target label")
    return replace(trigger, mask=mask.clamp(0, 1), pattern=pattern.clamp(0, 1).contiguous())


def split_data(data: CleanData, holdout_fraction: float, seed: int) -> tuple[CleanData, CleanData]:
    """(repair, held-out): a seeded split stratified by class; every class with 2+ images has one in each part."""
    if len(data) < MIN_IMAGES:
        raise UsageError(f"repair needs at least {MIN_IMAGES} clean images, got {len(data)}",
                         "give a few hundred clean images with --data")
    g = torch.Generator().manual_seed(seed)
    rep: list[torch.Tensor] = []
    hold: list[torch.Tensor] = []
    for c in torch.unique(data.y).tolist():
        idx = (data.y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * holdout_fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        hold.append(idx[:k])
        rep.append(idx[k:])
    r, h = torch.cat(rep).sort().values, torch.cat(hold).sort().values
    if len(h) == 0 or len(r) == 0:
        raise UsageError("the clean data is too small to split into repair and held-out images",
                         "give a few hundred clean images with --data")
    return data.subset(r), data.subset(h)


def infer_target(model: ModelWrapper, data: CleanData, trigger: Trigger) -> int:
    """The class the stamped trigger sends most images to (for triggers given without a target)."""
    pred = predict(model, trigger.stamp(data.x))
    return int(torch.bincount(pred, minlength=model.num_classes).argmax())


def trainable_tensors(net: nn.Module) -> list[torch.Tensor]:
    """The tensors fine-tuning updates: floating-point parameters, plus the non-scalar floating-point buffers
    onnx2torch keeps ONNX initializers in (``initializers.onnx_initializer_<n>``: a converted transformer holds
    most of its weights there, not in parameters)."""
    out: list[torch.Tensor] = [p for p in net.parameters() if p.is_floating_point()]
    out += [b for n, b in net.named_buffers() if "onnx_initializer" in n and b.is_floating_point() and b.numel() > 1]
    return out


def working_copy(model: ModelWrapper, device: str) -> ModelWrapper:
    """A deep copy of ``model`` on ``device``, without gradients (see :func:`trainable_tensors` to enable them)."""
    try:
        net = copy.deepcopy(model)
    except Exception as e:  # e.g. a module holding an unpicklable handle
        raise UsageError(f"cannot copy the model to repair it: {first_line(e, 150)}",
                         "load it from safetensors, a state dict, TorchScript or ONNX") from e
    net = net.to(device)
    net.requires_grad_(False)
    return net


def finish(net: ModelWrapper) -> ModelWrapper:
    net.eval()
    for t in trainable_tensors(net):
        t.requires_grad_(False)
    return net.cpu()


# ------------------------------------------------------------------------------------------ the entry point


def repair(
    model: ModelWrapper,
    data: CleanData,
    trigger: Trigger,
    cfg: RepairConfig,
    original: Trigger | None = None,
    progress: RepairProgress | None = None,
) -> RepairResult:
    """Repairs a copy of ``model`` with ``cfg.method`` and measures it before and after on held-out images.

    Args:
        model: the backdoored model; never modified.
        data: clean labelled images (a few hundred), split into repair and held-out parts.
        trigger: the trigger to remove (usually the scan's reversed trigger); a trigger without a target gets
            the class it sends most held-out images to.
        cfg: the configuration.
        original: the model's original trigger when known (lab models): measured as ``asr_original``.
        progress: optional ``(done, total, stats)`` callback.

    Returns:
        :class:`RepairResult`.

    Raises:
        UsageError: bad configuration, a trigger that does not fit the model, too little data.
        NumericalError: the repaired model produces NaN or inf.
    """
    cfg = cfg.validate().resolved(model)
    t0 = time.perf_counter()
    trigger = check_trigger(trigger, model)
    original = check_trigger(original, model) if original is not None else None
    rep, hold = split_data(data, cfg.holdout_fraction, cfg.seed)
    if trigger.target is None:
        target = infer_target(model, hold, trigger)
        log.info("the trigger has no target; it sends most held-out images to class %d", target)
        trigger = replace(trigger, target=target, params={**trigger.params, "target_inferred": True})
    ob = outcomes(model, hold, trigger, original)
    log.info("before repair: %s", ob.rates())
    net, details = get_method(cfg.method)(model, rep, trigger, cfg, progress)
    oa = outcomes(net, hold, trigger, original)
    log.info("after repair: %s", oa.rates())
    before, after = ob.rates(), oa.rates()
    j = judge(ob, oa, cfg.max_acc_drop, cfg.max_asr, trigger.target)
    return RepairResult(
        wrapper=net, method=cfg.method, trigger=trigger, original=original, before=before, after=after,
        acc_drop=float(before["clean_accuracy"] or 0.0) - float(after["clean_accuracy"] or 0.0), tolerance=cfg.max_acc_drop,
        within_tolerance=j.accuracy.passed, config=cfg, repair_images=len(rep), holdout_images=len(hold),
        seconds=time.perf_counter() - t0, details=details, holdout=hold, backdoor_removed=j.attack.passed,
        intervals=j.intervals, counts=j.counts, checks=[j.accuracy, j.attack],
    )
