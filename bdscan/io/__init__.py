"""Safe model loading and writing: one registry entry per checkpoint format (see :mod:`bdscan.io.base`).

Each format module registers its loader (and, where bdscan writes the format, its writer) when it is
imported; importing :mod:`bdscan.io` imports them all.
"""

# isort: off
# Registration order = sniffing order: the specific zip layouts (TorchScript, torch.export) come before
# the generic state-dict archive; the pickle loader (imported by the state-dict loader, which hands it
# files) is never sniffed.
from bdscan.io import safetensors_io as safetensors_io
from bdscan.io import torchscript as torchscript
from bdscan.io import torch_export as torch_export
from bdscan.io import state_dict as state_dict
from bdscan.io import onnx_io as onnx_io
from bdscan.io import pickle_module as pickle_module
from bdscan.io import hf_folder as hf_folder
from bdscan.io import timm_folder as timm_folder

# isort: on
from bdscan.io.base import (
    Format,
    LoadedModel,
    Loader,
    LoadOptions,
    PickleFinding,
    PickleScan,
    Readback,
    Writer,
    formats,
    load_model,
    loaders,
    output_suffixes,
    writer_for,
    writers,
)
from bdscan.io.onnx_io import export_onnx
from bdscan.io.picklescan_io import scan_pickles
from bdscan.io.safetensors_io import save_safetensors

__all__ = [
    "Format",
    "LoadOptions",
    "LoadedModel",
    "Loader",
    "PickleFinding",
    "PickleScan",
    "Readback",
    "Writer",
    "export_onnx",
    "formats",
    "load_model",
    "loaders",
    "output_suffixes",
    "save_safetensors",
    "scan_pickles",
    "writer_for",
    "writers",
]
