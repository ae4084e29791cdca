"""Safe model loading: one loader per format behind a registry (see :mod:`bdscan.io.base`)."""

# isort: off
# Registration order = sniffing order: the specific zip layouts (TorchScript, torch.export) come before
# the generic state-dict archive, and the pickle loader is never sniffed.
from bdscan.io import safetensors_io as safetensors_io
from bdscan.io import torchscript as torchscript
from bdscan.io import torch_export as torch_export
from bdscan.io import state_dict as state_dict
from bdscan.io import onnx_io as onnx_io
from bdscan.io import pickle_module as pickle_module

# isort: on
from bdscan.io.base import LoadedModel, LoadOptions, PickleFinding, PickleScan, load_model, loaders
from bdscan.io.onnx_io import export_onnx
from bdscan.io.picklescan_io import scan_pickles
from bdscan.io.safetensors_io import save_safetensors

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "PickleFinding",
    "PickleScan",
    "export_onnx",
    "load_model",
    "loaders",
    "save_safetensors",
    "scan_pickles",
]
