"""Removing a backdoor by pruning penultimate-layer neurons (Neural Cleanse, Wang et al. 2019, section VI-B).

The penultimate layer is the input of the final classification ``nn.Linear`` (timm's ``get_classifier()``,
else the last ``nn.Linear`` producing one output per class). Its neurons are ranked by how much the trigger
raises their mean activation on the repair images not of the target class; the top ones are pruned in growing
steps (``prune_step`` of the neurons at a time) until, on the repair images:

* the trigger's attack success is below ``prune_target_asr`` (stop: ``"asr"``), or
* ``prune_max_fraction`` of the neurons are pruned (stop: ``"max_fraction"``), or
* clean accuracy dropped by more than ``max_acc_drop``; that step is undone and the previous one kept
  (stop: ``"accuracy"``).

A neuron is pruned by zeroing its column of the classifier's weight, so any export of the model (safetensors,
ONNX, TorchScript) carries the pruning without hooks. A model with several classification heads of the same
width (DeiT's class and distillation heads) has the same columns zeroed in every head, ranked by the summed
activation increase.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from bdscan.data import CleanData
from bdscan.errors import UsageError
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair.checks import attack_success, clean_accuracy
from bdscan.repair.core import RepairConfig, RepairProgress, finish, register_method, working_copy
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)


def find_classifier(net: nn.Module, num_classes: int | None = None) -> list[nn.Linear]:
    """The final classification layer(s): timm's ``get_classifier()`` when it returns ``nn.Linear`` layers,
    else the last ``nn.Linear`` with ``num_classes`` outputs, else the last ``nn.Linear``.

    Raises:
        UsageError: the model has no ``nn.Linear`` (e.g. a TorchScript module, whose layers are not Python modules).
    """
    get = getattr(net, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        heads = list(head) if isinstance(head, (tuple, list)) else [head]
        if heads and all(isinstance(h, nn.Linear) for h in heads):
            widths = {h.in_features for h in heads}
            if len(widths) == 1:
                return heads  # type: ignore[return-value]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    fits = [m for m in linears if num_classes is not None and m.out_features == num_classes]
    if fits:
        return [fits[-1]]
    if linears:
        return [linears[-1]]
    raise UsageError(
        f"cannot find the final nn.Linear classification layer of this {type(net).__name__} model, so it cannot be pruned",
        "use --method unlearn, or load the model from safetensors, a state dict or ONNX",
    )


@torch.no_grad()
def _penultimate(model: ModelWrapper, heads: list[nn.Linear], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean input of each head over the images (summed over heads): (features,)."""
    sums: list[torch.Tensor] = []
    counts = [0]

    def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        a = inputs[0].detach().float()
        a = a.reshape(-1, a.shape[-1])
        sums.append(a.sum(0).cpu())
        counts[0] += a.shape[0]

    try:
        handles = [h.register_forward_pre_hook(hook) for h in heads]
    except Exception as e:  # TorchScript modules take no Python hooks
        raise UsageError("cannot observe the model's penultimate layer, so it cannot be pruned",
                         "use --method unlearn for this model") from e
    model.eval()
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise UsageError("the classification layer was never called, so the model cannot be pruned",
                         "use --method unlearn for this model")
    per_head = len(heads)
    return torch.stack(sums).sum(0) / max(counts[0] / per_head, 1)


def rank_neurons(model: ModelWrapper, heads: list[nn.Linear], data: CleanData, trigger: Trigger, batch_size: int) -> torch.Tensor:
    """Mean activation increase of each penultimate neuron under the trigger (features,), on images not of the target."""
    keep = data.y != int(trigger.target) if trigger.target is not None else torch.ones(len(data), dtype=torch.bool)
    x = data.x[keep] if bool(keep.any()) else data.x
    clean = _penultimate(model, heads, x, batch_size)
    stamped = _penultimate(model, heads, trigger.stamp(x), batch_size)
    return stamped - clean


@register_method("prune")
def prune_neurons(
    model: ModelWrapper,
    data: CleanData,
    trigger: Trigger,
    cfg: RepairConfig,
    progress: RepairProgress | None = None,
) -> tuple[ModelWrapper, dict[str, Any]]:
    """Prunes a copy of ``model`` (see the module docstring), deciding on ``data`` (the repair images).

    Returns:
        the pruned copy and ``{"layer_width", "pruned_neurons", "pruned_fraction", "stop_reason", "steps",
        "repair_asr", "repair_accuracy", "repair_accuracy_before"}``.
    """
    net = working_copy(model, cfg.device)
    heads = find_classifier(net.net, net.num_classes)
    width = heads[0].in_features
    increase = rank_neurons(net, heads, data, trigger, cfg.batch_size)
    order = torch.argsort(increase, descending=True, stable=True)
    step = max(1, round(cfg.prune_step * width))
    limit = max(1, math.floor(cfg.prune_max_fraction * width + 1e-9))
    base_acc = clean_accuracy(net, data, cfg.batch_size)
    originals = [h.weight.detach().clone() for h in heads]
    asr = attack_success(net, data, trigger, cfg.batch_size)
    kept, reason, steps = 0, "max_fraction", 0
    acc = base_acc
    if asr is not None and asr < cfg.prune_target_asr:
        reason = "asr"
    else:
        k = 0
        while k < limit:
            k = min(k + step, limit)
            steps += 1
            cols = order[:k]
            for h, w0 in zip(heads, originals, strict=True):
                h.weight.copy_(w0)
                h.weight[:, cols] = 0
            acc_k = clean_accuracy(net, data, cfg.batch_size)
            asr_k = attack_success(net, data, trigger, cfg.batch_size)
            log.debug("pruned %d/%d neurons: accuracy %.3f, attack success %s", k, width, acc_k, asr_k)
            if progress:
                progress(k, limit, {"pruned": float(k), "accuracy": acc_k, "asr": float(asr_k if asr_k is not None else math.nan)})
            if base_acc - acc_k > cfg.max_acc_drop + 1e-9:
                reason = "accuracy"
                break
            kept, acc, asr = k, acc_k, asr_k
            if asr_k is not None and asr_k < cfg.prune_target_asr:
                reason = "asr"
                break
        for h, w0 in zip(heads, originals, strict=True):  # leave exactly the kept pruning in place
            h.weight.copy_(w0)
            h.weight[:, order[:kept]] = 0
    details = {
        "layer_width": width,
        "heads": len(heads),
        "pruned_neurons": kept,
        "pruned_fraction": kept / width,
        "stop_reason": reason,
        "steps": steps,
        "repair_accuracy_before": base_acc,
        "repair_accuracy": acc,
        "repair_asr": asr,
    }
    log.info("pruned %d of %d penultimate neurons (stop: %s)", kept, width, reason)
    return finish(net), details
