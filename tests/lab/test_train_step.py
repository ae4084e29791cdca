"""The one training step the lab's trainers share: it steps, clips, and stops a diverging run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdscan.errors import NumericalError
from bdscan.lab.train import TrainConfig, fill_unset, optimizer_step


def _setup() -> tuple[nn.Linear, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)


def test_a_finite_step_updates_the_weights_the_schedule_and_returns_the_loss() -> None:
    net, opt, sched = _setup()
    before = net.weight.detach().clone()
    loss = net(torch.ones(4, 3)).pow(2).mean()
    v = optimizer_step(loss, net, opt, sched, grad_clip=1e-3, where="unit")
    assert v == pytest.approx(float(loss.detach())) and not torch.equal(before, net.weight)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # the schedule stepped
    # clipping held the update to lr x max-norm
    assert float((net.weight - before).detach().norm()) <= 0.1 * 1e-3 + 1e-9


def test_a_loss_that_is_not_finite_stops_the_run_and_says_where() -> None:
    net, opt, sched = _setup()
    loss = net(torch.ones(1, 3)).sum() * float("nan")
    with pytest.raises(NumericalError, match=r"gtsrb_vit_base, epoch 3: the loss became nan") as e:
        optimizer_step(loss, net, opt, sched, None, "gtsrb_vit_base, epoch 3", "lower the recipe's learning rate")
    assert "learning rate" in str(e.value.hint)


def test_fill_unset_fills_only_what_is_none() -> None:
    cfg = fill_unset(TrainConfig(lr=0.5, optimizer=""), lr=0.1, epochs=7, optimizer="adamw")
    assert cfg.lr == 0.5 and cfg.epochs == 7 and cfg.optimizer == "adamw"
    assert fill_unset(TrainConfig(warmup_epochs=0), warmup_epochs=3).warmup_epochs == 0
