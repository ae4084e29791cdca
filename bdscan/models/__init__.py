"""Architectures (registered into timm), the model wrapper and token-grid discovery."""

from bdscan.models import archs as archs
from bdscan.models.archs import BDSCAN_ARCHS
from bdscan.models.grid import find_token_grid, grid_from_patch_size
from bdscan.models.wrapper import ModelInfo, ModelWrapper, TokenGrid, check_model_output

__all__ = [
    "BDSCAN_ARCHS",
    "ModelInfo",
    "ModelWrapper",
    "TokenGrid",
    "check_model_output",
    "find_token_grid",
    "grid_from_patch_size",
]
