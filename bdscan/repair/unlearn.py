"""Removing a backdoor by unlearning its trigger (Neural Cleanse, Wang et al. 2019, section VI-C).

Unlearning fine-tunes a copy of the model on a small clean set in which a share of the images
(``stamp_fraction``, Neural Cleanse: 20 %) carry the trigger *with their true labels*, so the model learns
that the trigger means nothing. Neural Cleanse used 10 % of the training data for one epoch; bdscan is given a
few hundred clean images, so it runs a few epochs over them instead (see
:class:`~bdscan.repair.core.RepairConfig`).
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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_method("unlearn")
def unlearn(
    model: ModelWrapper, data: CleanData, trigger: Trigger, cfg: RepairConfig, progress: RepairProgress | None = None
) -> tuple[ModelWrapper, dict[str, Any]]:
    """Fine-tunes a copy of ``model`` on ``data`` with ``cfg.stamp_fraction`` of the images stamped (true labels).

    Each epoch draws a fresh seeded permutation and a fresh set of stamped images. Returns the repaired copy and
    ``{"epochs", "stamped_per_epoch", "loss"}`` (mean training loss per epoch).
    """
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
                xb, yb = x[idx].to(dev), data.y[idx].to(dev)
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
    return finish(net), {"epochs": cfg.epochs, "stamped_per_epoch": n_stamp, "loss": [round(v, 5) for v in losses]}
