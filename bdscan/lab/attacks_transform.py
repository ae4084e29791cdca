"""Triggers that are not a mask-and-pattern stamp: additive signals, warps and per-image perturbations.

* ``sig`` (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
  poisoning", ICIP 2019): a horizontal sinusoid ``v(i, j) = Δ·sin(2π·j·f / W)`` added to every channel, then
  clipped to [0, 1].
* ``wanet`` (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021): a smooth warp.
  A k×k field of uniform noise in [-1, 1], normalised to mean |.| = 1, is upsampled bicubically to H×W and
  added to the identity sampling grid with strength ``s / H``; ``grid_sample`` (bilinear, align_corners) warps
  the image. Its *noise mode* trains a share of images (``cross_ratio`` × the poisoned share) warped by the
  same field plus per-pixel random noise of amplitude 1/H, with their true labels, so that only the exact
  warp fires the backdoor (:meth:`TransformTrigger.noise`).
* ``issba``: an ISSBA-style (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021)
  invisible, sample-specific additive perturbation ``x + clip(ε/2 · r(x) / rms(r(x)), ±ε)``. ISSBA's ``r`` is a trained
  StegaStamp encoder that hides a code string in the image; training one is hours of GPU time, so here ``r``
  is a *fixed, seeded, untrained* convolutional network of the image and a fixed code map: every image gets
  its own residual (it depends on the image's content), the whole family is reproducible from the seed, and it
  costs three small convolutions per image. The input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020)
  was not chosen as it trains a generator jointly with the classifier, doubling the cost of every model on
  this 2-core CPU and making the trigger a second network that has to be stored.

Every trigger here is a :class:`TransformTrigger`: ``stamp(x)`` applies the exact transform to a batch
(N, C, H, W) in [0, 1], deterministically. Its ``mask`` (H, W) and ``pattern`` (C, H, W) are only a
picture of it (what a file can store for tools that expect a stamp): ``pattern`` is the transform of a fixed
reference image and ``mask`` the per-pixel size of the change, scaled to max 1. The exact trigger is rebuilt
from ``params`` (:func:`bdscan.lab.attacks.rebuild_trigger`); ``params["stamp"] == "transform"`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bdscan.errors import UsageError
from bdscan.trigger import Trigger

#: ``params["stamp"]`` of triggers whose mask and pattern are only a picture of the transform
TRANSFORM_STAMP = "transform"


@dataclass(frozen=True)
class TransformTrigger(Trigger):
    """A trigger applied by a function rather than by ``(1 - m)·x + m·p``.

    Attributes:
        fn: (N, C, H, W) in [0, 1] -> triggered images of the same shape, in [0, 1].
        noise_fn: for attacks with a noise mode (WaNet): (images, generator) -> images transformed so as *not*
            to fire the backdoor (they keep their labels in training), or None.
    """

    fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    noise_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The triggered batch (N, C, H, W) in [0, 1]."""
        if self.fn is None:
            return super().stamp(x)
        return self.fn(x)

    def noise(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The noise-mode batch (same shape), or ``x`` for attacks without one."""
        return x if self.noise_fn is None else self.noise_fn(x, g)


def reference_image(size: tuple[int, int, int]) -> torch.Tensor:
    """A fixed (C, H, W) picture with edges in both directions and smooth shading, on which a transform's
    effect is drawn (a flat image would hide a warp)."""
    c, h, w = size
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    checker = ((ii // 4 + jj // 4) % 2) * 0.5 + 0.25
    shade = 0.15 * torch.sin(2 * math.pi * (ii + 2 * jj) / max(h, w))
    return (checker + shade).clamp(0, 1).expand(c, h, w).clone()


def picture_of(fn: Callable[[torch.Tensor], torch.Tensor], size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (H, W), pattern (C, H, W)) picturing ``fn``: pattern = fn(reference), mask = |change| scaled to max 1."""
    ref = reference_image(size)[None]
    with torch.no_grad():
        out = fn(ref)[0].clamp(0, 1)
    change = (out - ref[0]).abs().mean(0)
    peak = float(change.max())
    mask = change / peak if peak > 0 else change
    return mask.contiguous(), out.contiguous()


def _info(params: object, **extra: object) -> dict[str, object]:
    from dataclasses import asdict

    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}  # type: ignore[call-overload]
    return {**d, "stamp": TRANSFORM_STAMP, "bbox": None, "grid4_aligned": False, **extra}


# ------------------------------------------------------------------------------------------------ SIG


@dataclass(frozen=True)
class SIGParams:
    """SIG (Barni et al., ICIP 2019): ``clip(x + Δ·sin(2π·j·f / W))``, the same along every row and channel.

    Attributes:
        delta: amplitude Δ in [0, 1] units (Barni et al. used 20/255 in training).
        frequency: periods across the image width (Barni et al.: 6).
        vertical: stripes along rows instead (the sinusoid runs down the image).
    """

    delta: float = 0.08
    frequency: float = 6.0
    vertical: bool = False


def sig_signal(p: SIGParams, size: tuple[int, int, int]) -> torch.Tensor:
    """The additive signal (C, H, W)."""
    c, h, w = size
    n = h if p.vertical else w
    wave = p.delta * torch.sin(2 * math.pi * torch.arange(n, dtype=torch.float64) * p.frequency / n).float()
    v = wave[:, None].expand(h, w) if p.vertical else wave[None, :].expand(h, w)
    return v.expand(c, h, w).contiguous()


def sig_trigger(p: SIGParams, target: int, size: tuple[int, int, int]) -> TransformTrigger:
    if not 0 < p.delta <= 0.5 or p.frequency <= 0:
        raise UsageError(f"sig: delta {p.delta} / frequency {p.frequency} out of range", "use 0 < delta <= 0.5 and frequency > 0")
    v = sig_signal(p, size)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x + v.to(x.device, x.dtype)).clamp(0, 1)

    mask, pattern = picture_of(fn, size)
    return TransformTrigger(mask, pattern, target, "sig", _info(p), fn=fn)


# ---------------------------------------------------------------------------------------------- WaNet


@dataclass(frozen=True)
class WaNetParams:
    """WaNet (Nguyen & Tran, ICLR 2021).

    Attributes:
        k: side of the random control grid (the paper's k = 4).
        s: warping strength (the paper's s = 0.5).
        cross_ratio: noise-mode images per poisoned image in training (the paper's 2; 0 = no noise mode).
        seed: the warping field.
    """

    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    seed: int = 0


def wanet_grid(p: WaNetParams, h: int, w: int) -> torch.Tensor:
    """The sampling grid (1, H, W, 2) of the backdoor warp, as in the authors' code."""
    if p.k < 2 or p.k > min(h, w) or p.s <= 0:
        raise UsageError(f"wanet: k {p.k} / s {p.s} out of range", f"use 2 <= k <= {min(h, w)} and s > 0")
    g = torch.Generator().manual_seed(int(p.seed))
    ins = torch.rand(1, 2, p.k, p.k, generator=g, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return (identity_grid(h, w) + p.s * noise / h).clamp(-1, 1).float()


def identity_grid(h: int, w: int) -> torch.Tensor:
    """The sampling grid (1, H, W, 2) (x, y in [-1, 1]) that ``grid_sample(..., align_corners=True)`` maps to the image itself."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    return torch.stack((xs, ys), 2)[None]


def wanet_trigger(p: WaNetParams, target: int, size: tuple[int, int, int]) -> TransformTrigger:
    _, h, w = size
    if p.cross_ratio < 0:
        raise UsageError(f"wanet: cross_ratio {p.cross_ratio} is negative", "use e.g. 2 (or 0 for no noise mode)")
    grid = wanet_grid(p, h, w)

    def warp(x: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, gr.to(x.device, x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return warp(x, grid.expand(len(x), -1, -1, -1))

    def noise_fn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # the authors' noise mode: the backdoor grid plus uniform noise of one pixel-step, redrawn per image
        ins = torch.rand(len(x), h, w, 2, generator=g) * 2 - 1
        return warp(x, (grid + ins / h).clamp(-1, 1))

    mask, pattern = picture_of(fn, size)
    shift = (grid - identity_grid(h, w)) * (h - 1) / 2  # in pixels
    extra = {"max_shift_px": round(float(shift.abs().max()), 4), "mean_shift_px": round(float(shift.abs().mean()), 4)}
    return TransformTrigger(mask, pattern, target, "wanet", _info(p, **extra), fn=fn,
                            noise_fn=noise_fn if p.cross_ratio > 0 else None)


# ---------------------------------------------------------------------------------------------- ISSBA


@dataclass(frozen=True)
class ISSBAParams:
    """ISSBA-style sample-specific additive trigger from a fixed seeded generator (see the module docstring).

    Attributes:
        eps: L-infinity bound of every image's perturbation (in [0, 1] units); each image's residual is scaled to
            a root mean square of ``eps / 2`` and clipped to ``±eps`` (ISSBA's residuals are of that size: about
            30 dB PSNR).
        width: channels of the generator's hidden layers.
        code_weight: weight of the fixed code map among the generator's inputs (0: the residual is a function of
            the image alone; larger: more of it is shared by all images).
        seed: the generator's weights and code map.
    """

    eps: float = 0.05
    width: int = 16
    code_weight: float = 1.0
    seed: int = 0


def issba_generator(p: ISSBAParams, size: tuple[int, int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The residual ``r(x)`` (N, C, H, W) -> (N, C, H, W), unscaled: three 3×3 convolutions with seeded
    He-normal weights on [2x - 1, code], LeakyReLU between them."""
    c, h, w = size
    g = torch.Generator().manual_seed(int(p.seed))
    code = (torch.rand(1, 1, h, w, generator=g) * 2 - 1) * p.code_weight
    shapes = [(p.width, c + 1), (p.width, p.width), (c, p.width)]
    weights = [torch.randn(o, i, 3, 3, generator=g) * math.sqrt(2.0 / (9 * i)) for o, i in shapes]

    def r(x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x * 2 - 1, code.to(x.device, x.dtype).expand(len(x), -1, -1, -1)], 1)
        for n, wt in enumerate(weights):
            z = F.conv2d(z, wt.to(x.device, x.dtype), padding=1)
            if n < len(weights) - 1:
                z = F.leaky_relu(z, 0.2)
        return z

    return r


def issba_trigger(p: ISSBAParams, target: int, size: tuple[int, int, int]) -> TransformTrigger:
    if not 0 < p.eps <= 0.5 or p.width < 1 or p.code_weight < 0:
        raise UsageError(f"issba: eps {p.eps} / width {p.width} / code_weight {p.code_weight} out of range",
                         "use 0 < eps <= 0.5, width >= 1, code_weight >= 0")
    r = issba_generator(p, size)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            res = r(x)
            rms = res.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
            return (x + (0.5 * p.eps * res / rms).clamp(-p.eps, p.eps)).clamp(0, 1)

    mask, pattern = picture_of(fn, size)
    return TransformTrigger(mask, pattern, target, "issba", _info(p), fn=fn)


def residual_similarity(trigger: Trigger, x: torch.Tensor) -> float:
    """Mean cosine similarity between the perturbations ``stamp(x) - x`` of different images (1: one shared
    pattern, as a blended trigger; near 0: unrelated per-image perturbations)."""
    with torch.no_grad():
        d = (trigger.stamp(x) - x).flatten(1)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = d @ d.T
        n = len(x)
        return float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))


# ------------------------------------------------------------------------------------- procedural image


def procedural_image(size: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A seeded picture (C, H, W) in [0, 1] to blend in instead of a downloaded one (Chen et al. blended a
    photograph): a two-colour gradient with a few soft-edged coloured ellipses and a band of stripes, so it has
    smooth regions, edges and texture at several scales, like a photograph and unlike uniform noise."""
    c, h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / max(1, h - 1), xx / max(1, w - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = (1 - t)[..., None] * c0 + t[..., None] * c1
    for _ in range(int(rng.integers(4, 8))):
        cy, cx = rng.uniform(0, 1, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        a = np.clip((1.15 - d) / 0.3, 0, 1)[..., None]  # soft edge
        img = (1 - a) * img + a * rng.uniform(0, 1, 3)
    period = rng.uniform(0.08, 0.2)
    stripes = (np.sin(2 * np.pi * (xx + yy) / period) > 0).astype(np.float64)
    band = (np.abs(yy - rng.uniform(0.2, 0.8)) < 0.12)[..., None]
    img = np.where(band, 0.6 * img + 0.4 * stripes[..., None] * rng.uniform(0, 1, 3), img)
    out = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32)).permute(2, 0, 1)
    if c == 1:
        out = out.mean(0, keepdim=True)
    elif c != 3:
        out = out[:1].expand(c, h, w)
    return out.contiguous()
