"""Safe model loading: one loader per format behind a registry (see :mod:`bdscan.io.base`)."""

from bdscan.io import safetensors_io as safetensors_io
from bdscan.io.base import LoadedModel, LoadOptions, PickleFinding, PickleScan, load_model, loaders
from bdscan.io.safetensors_io import save_safetensors

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "PickleFinding",
    "PickleScan",
    "load_model",
    "loaders",
    "save_safetensors",
]
