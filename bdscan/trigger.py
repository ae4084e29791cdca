"""A trigger: a mask and a pattern stamped onto images, as in Neural Cleanse.

Used for reversed triggers (scan), original triggers (lab models) and unlearning (repair).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Trigger:
    """A stampable trigger.

    Attributes:
        mask: (H, W) float in [0, 1], shared across channels.
        pattern: (C, H, W) float in [0, 1].
        target: the class the trigger sends images to, if known.
        kind: "reversed-pixel", "reversed-patch", "badnets", "blended", "trojan", "file", ...
        params: how it was made (attack parameters, or the scan's label and norm).
    """

    mask: torch.Tensor
    pattern: torch.Tensor
    target: int | None = None
    kind: str = "reversed-pixel"
    params: dict[str, Any] = field(default_factory=dict)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Stamps images (N, C, H, W) in [0, 1]: ``(1 - m) * x + m * p`` (Neural Cleanse, eq. 1)."""
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return (1 - m) * x + m * p

    def l1(self) -> float:
        return float(self.mask.abs().sum())

    def distance(self, other: Trigger) -> float:
        """Euclidean distance between the stamped contributions ``m * p``, per pixel (RMS).

        The research paper compares original and reversed triggers by a Euclidean distance
        (0.014 CNN vs 0.023 ViT) without saying how it is normalised; we use the root mean square
        of ``m·p - m'·p'`` over all C×H×W values so the figure does not depend on image size.
        """
        a = (self.mask * self.pattern).float()
        b = (other.mask.to(a.device) * other.pattern.to(a.device)).float()
        return float(((a - b) ** 2).mean().sqrt())
