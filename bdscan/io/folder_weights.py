"""Reading a model folder's JSON files and weights safely (shared by the Hugging Face and timm folder loaders).

A model folder as ``save_pretrained`` (transformers) or ``save_for_hf``/``push_to_hf_hub`` (timm) writes it holds a
``config.json`` and its weights in one of three layouts, tried in this order:

* ``model.safetensors``: header bounds-checked (:func:`bdscan.io.safetensors_io.read_metadata`), then safetensors;
* ``model.safetensors.index.json`` + shards: the index's ``weight_map`` may only name plain ``.safetensors`` file
  names inside the folder (no ``/``, no ``..``), each shard read as above, and every tensor must come from the
  shard the index names;
* ``pytorch_model.bin``: only through bdscan's static pickle scan (:func:`bdscan.io.picklescan_io.scan_pickles`,
  a dangerous import refuses the folder with exit code 1) and then ``torch.load(weights_only=True)``
  (:func:`bdscan.io.state_dict.weights_only_load`), as a ``.pt`` state dict is read.

Nothing in the folder is executed or imported: JSON files are parsed as data (bounded in size) and no Python file
of the folder is ever looked at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bdscan.errors import ModelLoadError
from bdscan.io.base import PickleScan, guarded, one_line
from bdscan.io.build import extract_state_dict
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.safetensors_io import read_metadata

CONFIG = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
#: config files are small; a huge one is damaged or hostile
MAX_JSON_BYTES = 16 * 1024 * 1024


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (size-bounded); a missing, damaged or non-object file is a ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"{path.parent.name}: no {path.name} in the folder", f"a {what} folder needs its {path.name}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path.parent.name}/{path.name} is over {MAX_JSON_BYTES >> 20} MiB", "the file is damaged or hostile")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path.parent.name}/{path.name} is not valid JSON ({one_line(str(e), 120)})",
                             "the file is damaged: re-download or re-export the model") from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.parent.name}/{path.name} is not a JSON object", "the file is damaged: re-download it")
    return obj


def peek_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of ``folder`` when it is a readable JSON object, else None (for sniffing: never raises)."""
    try:
        return read_json(folder / CONFIG, "model")
    except (ModelLoadError, OSError):
        return None


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    read_metadata(path)  # header bounds check before the library parses the file
    return guarded("safetensors", path, lambda: load_file(str(path)))


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    index = read_json(folder / SAFE_INDEX, "sharded safetensors")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise ModelLoadError(f"{folder.name}/{SAFE_INDEX} has no weight_map", "the index is damaged: re-download it")
    shards = sorted({str(v) for v in wmap.values()})
    for s in shards:
        if "/" in s or "\\" in s or s.startswith(".") or not s.endswith(".safetensors"):
            raise ModelLoadError(f"{folder.name}/{SAFE_INDEX} names shard {one_line(s, 80)!r} outside the folder or not safetensors",
                                 "the index is damaged or hostile; shards must be .safetensors files in the model folder")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        part = _safetensors(folder / s)
        for k, v in part.items():
            if wmap.get(k) != s:
                raise ModelLoadError(f"{folder.name}: tensor {one_line(k, 80)!r} is in shard {s} but the index says {wmap.get(k)!r}",
                                     "the shards and the index disagree: re-download the model")
            state[k] = v
    missing = [k for k in wmap if k not in state]
    if missing:
        raise ModelLoadError(f"{folder.name}: the index lists {len(missing)} tensors no shard holds (first: {one_line(missing[0], 80)!r})",
                             "a shard is missing or truncated: re-download the model")
    return state


def read_folder_weights(folder: Path, loader: str) -> tuple[dict[str, torch.Tensor], PickleScan | None, str]:
    """The tensors of a model folder (see the module docstring for the layouts and their checks).

    Args:
        folder: the model folder.
        loader: the calling loader's name (reports of a refused pickle).

    Returns:
        (state dict, static pickle scan or None, the weights file's name).

    Raises:
        UnsafeModelError: ``pytorch_model.bin``'s static scan found dangerous imports (it was not unpickled).
        ModelLoadError: no weights, or damaged ones.
    """
    if (folder / SAFE_WEIGHTS).is_file():
        return _safetensors(folder / SAFE_WEIGHTS), None, SAFE_WEIGHTS
    if (folder / SAFE_INDEX).is_file():
        return _sharded(folder), None, SAFE_INDEX
    if (folder / BIN_WEIGHTS).is_file():
        from bdscan.io.state_dict import PickledObjectsError, weights_only_load

        path = folder / BIN_WEIGHTS
        scan = scan_pickles(path)
        refuse_if_unsafe(path, scan, "a PyTorch checkpoint", loader)
        try:
            obj = weights_only_load(path)
        except PickledObjectsError as e:
            raise ModelLoadError(f"{folder.name}/{BIN_WEIGHTS} holds pickled Python objects ({one_line(e.detail, 80)}), not only tensors",
                                 "bdscan reads model folders' weights only; ask the publisher for model.safetensors") from None
        return extract_state_dict(obj, path), scan, BIN_WEIGHTS
    raise ModelLoadError(f"{folder.name}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS}) in the folder",
                         "download the whole model folder")

