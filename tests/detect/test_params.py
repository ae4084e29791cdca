"""Sizes of known masks: token counts on each architecture's own grid, pixel L1, the blend level."""

import pytest
import timm
import torch

from bdscan.detect.params import BlendTrigger, PatchTrigger, PixelTrigger, cnn_patch_sweep
from bdscan.models import BDSCAN_ARCHS, find_token_grid

ON, OFF = 30.0, -30.0  # raw values that squash to ~1 and ~0


def one_token(shape: tuple[int, ...], i: int, j: int) -> torch.Tensor:
    raw = torch.full((1, *shape), OFF)
    raw[0, i, j] = ON
    return raw


@pytest.mark.parametrize("arch", list(BDSCAN_ARCHS))
def test_token_count_on_each_architecture_grid(arch: str) -> None:
    grid = find_token_grid(timm.create_model(arch, num_classes=10), (3, 32, 32))
    if grid is None:
        assert arch in ("bdscan_cnn6", "bdscan_resnet18")
        return
    assert grid.grid == (8, 8) and grid.stride == 4
    p = PatchTrigger(grid, 32, 32)
    centre, corner = p.norm(one_token(p.mask_shape, 3, 4)), p.norm(one_token(p.mask_shape, 0, 0))
    if arch == "bdscan_cct":
        # CCT tokens see 13x13 pixels every 4 (offset -6): a 4x4 cell is seen by 4x4 tokens, 3x3 in a corner
        assert (grid.footprint, grid.offset) == (13, -6)
        assert float(centre) == pytest.approx(16.0, abs=1e-3)
        assert float(corner) == pytest.approx(9.0, abs=1e-3)
    else:
        assert float(centre) == pytest.approx(1.0, abs=1e-3) and float(corner) == pytest.approx(1.0, abs=1e-3)
    pix = p.pixel_mask(one_token(p.mask_shape, 3, 4))
    assert pix.shape == (1, 1, 32, 32)
    assert float(pix.sum()) == pytest.approx(16.0, abs=1e-2)
    assert float(pix[0, 0, 12:16, 16:20].min()) > 0.99


def test_pixel_l1() -> None:
    p = PixelTrigger(8, 8)
    raw = torch.full((2, 8, 8), OFF)
    raw[1, :3, :3] = ON
    assert p.norm(raw).tolist() == pytest.approx([0.0, 9.0], abs=1e-3)


def test_cnn_sweep_units_and_shift() -> None:
    sweep = cnn_patch_sweep(32, 32, (4, 8))
    assert [s.name for s in sweep] == ["patch4", "patch4+half", "patch8", "patch8+half"]
    p8 = sweep[2]
    # one 8x8 cell = four 4x4 units
    assert float(p8.norm(one_token(p8.mask_shape, 1, 1))) == pytest.approx(4.0, abs=1e-3)
    shifted = sweep[3]
    assert shifted.mask_shape == (5, 5)
    pix = shifted.pixel_mask(one_token(shifted.mask_shape, 1, 1))
    # a half-shifted cell (1, 1) covers pixels 4..11
    assert float(pix[0, 0, 4:12, 4:12].min()) > 0.99 and float(pix.sum()) == pytest.approx(64.0, abs=1e-2)


def test_cnn_sweep_without_offsets() -> None:
    assert [s.name for s in cnn_patch_sweep(32, 32, (4,), half_offsets=False)] == ["patch4"]
    assert [s.name for s in cnn_patch_sweep(32, 32, (4,))] == ["patch4", "patch4+half"]


def test_blend_mask_is_one_level_over_the_whole_image_and_its_size_is_in_pixels() -> None:
    p = BlendTrigger(6, 8)
    raw = torch.stack([torch.full((1, 1), OFF), torch.zeros(1, 1)])  # levels ~0 and 0.5
    m = p.pixel_mask(raw)
    assert m.shape == (2, 1, 6, 8)
    assert torch.equal(m[1], torch.full_like(m[1], float(m[1, 0, 0, 0]))) and float(m[1, 0, 0, 0]) == pytest.approx(0.5)
    # the size is the L1 norm of the uniform mask: level × pixels, on the pixel level's scale
    assert p.norm(raw).tolist() == pytest.approx([0.0, 24.0], abs=1e-3)
    assert p.norm(raw).tolist() == pytest.approx(m.flatten(1).sum(1).tolist(), abs=1e-3)
