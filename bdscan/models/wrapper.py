"""The one small interface every bdscan algorithm uses to talk to a model.

A :class:`ModelWrapper` takes images in [0, 1] pixel space, shape (N, C, H, W), applies the model's own
input scaling (mean/std, or 0-255) internally, and returns logits (N, num_classes). Algorithms therefore
optimise triggers in pixel space whatever the checkpoint expects, exactly as Neural Cleanse stamps
``(1 - m) * x + m * p`` on raw images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bdscan.errors import NumericalError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TokenGrid:
    """Where a model's tokens sit on the image.

    Token ``(i, j)`` sees pixels ``[offset + i*stride, offset + i*stride + footprint)`` on each axis.
    For a ViT patch embedding ``footprint == stride == patch size`` and ``offset == 0``; for CCT's
    convolutional tokenizer the footprint is wider than the stride and the offset negative (padding).

    Attributes:
        grid: tokens per axis (rows, cols).
        stride: pixels between neighbouring tokens.
        footprint: receptive field of one token, in pixels.
        offset: pixel coordinate where token 0's receptive field starts (<= 0).
        source: how the grid was found (e.g. "timm PatchEmbed", "--patch-size", "graph: Conv k=s=4").
    """

    grid: tuple[int, int]
    stride: int
    footprint: int
    offset: int = 0
    source: str = ""

    @property
    def overlapping(self) -> bool:
        return self.footprint != self.stride or self.offset != 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What bdscan knows about a model besides its weights.

    Attributes:
        arch: registry name (timm) or a description for self-describing formats ("onnx", "torchscript").
        num_classes: number of output classes.
        input_size: (C, H, W) the model expects.
        mean: per-channel mean subtracted after scaling pixels to [0, 1] (or 0-255, see ``scale``).
        std: per-channel std divided after that.
        scale: multiply [0, 1] pixels by this before mean/std (255 for models that take 0-255).
        class_names: one name per class (defaults to the indices).
        output: "logits" or "probs" (a softmax at the end; detected at load time, see :func:`detect_output`).
        token_grid: the model's token grid, None for CNNs.
        metadata: everything else read from the checkpoint (training accuracy, lab trigger, provenance).
        arch_kwargs: extra keyword arguments the architecture was built with (e.g. a width).
    """

    arch: str
    num_classes: int
    input_size: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    class_names: tuple[str, ...] = ()
    output: str = "logits"
    token_grid: TokenGrid | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def class_name(self, k: int) -> str:
        return self.class_names[k] if k < len(self.class_names) else str(k)

    def with_(self, **changes: Any) -> ModelInfo:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_grid"] = self.token_grid.to_dict() if self.token_grid else None
        d["metadata"] = json.loads(json.dumps(self.metadata, default=str))
        return d


class ModelWrapper(nn.Module):
    """A classifier seen through bdscan's contract: [0, 1] images in, logits out.

    Args:
        net: the underlying module; takes normalised input (N, C, H, W).
        info: the model's :class:`ModelInfo`.

    Shapes:
        forward: (N, C, H, W) float in [0, 1] -> (N, num_classes) logits. Models that end in a
        softmax return log-probabilities, which are logits up to a per-row constant, so cross-entropy
        and argmax behave as on logits.
    """

    def __init__(self, net: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.net = net
        self.info = info
        c = info.input_size[0]
        self.register_buffer("_mean", _per_channel(info.mean, c), persistent=False)
        self.register_buffer("_std", _per_channel(info.std, c), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.info.input_size

    @property
    def token_grid(self) -> TokenGrid | None:
        return self.info.token_grid

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (N, C, H, W) -> the model's own input scaling."""
        return (x * self.info.scale - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.normalise(x))
        if isinstance(out, (tuple, list)):  # DeiT in distillation-training mode returns (cls, dist)
            out = (out[0] + out[1]) / 2
        if self.info.output == "probs":
            out = torch.log(out.clamp_min(1e-12))
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels (N,) for images (N, C, H, W) in [0, 1], in eval mode, batched."""
        self.eval()
        dev = next(self.parameters(), torch.empty(0)).device
        outs = [self(x[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, dtype=torch.long)


def _per_channel(values: tuple[float, ...], channels: int) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    if t.numel() == 1:
        t = t.repeat(channels)
    return t.view(1, -1, 1, 1)


@torch.no_grad()
def check_model_output(wrapper: ModelWrapper) -> str:
    """Runs one probe batch and checks the output contract.

    Returns:
        "logits" or "probs": "probs" when every row is non-negative and sums to 1 (a softmax head).

    Raises:
        NumericalError: output is not (N, num_classes), or contains NaN/inf.
    """
    wrapper.eval()
    dev = next(wrapper.parameters(), torch.empty(0)).device
    g = torch.Generator().manual_seed(0)
    x = torch.rand((4, *wrapper.input_size), generator=g).to(dev)
    out = wrapper.net(wrapper.normalise(x))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (4, wrapper.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NumericalError(
            f"the model returns {shape} for a batch of 4 images, expected (4, {wrapper.num_classes})",
            "check --num-classes and --input-size, or export the model so it returns class scores",
        )
    if not torch.isfinite(out).all():
        raise NumericalError(
            "the model returns NaN or inf on ordinary images; its weights are broken",
            "scan a checkpoint with finite weights",
        )
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(4, device=out.device), atol=1e-4):
        return "probs"
    return "logits"
