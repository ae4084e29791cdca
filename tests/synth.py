"""Tiny synthetic data and models trained inside the test session (no files, no network).

Classes differ by their colour so a tiny CNN or ViT learns them in seconds; a planted
backdoor is a small white square (optionally patch-aligned) that sends any image to ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F

import bdscan.models  # noqa: F401
from bdscan.data import CleanData
from bdscan.models.grid import find_token_grid
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from bdscan.trigger import Trigger


def synthetic(n: int, classes: int, size: int = 16, seed: int = 0) -> CleanData:
    """n images (n, 3, size, size) in [0, 1]: class k = hue k/classes over the whole image, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.empty(n, 3, size, size)
    for i in range(n):
        k = int(y[i])
        # A class is a colour over the whole image, so flipping a clean image to another class needs a
        # large trigger, while a planted backdoor needs only its small square.
        hue = 2 * torch.pi * k / classes
        base = 0.5 + 0.35 * torch.tensor([torch.cos(torch.tensor(hue)), torch.cos(torch.tensor(hue - 2.094)),
                                          torch.cos(torch.tensor(hue + 2.094))])
        x[i] = (base.view(3, 1, 1) + 0.12 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
    return CleanData(x, y, "synthetic")


def square_trigger(size: int, target: int, box: int = 3, row: int | None = None, col: int | None = None) -> Trigger:
    """A white ``box``×``box`` square (default: bottom-right corner, 1 pixel in)."""
    r = size - box - 1 if row is None else row
    c = size - box - 1 if col is None else col
    mask = torch.zeros(size, size)
    mask[r : r + box, c : c + box] = 1
    return Trigger(mask, torch.ones(3, size, size), target, "badnets", {"box": box, "row": r, "col": c})


@dataclass
class Tiny:
    wrapper: ModelWrapper
    data: CleanData
    trigger: Trigger | None


def train_tiny(
    arch: str = "bdscan_cnn6",
    classes: int = 4,
    size: int = 16,
    trigger: Trigger | None = None,
    epochs: int = 8,
    n: int = 320,
    seed: int = 0,
    **arch_kwargs: object,
) -> Tiny:
    """Trains a tiny model on synthetic data; with ``trigger``, 20 % of images are poisoned."""
    torch.manual_seed(seed)
    data = synthetic(n, classes, size, seed)
    kw: dict[str, object] = {"num_classes": classes, "img_size": size}
    if arch == "bdscan_cnn6":
        kw["width"] = 8
    elif arch in ("bdscan_vit", "bdscan_deit"):
        kw.update(embed_dim=32, depth=2, num_heads=2)
    kw.update(arch_kwargs)
    net = timm.create_model(arch, **kw)
    extra = {k: v for k, v in kw.items() if k not in ("num_classes", "img_size")}
    info = ModelInfo(arch, classes, (3, size, size), (0.5,) * 3, (0.25,) * 3, 1.0,
                     tuple(f"class{i}" for i in range(classes)), arch_kwargs=extra)
    info = info.with_(token_grid=find_token_grid(net, info.input_size))
    wrapper = ModelWrapper(net, info)
    opt = torch.optim.Adam(wrapper.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 32):
            idx = perm[s : s + 32]
            xb, yb = data.x[idx].clone(), data.y[idx].clone()
            if trigger is not None:
                k = max(1, len(idx) // 5)
                xb[:k] = trigger.stamp(xb[:k])
                yb[:k] = trigger.target
            wrapper.train()
            loss = F.cross_entropy(wrapper(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    wrapper.eval()
    # the last step's gradients would stay on a model the session's tests share, and a test that checks no weight
    # gradient was computed would then pass or fail by which tests ran before it (found by a random-order run)
    opt.zero_grad(set_to_none=True)
    wrapper.requires_grad_(False)
    return Tiny(wrapper, synthetic(160, classes, size, seed + 1), trigger)


def accuracy(w: ModelWrapper, data: CleanData, trigger: Trigger | None = None) -> tuple[float, float]:
    """(clean accuracy, attack success on images not of the target class)."""
    acc = float((w.predict(data.x) == data.y).float().mean())
    if trigger is None:
        return acc, 0.0
    keep = data.y != trigger.target
    asr = float((w.predict(trigger.stamp(data.x[keep])) == trigger.target).float().mean())
    return acc, asr
