"""Finding a model's token grid from the module itself.

The patch-level scan puts its mask on the model's own token grid, so the grid must come from the
model, not from a guess. Detectors are tried in registration order; the first that recognises the
model wins and says how it found the grid (:attr:`TokenGrid.source`), which every report shows.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bdscan.models.wrapper import TokenGrid

GridDetector = Callable[[nn.Module, tuple[int, int, int]], "TokenGrid | None"]
_DETECTORS: list[tuple[str, GridDetector]] = []


def register_grid_detector(name: str) -> Callable[[GridDetector], GridDetector]:
    """Decorator adding a detector ``fn(net, input_size) -> TokenGrid | None`` to the registry."""

    def deco(fn: GridDetector) -> GridDetector:
        _DETECTORS.append((name, fn))
        return fn

    return deco


def _int(v: int | tuple[int, ...]) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


@register_grid_detector("conv tokenizer")
def _conv_tokenizer(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    tok = getattr(net, "tokenizer", None)
    if tok is None or not hasattr(tok, "footprint"):
        return None
    rows = len(range(0, input_size[1], tok.stride))
    cols = len(range(0, input_size[2], tok.stride))
    return TokenGrid((rows, cols), tok.stride, tok.footprint, tok.offset, "CCT convolutional tokenizer")


@register_grid_detector("patch embedding")
def _patch_embed(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    pe = getattr(net, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        return None
    k, s = _int(proj.kernel_size), _int(proj.stride)
    grid = (input_size[1] // s, input_size[2] // s)
    return TokenGrid(grid, s, k, 0, f"timm PatchEmbed ({type(pe).__name__}, {k}x{k} stride {s})")


@register_grid_detector("first conv with stride == kernel")
def _first_conv_patchify(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    # A graph converted from ONNX or TorchScript has no named patch_embed; a first convolution whose
    # stride equals its kernel (and is > 1) cuts the image into non-overlapping patches.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            k, s = _int(m.kernel_size), _int(m.stride)
            if k == s and k > 1 and _int(m.padding) == 0:
                grid = (input_size[1] // s, input_size[2] // s)
                return TokenGrid(grid, s, k, 0, f"graph: first convolution has kernel = stride = {k}")
            return None
    return None


def find_token_grid(net: nn.Module, input_size: tuple[int, int, int]) -> TokenGrid | None:
    """Returns the token grid of ``net`` at ``input_size`` (C, H, W), or None for a model without one."""
    for _, fn in _DETECTORS:
        grid = fn(net, input_size)
        if grid is not None:
            return grid
    return None


def grid_from_patch_size(patch: int, input_size: tuple[int, int, int]) -> TokenGrid:
    """The grid a user states with ``--patch-size P``: non-overlapping P×P patches."""
    return TokenGrid((input_size[1] // patch, input_size[2] // patch), patch, patch, 0, f"--patch-size {patch}")
