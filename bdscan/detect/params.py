"""Trigger parametrisations plugged into the one inversion core (:mod:`bdscan.detect.inversion`).

A parametrisation owns the raw (unconstrained) mask tensor of K labels and says how it becomes a
pixel mask and what its size statistic is:

* :class:`PixelTrigger` - Neural Cleanse's: one mask value per pixel (H×W), statistic = L1 norm.
* :class:`BlendTrigger` - one mask value for the whole image (a blend level): a trigger spread thinly over every
  pixel, statistic = blend level × pixels.
* :class:`PatchTrigger` - bdscan's patch-level variant: one mask value per token of the model's token
  grid, upsampled to pixels; statistic = tokens touched. The research paper (Raj et al., section 5.4)
  argues transformers see patches, not pixels, so a trigger's size should be counted in patches.

Both keep Neural Cleanse's full-resolution pattern (C×H×W) and tanh parametrisation into [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from bdscan.models.wrapper import TokenGrid

#: Neural Cleanse's epsilon in ``tanh(x) / (2 - eps) + 0.5``: keeps values strictly inside [0, 1]
_EPS = 1e-7


def squash(raw: torch.Tensor) -> torch.Tensor:
    """tanh parametrisation into [0, 1] (Neural Cleanse's ``tanh(x) / (2 - eps) + 0.5``)."""
    return torch.tanh(raw) / (2 - _EPS) + 0.5


class TriggerParam(Protocol):
    """How a raw mask tensor (K, *mask_shape) becomes pixels and a size statistic."""

    name: str
    statistic: str

    @property
    def mask_shape(self) -> tuple[int, ...]: ...

    def pixel_mask(self, raw: torch.Tensor) -> torch.Tensor:
        """(K, *mask_shape) raw -> (K, 1, H, W) pixel mask in [0, 1]."""

    def norm(self, raw: torch.Tensor) -> torch.Tensor:
        """(K, *mask_shape) raw -> (K,) differentiable size statistic (the regulariser)."""

    def describe(self) -> dict[str, object]:
        """JSON-able description for reports."""


@dataclass(frozen=True)
class PixelTrigger:
    """Neural Cleanse's pixel mask: (H, W), statistic L1 = sum of mask values."""

    height: int
    width: int
    name: str = "pixel"
    statistic: str = "L1 norm of the pixel mask"

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return (self.height, self.width)

    def pixel_mask(self, raw: torch.Tensor) -> torch.Tensor:
        return squash(raw).unsqueeze(1)

    def norm(self, raw: torch.Tensor) -> torch.Tensor:
        return squash(raw).flatten(1).sum(1)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "statistic": self.statistic, "mask_shape": list(self.mask_shape)}


@dataclass(frozen=True)
class PatchTrigger:
    """A mask with one value per token, upsampled to pixels; statistic = tokens touched.

    Token ``(i, j)`` owns the ``stride × stride`` pixel cell starting at ``cell_offset + i*stride``
    (``cell_offset`` is 0, or -stride/2 for a half-patch shifted grid used on CNNs).
    For non-overlapping patch embeddings (ViT, DeiT, ConViT) a token's cell is its whole receptive
    field and the statistic is the sum of the token mask. For an overlapping tokenizer (CCT) a cell
    is seen by several tokens, so the statistic counts the tokens whose receptive field
    (``footprint`` pixels starting at ``grid.offset + i*stride``) the pixel mask touches:
    a max-pool of the pixel mask with that footprint and stride, summed.

    Attributes:
        grid: the model's token grid (or a swept grid for CNNs).
        height, width: image size.
        cell_offset: 0 or -stride // 2 (shifted grid).
        unit_area: pixels per counted unit; a CNN sweep reports counts in units of its finest grid so
            counts of different grids compare (count × stride² / unit_area).
    """

    grid: TokenGrid
    height: int
    width: int
    cell_offset: int = 0
    unit_area: int | None = None
    name: str = "patch"
    statistic: str = "tokens touched"

    @property
    def cells(self) -> tuple[int, int]:
        s, o = self.grid.stride, -self.cell_offset
        return (math.ceil((self.height + o) / s), math.ceil((self.width + o) / s))

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return self.cells

    def token_mask(self, raw: torch.Tensor) -> torch.Tensor:
        return squash(raw)

    def pixel_mask(self, raw: torch.Tensor) -> torch.Tensor:
        s, o = self.grid.stride, -self.cell_offset
        up = squash(raw).unsqueeze(1).repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
        return up[:, :, o : o + self.height, o : o + self.width]

    def norm(self, raw: torch.Tensor) -> torch.Tensor:
        g = self.grid
        if g.overlapping and self.cell_offset == 0:
            pix = self.pixel_mask(raw)
            pad = -g.offset
            # max_pool2d pads with -inf, i.e. padding pixels never count as touched
            touched = F.max_pool2d(pix, kernel_size=g.footprint, stride=g.stride, padding=pad, ceil_mode=False)
            count = touched.flatten(1).sum(1)
        else:
            count = squash(raw).flatten(1).sum(1)
        if self.unit_area:
            count = count * (g.stride * g.stride) / self.unit_area
        return count

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "statistic": self.statistic,
            "mask_shape": list(self.mask_shape),
            "grid": self.grid.to_dict(),
            "cell_offset": self.cell_offset,
            "unit_area": self.unit_area,
        }


@dataclass(frozen=True)
class BlendTrigger:
    """One mask value for the whole image: the trigger is the pattern blended over the image at level ``a``,
    ``x' = (1 - a) * x + a * p``; statistic = ``a * H * W``, the L1 norm of that uniform mask, so that its
    size and Neural Cleanse's λ schedule are on the pixel level's scale.

    The pixel level's L1 penalty favours small opaque patches and so cannot see a trigger spread thinly over
    the whole image (Blended, Chen et al. 2017; SIG, Barni et al. 2019; warping, WaNet, Nguyen & Tran 2021):
    such a trigger's L1 norm is large. What stays small is how much of every pixel must be replaced: a
    universal, targeted perturbation of bounded amplitude (``|x' - x| <= a``), the evidence of USB
    (Xu et al., "Universal Soldier: using universal adversarial perturbations for detecting backdoor attacks",
    2023), measured here with Neural Cleanse's own schedule and outlier test.
    """

    height: int
    width: int
    name: str = "blend"
    statistic: str = "blend level × pixels (L1 norm of a uniform mask)"

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return (1, 1)

    def pixel_mask(self, raw: torch.Tensor) -> torch.Tensor:
        return squash(raw).unsqueeze(1).expand(-1, 1, self.height, self.width)

    def norm(self, raw: torch.Tensor) -> torch.Tensor:
        return squash(raw).flatten(1)[:, 0] * (self.height * self.width)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "statistic": self.statistic, "mask_shape": list(self.mask_shape)}


def cnn_patch_sweep(height: int, width: int, sizes: tuple[int, ...] = (4, 8), half_offsets: bool = True) -> list[PatchTrigger]:
    """Patch parametrisations for a model without a token grid (a CNN).

    A CNN has no patches of its own, so we sweep grid sizes ``sizes`` and, with ``half_offsets``, for each a
    grid shifted by half a patch; each label keeps its minimum over the sweep. Counts are expressed in units of the
    finest grid's patch (``min(sizes)²`` pixels) so that different grids compare.
    """
    unit = min(sizes) ** 2
    out = []
    for p in sizes:
        g = TokenGrid((height // p, width // p), p, p, 0, f"CNN sweep: {p}x{p} grid")
        out.append(PatchTrigger(g, height, width, 0, unit, name=f"patch{p}"))
        if half_offsets:
            out.append(PatchTrigger(g, height, width, -(p // 2), unit, name=f"patch{p}+half"))
    return out
