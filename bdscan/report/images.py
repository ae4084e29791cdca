"""Small PNG helpers: tensors to PNG bytes and inline ``data:`` URIs (no files, no external links)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from bdscan.trigger import Trigger


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(H, W) or (C, H, W) float in [0, 1] -> (H, W) or (H, W, C) uint8."""
    a = img.detach().float().clamp(0, 1).cpu().numpy()
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
        if a.shape[2] == 1:
            a = a[:, :, 0]
    return (a * 255 + 0.5).astype(np.uint8)


def png_bytes(img: torch.Tensor, upscale: int = 1) -> bytes:
    """PNG of an image tensor in [0, 1]; ``upscale`` > 1 enlarges with nearest neighbour (crisp pixels)."""
    im = Image.fromarray(to_uint8(img))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    buf = io.BytesIO()
    # fixed settings and no timestamps: identical tensors give identical bytes (deterministic reports)
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def data_uri(img: torch.Tensor, upscale: int = 1) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img, upscale)).decode("ascii")


def decode_data_uri(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def stretch(mask: torch.Tensor) -> torch.Tensor:
    """A mask scaled so that its strongest value is white (a soft reversed mask often peaks at 0.2-0.4 and would
    be a nearly black thumbnail); an all-zero mask stays black. For pictures only: sizes, JSON and ``triggers.npz``
    keep the raw values."""
    m = mask.detach().float().clamp(0, 1)
    top = float(m.max()) if m.numel() else 0.0
    return m / top if top > 0 else m


def trigger_images(t: Trigger, example: torch.Tensor | None) -> dict[str, str]:
    """Inline PNGs of a trigger: mask (contrast-stretched by :func:`stretch`), pattern, mask·pattern, and a
    stamped clean image (C, H, W) when given."""
    imgs = {"mask": data_uri(stretch(t.mask)), "pattern": data_uri(t.pattern), "product": data_uri(t.mask * t.pattern)}
    if example is not None:
        imgs["stamped"] = data_uri(t.stamp(example.unsqueeze(0))[0])
    return imgs
