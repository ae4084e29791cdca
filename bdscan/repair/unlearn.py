"""Removing a backdoor by unlearning its trigger (Neural Cleanse, Wang et al. 2019, section VI-C).

Unlearning fine-tunes a copy of the model on a small clean set in which a share of the images
(``stamp_fraction``) carry the trigger, trained towards what the image is rather than the target, so the model
learns that the trigger means nothing. Neural Cleanse used 20 % stamped images with their *true labels* and 10 %
of the training data for one epoch. bdscan is given a few hundred clean images, so it runs a few epochs over
them instead, and by default trains every image (stamped or not) towards the *input model's own answer on the
unstamped image* (``targets="model"``): a soft target that keeps the model's clean behaviour instead of
re-fitting it to a few hundred labels (see :class:`~bdscan.repair.core.RepairConfig`; ``targets="labels"`` is
Neural Cleanse's).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdscan.data import CleanData
from bdscan.errors import NumericalError, UsageError
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair.core import RepairConfig, RepairProgress, finish, register_method, trainable_tensors, working_copy
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def set_train_mode(net: nn.Module, freeze_norm: bool) -> None:
    net.train()
    if freeze_norm:
        for m in net.modules():
            if isinstance(m, _NORMS):
                m.eval()


def make_optimizer(params: list[torch.Tensor], cfg: RepairConfig) -> torch.optim.Optimizer:
    lr = float(cfg.lr if cfg.lr is not None else 1e-3)  # callers pass a resolved configuration
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def soft_targets(model: ModelWrapper, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The input model's class probabilities (N, K) on the (unstamped) images, in eval mode."""
    model.eval()
    dev = next(model.parameters(), torch.empty(0)).device
    out = [F.softmax(model(x[i : i + batch_size].to(dev)).float(), 1).cpu() for i in range(0, len(x), batch_size)]
    probs = torch.cat(out) if out else torch.empty(0, model.num_classes)
    if not torch.isfinite(probs).all():
        raise NumericalError("the model produces NaN or inf on the clean images", "check the model and its input scaling")
    return probs


@register_method("unlearn")
def unlearn(
    model: ModelWrapper, data: CleanData, trigger: Trigger, cfg: RepairConfig, progress: RepairProgress | None = None
) -> tuple[ModelWrapper, dict[str, Any]]:
    """Fine-tunes a copy of ``model`` on ``data`` with ``cfg.stamp_fraction`` of the images stamped, every image
    trained towards ``cfg.targets``: the input model's answer on the unstamped image, or its true label.

    Each epoch draws a fresh seeded permutation and a fresh set of stamped images. Returns the repaired copy and
    ``{"epochs", "stamped_per_epoch", "targets", "loss"}`` (mean training loss per epoch; with the model's answers
    as targets it is a cross-entropy to soft targets, so it cannot reach 0).
    """
    cfg = cfg.resolved(model)  # bdscan's learning rate, when left to it
    # computed on the untouched input, before any step: what the repaired model should still answer
    targets = soft_targets(model, data.x, cfg.batch_size) if cfg.targets == "model" else data.y
    net = working_copy(model, cfg.device)
    params = trainable_tensors(net)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise UsageError("the model has no trainable floating-point parameters", "unlearning needs a float model")
    opt = make_optimizer(params, cfg)
    n = len(data)
    n_stamp = max(1, round(cfg.stamp_fraction * n))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    dev = torch.device(cfg.device)
    losses: list[float] = []

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout
        for epoch in range(cfg.epochs):
            stamp = torch.zeros(n, dtype=torch.bool)
            stamp[torch.randperm(n, generator=g)[:n_stamp]] = True
            x = data.x.clone()
            x[stamp] = trigger.stamp(x[stamp])
            perm = torch.randperm(n, generator=g)
            set_train_mode(net, cfg.freeze_norm)
            total, seen = 0.0, 0
            for s in range(0, n, cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                xb, yb = x[idx].to(dev), targets[idx].to(dev)
                loss = F.cross_entropy(net(xb), yb)
                if not torch.isfinite(loss):
                    raise NumericalError(f"the unlearning loss became {float(loss)} in epoch {epoch + 1}",
                                         "lower the learning rate (--lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            losses.append(total / max(seen, 1))
            log.debug("unlearning epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
            if progress:
                progress(epoch + 1, cfg.epochs, {"epoch": float(epoch + 1), "loss": losses[-1]})
    return finish(net), {"epochs": cfg.epochs, "lr": cfg.lr, "stamped_per_epoch": n_stamp, "targets": cfg.targets,
                         "loss": [round(v, 5) for v in losses]}
