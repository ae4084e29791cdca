"""Measuring a model before and after a repair, and the repair's two pass/fail checks.

Every rate is counted per image (:class:`Outcomes`) so that its 95 % interval can be given
(:mod:`bdscan.repair.stats`) and the accuracy before and after can be compared image by image. The checks
(:func:`judge`; the rules are also in docs/repair.md):

* **clean accuracy**: the drop is *beyond tolerance* only when the whole 95 % interval of the drop (Newcombe's
  paired interval: before and after are measured on the same images) lies above the tolerance. A measured drop
  above the tolerance whose interval reaches down into it passes, with a caution in its sentence.
* **attack success**: after the repair, every trigger measured (the one used, and the original when known) may
  send at most ``max_asr`` of the held-out images of other classes to the target: the measured share, with its
  interval shown beside it. Here the measured value decides, not the interval: a backdoor that still works
  must not be shipped as repaired because a few dozen images cannot rule out that it might not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdscan.data import CleanData
from bdscan.errors import NumericalError
from bdscan.repair.stats import PairedCounts, paired_difference, wilson
from bdscan.trigger import Trigger

#: the attack-success metrics and how a sentence names their trigger
ASR_METRICS = {"asr_reversed": "the trigger used", "asr_original": "the original trigger"}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels (N,) in eval mode (checks the outputs are finite)."""
    model.eval()
    dev = _device_of(model)
    outs = []
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(dev))
        if not torch.isfinite(out).all():
            raise NumericalError("the model produces NaN or inf on clean images", "lower the learning rate (--lr)")
        outs.append(out.argmax(1).cpu())
    return torch.cat(outs) if outs else torch.empty(0, dtype=torch.long)


def _hits(model: nn.Module, data: CleanData, trigger: Trigger | None, batch_size: int = 256) -> torch.Tensor | None:
    """(M,) bool over the images not of the trigger's target: the stamped image goes to the target."""
    if trigger is None or trigger.target is None:
        return None
    keep = data.y != int(trigger.target)
    return predict(model, trigger.stamp(data.x[keep]), batch_size) == int(trigger.target)


def attack_success(model: nn.Module, data: CleanData, trigger: Trigger | None, batch_size: int = 256) -> float | None:
    """Share of images not of the trigger's target class that the stamped trigger sends to the target (None
    without a trigger, a target, or such images)."""
    hits = _hits(model, data, trigger, batch_size)
    return None if hits is None or not hits.numel() else float(hits.float().mean())


def clean_accuracy(model: nn.Module, data: CleanData, batch_size: int = 256) -> float:
    return float((predict(model, data.x, batch_size) == data.y).float().mean())


@dataclass(frozen=True)
class Outcomes:
    """One model's per-image results on the held-out images (what the rates and their intervals count).

    Attributes:
        correct: (N,) bool, each image classified as its label.
        hits: per attack-success metric (``asr_reversed``, ``asr_original``, ``target_without_trigger``), (M,)
            bool over the images not of that trigger's target: sent to the target; None when not measured.
    """

    correct: torch.Tensor
    hits: dict[str, torch.Tensor | None]

    def rates(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"clean_accuracy": float(self.correct.float().mean()) if len(self.correct) else 0.0}
        out.update({k: None if v is None or not v.numel() else float(v.float().mean()) for k, v in self.hits.items()})
        return out

    def intervals(self) -> dict[str, tuple[float, float] | None]:
        """The 95 % Wilson interval of every rate."""
        out: dict[str, tuple[float, float] | None] = {"clean_accuracy": wilson(int(self.correct.sum()), len(self.correct))}
        out.update({k: None if v is None or not v.numel() else wilson(int(v.sum()), v.numel()) for k, v in self.hits.items()})
        return out


def outcomes(model: nn.Module, data: CleanData, trigger: Trigger, original: Trigger | None) -> Outcomes:
    """Per-image results of ``model`` on ``data``: clean correctness, which images each trigger flips, and which
    images of other classes go to the trigger's target with no trigger at all (the floor of attack success)."""
    pred = predict(model, data.x)
    hits: dict[str, torch.Tensor | None] = {"asr_reversed": _hits(model, data, trigger), "asr_original": _hits(model, data, original)}
    if trigger.target is not None:
        hits["target_without_trigger"] = pred[data.y != int(trigger.target)] == int(trigger.target)
    return Outcomes(pred == data.y, hits)


def measure(model: nn.Module, data: CleanData, trigger: Trigger, original: Trigger | None) -> dict[str, float | None]:
    """``clean_accuracy``, ``asr_reversed`` (the trigger used), ``asr_original`` (None without one) and
    ``target_without_trigger`` on ``data``."""
    return outcomes(model, data, trigger, original).rates()


@dataclass(frozen=True)
class Check:
    """One pass/fail check of a repair, with the sentence an auditor reads.

    Attributes:
        name: "clean accuracy" or "attack success".
        passed: whether the repair passed it.
        text: what was measured and why that passes or fails.
    """

    name: str
    passed: bool
    text: str


@dataclass(frozen=True)
class Judgement:
    """The two checks and the numbers they rest on.

    Attributes:
        accuracy: the clean-accuracy check.
        attack: the attack-success check.
        intervals: ``{"before": {metric: (lo, hi)}, "after": {...}, "acc_drop": (lo, hi)}`` (95 %).
        counts: ``clean`` (held-out images), ``lost`` / ``gained`` (right before and wrong after / the other way),
            ``attack`` (images of other classes than the target behind ``asr_reversed``), ``attack_original``.
    """

    accuracy: Check
    attack: Check
    intervals: dict[str, Any]
    counts: dict[str, int]


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_check(before: Outcomes, after: Outcomes, tolerance: float) -> tuple[Check, tuple[float, float], dict[str, int]]:
    """The clean-accuracy check: failed only when the paired 95 % interval of the drop lies wholly above ``tolerance``."""
    n = len(before.correct)
    lost = int((before.correct & ~after.correct).sum())
    gained = int((~before.correct & after.correct).sum())
    both = int((before.correct & after.correct).sum())
    lo, hi = paired_difference(PairedCounts(both, lost, gained, n - both - lost - gained))
    drop = (lost - gained) / max(n, 1)
    interval = f"95 % interval of the drop {_pts(lo)} to {_pts(hi)} points"
    basis = f"on {n} held-out images, {lost} went from right to wrong and {gained} from wrong to right"
    if lo > tolerance + 1e-9:
        check = Check("clean accuracy", False, f"Fails: clean accuracy dropped {_pts(drop)} points and the whole {interval} lies "
                      f"above the tolerance of {_pts(tolerance)} points ({basis}).")
    elif drop > tolerance + 1e-9:
        check = Check("clean accuracy", True, f"Passes, with a caution: clean accuracy dropped {_pts(drop)} points, more than the "
                      f"tolerance of {_pts(tolerance)}, but the {interval} reaches into the tolerance, so these images do not "
                      f"show a drop beyond it ({basis}).")
    else:
        change = f"dropped {_pts(drop)} points" if drop > 0 else ("did not change" if drop == 0 else f"rose {_pts(-drop)} points")
        check = Check("clean accuracy", True, f"Passes: clean accuracy {change} ({interval}; tolerance {_pts(tolerance)} points; "
                      f"{basis}).")
    return check, (lo, hi), {"clean": n, "lost": lost, "gained": gained}


def attack_check(after: Outcomes, max_asr: float, target: int | None) -> tuple[Check, dict[str, int]]:
    """The attack-success check: failed when any measured trigger still sends more than ``max_asr`` of the
    images of other classes to the target."""
    works, gone, counts = [], [], {}
    for key, name in ASR_METRICS.items():
        v = after.hits.get(key)
        if v is None or not v.numel():
            continue
        counts["attack" if key == "asr_reversed" else "attack_original"] = v.numel()
        lo, hi = wilson(int(v.sum()), v.numel())
        line = (f"{name} sends {_pts(float(v.float().mean()))} % of {v.numel()} held-out images of other classes to the "
                f"target (95 % interval {_pts(lo)} to {_pts(hi)} %)")
        (works if float(v.float().mean()) > max_asr + 1e-9 else gone).append(line)
    floor = after.hits.get("target_without_trigger")
    floor_text = (f" Without any trigger the repaired model sends {_pts(float(floor.float().mean()))} % of them to class "
                  f"{target}: no trigger can score below that." if floor is not None and floor.numel() else "")
    limit = f"the limit of {_pts(max_asr)} %"
    if works:
        return Check("attack success", False, f"Fails: after the repair {'; '.join(works)}, above {limit}: the backdoor still "
                     f"works.{floor_text}"), counts
    if gone:
        return Check("attack success", True, f"Passes: after the repair {'; '.join(gone)}, within {limit}.{floor_text}"), counts
    return Check("attack success", False, "Fails: the held-out images hold no image of another class than the target, so "
                 "whether the trigger still works could not be measured."), counts


def judge(before: Outcomes, after: Outcomes, max_acc_drop: float, max_asr: float, target: int | None) -> Judgement:
    """Both checks of a repair (module docstring) with the intervals and counts they rest on."""
    acc, drop_interval, counts = accuracy_check(before, after, max_acc_drop)
    attack, attack_counts = attack_check(after, max_asr, target)
    intervals = {"before": before.intervals(), "after": after.intervals(), "acc_drop": drop_interval}
    return Judgement(acc, attack, intervals, {**counts, **attack_counts})
