"""Running a saved guard over inputs (``bdscan guard-check``): which were flagged.

Loading is as careful as loading a suspect model:

* ``.onnx``: parsed with ``onnx`` without external data (a guard never has any; a file that names some is
  refused before anything is read), then run with **onnxruntime only** (``CPUExecutionProvider``), never
  converted to torch code. Its metadata comes from ``metadata_props``.
* ``.pt`` (TorchScript): the static pickle scan bdscan's TorchScript loader runs
  (:func:`bdscan.io.picklescan_io.scan_pickles`; dangerous imports are refused, exit 1), then ``torch.jit.load``,
  whose unpickler builds only tensors and TorchScript classes.

Either must carry a ``bdscan.guard`` record (:mod:`bdscan.guard.export`) and return ``logits``, ``suspicion``
and ``flagged``. Inputs are images in [0, 1] as bdscan's data loaders read them (:mod:`bdscan.data`: a folder
with one sub-folder per class, or an ``.npz`` with ``x`` and ``y``), or unlabelled: a folder of images, or an
``.npz`` with ``x`` only. They are resized to the guard's input size and normalised with its metadata before
they reach the graph.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdscan.data import IMAGE_SUFFIXES, MAX_IMAGES, fit_channels_and_size, load_clean_data, to_nchw_float
from bdscan.errors import DataLoadError, ModelLoadError, UsageError, first_line
from bdscan.guard.export import OUTPUTS, SUFFIXES
from bdscan.io.onnx_io import META_PREFIX, check_external_data, ort_session
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.selfdescribing import META_FILE
from bdscan.trigger import Trigger

#: images per run of the guard
BATCH = 256


@dataclass
class LoadedGuard:
    """A guard file ready to run.

    Attributes:
        path: the file.
        format: "onnx" or "torchscript".
        meta: its bdscan metadata (``input_size``, ``mean``, ``std``, ``scale``, ``guard``...).
        runner: (N, C, H, W) normalised float32 -> {"logits", "suspicion", "flagged"} as numpy arrays.
    """

    path: Path
    format: str
    meta: dict[str, Any]
    runner: Any = field(repr=False)

    @property
    def guard(self) -> dict[str, Any]:
        return self.meta.get("guard") or {}

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["input_size"])  # type: ignore[return-value]

    @property
    def threshold(self) -> float | None:
        return self.guard.get("threshold")

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (N, C, H, W) -> the guarded network's input."""
        c = self.input_size[0]
        mean = torch.tensor(_per_channel(self.meta.get("mean", 0.0), c)).view(1, c, 1, 1)
        std = torch.tensor(_per_channel(self.meta.get("std", 1.0), c)).view(1, c, 1, 1)
        return ((x * float(self.meta.get("scale", 1.0)) - mean) / std).float().contiguous()

    def run(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Runs images (N, C, H, W) in [0, 1] through the guard, batched."""
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, len(x), BATCH):
            try:
                parts.append(self.runner(self.normalise(x[i : i + BATCH]).numpy()))
            except Exception as e:
                raise ModelLoadError(f"{self.path.name}: the guard does not run on these inputs: {first_line(e)}",
                                     "check that the images fit the guard's model") from e
        if not parts:
            return {o: np.empty(0) for o in OUTPUTS}
        return {o: np.concatenate([p[o] for p in parts]) for o in OUTPUTS}


def _per_channel(v: Any, c: int) -> list[float]:
    vals = [float(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise ModelLoadError(f"the guard's normalisation has {len(vals)} values for {c} channels", "rebuild the guard")
    return vals


def _meta_from(raw: dict[str, str], path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    if not isinstance(meta.get("guard"), dict):
        raise UsageError(f"{path.name} is not a bdscan guard (no bdscan.guard record in its metadata)",
                         "build one with `bdscan guard MODEL --data CLEAN --out GUARD.onnx`")
    size = meta.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ModelLoadError(f"{path.name}: its metadata has no valid input_size", "rebuild the guard")
    return meta


def _load_onnx(path: Path) -> LoadedGuard:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: cannot read it as ONNX: {first_line(e)}", "the file is corrupt or not a guard") from e
    if check_external_data(model, path):
        raise ModelLoadError(f"{path.name}: names external data files; a bdscan guard keeps everything in one file",
                             "rebuild the guard with `bdscan guard`")
    raw = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    meta = _meta_from(raw, path)
    try:
        sess = ort_session(model)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: onnxruntime cannot load it: {first_line(e)}", "the file is corrupt; rebuild the guard") from e
    names = [o.name for o in sess.get_outputs()]
    if tuple(names) != OUTPUTS:
        raise UsageError(f"{path.name} returns {names}, not a guard's {list(OUTPUTS)}", "build one with `bdscan guard`")
    input_name = sess.get_inputs()[0].name

    def runner(x: np.ndarray) -> dict[str, np.ndarray]:
        return {n: np.asarray(v) for n, v in zip(OUTPUTS, sess.run(None, {input_name: x}), strict=True)}

    return LoadedGuard(path, "onnx", meta, runner)


def _load_torchscript(path: Path) -> LoadedGuard:
    scan = scan_pickles(path)
    refuse_if_unsafe(path, scan, "TorchScript", "torchscript")
    extra: dict[str, Any] = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: cannot load it as TorchScript: {first_line(e)}", "the file is corrupt; rebuild the guard") from e
    try:
        raw = json.loads(extra.get(META_FILE) or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name}: its bdscan metadata is not JSON", "rebuild the guard") from e
    meta = _meta_from({k: json.dumps(v) for k, v in (raw if isinstance(raw, dict) else {}).items()}, path)

    def runner(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = loaded(torch.from_numpy(x))
        if not isinstance(out, dict) or any(o not in out for o in OUTPUTS):
            raise ModelLoadError(f"{path.name} does not return a guard's {list(OUTPUTS)}", "build one with `bdscan guard`")
        return {o: out[o].numpy() for o in OUTPUTS}

    return LoadedGuard(path, "torchscript", meta, runner)


def load_guard(path: Path) -> LoadedGuard:
    """Loads a guard file safely (see the module docstring).

    Raises:
        UsageError: not a guard (no ``bdscan.guard`` metadata, other outputs) or an unknown suffix.
        UnsafeModelError: a TorchScript file whose pickles import something dangerous.
        ModelLoadError: missing, corrupt or unloadable.
    """
    p = Path(path)
    fmt = SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise UsageError(f"{p.name}: a guard is an .onnx or .pt (TorchScript) file written by `bdscan guard`", "give the guard's path")
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such guard file", "check the path")
    return _load_onnx(p) if fmt == "onnx" else _load_torchscript(p)


@dataclass
class Inputs:
    """Images to check.

    Attributes:
        x: (N, C, H, W) float in [0, 1], resized to the guard's input.
        names: one name per image (file path relative to the folder, or ``#<index>`` in an ``.npz``).
        y: (N,) labels when the input had them, else None.
        source: where they came from.
    """

    x: torch.Tensor
    names: list[str]
    y: torch.Tensor | None
    source: str


def _labelled_names(path: Path) -> list[str]:
    """The image paths :func:`bdscan.data.load_folder` reads, in its order (sorted class folders, sorted files)."""
    return [f"{d.name}/{f.name}" for d in sorted(p for p in path.iterdir() if p.is_dir())
            for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]


def _flat_folder(path: Path, size: tuple[int, int, int]) -> Inputs:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataLoadError(f"{path}: no images (.png, .jpg, ...) in it or in class sub-folders", "give a folder of images or an .npz")
    if len(files) > MAX_IMAGES:
        raise DataLoadError(f"{path}: more than {MAX_IMAGES} images", "check them in smaller batches")
    parts = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataLoadError(f"{f}: not a readable image", "remove or replace the file") from e
        parts.append(fit_channels_and_size(to_nchw_float(arr[None], f.name), size, f.name))
    return Inputs(torch.cat(parts), [f.name for f in files], None, str(path))


def _npz_unlabelled(path: Path, size: tuple[int, int, int]) -> Inputs | None:
    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d.files or "y" in d.files:
                return None
            xa = d["x"]
    except (OSError, ValueError, EOFError) as e:
        raise DataLoadError(f"{path.name}: cannot read it as .npz: {first_line(e, 120)}", "give an .npz saved with numpy.savez") from e
    if len(xa) == 0:
        raise DataLoadError(f"{path.name}: contains no images", "give a non-empty .npz")
    x = fit_channels_and_size(to_nchw_float(xa, path.name), size, path.name)
    return Inputs(x, [f"#{i}" for i in range(len(x))], None, str(path))


def load_inputs(path: Path, input_size: tuple[int, int, int], num_classes: int, class_names: tuple[str, ...] = ()) -> Inputs:
    """Images to check (see the module docstring), resized to ``input_size``.

    Raises:
        DataLoadError: missing, unreadable, empty, or labels outside the model's classes.
    """
    p = Path(path)
    if not p.exists():
        raise DataLoadError(f"{p}: no such file or folder", "give a folder of images or an .npz")
    if p.is_dir():
        if not any(d.is_dir() for d in p.iterdir()):
            return _flat_folder(p, input_size)
        data = load_clean_data(p, input_size, num_classes, class_names)
        names = _labelled_names(p)
        if len(names) != len(data):  # cannot happen while load_folder reads what _labelled_names lists
            names = [f"#{i}" for i in range(len(data))]
        return Inputs(data.x, names, data.y, str(p))
    if p.suffix.lower() == ".npz":
        un = _npz_unlabelled(p, input_size)
        if un is not None:
            return un
    data = load_clean_data(p, input_size, num_classes, class_names)
    return Inputs(data.x, [f"#{i}" for i in range(len(data))], data.y, str(p))


def check_inputs(guard: LoadedGuard, inputs: Inputs, trigger: Trigger | None = None) -> dict[str, Any]:
    """Runs ``guard`` over ``inputs`` (and, with ``trigger``, over the same inputs stamped with it).

    Returns:
        the check document: ``inputs`` (one row per image: name, label, predicted class, suspicion, flagged),
        ``flagged`` count, ``images``, and with a trigger ``stamped``: how many stamped inputs (not of its
        target, when labels are known) were flagged.
    """
    out = guard.run(inputs.x)
    rows = []
    for i, name in enumerate(inputs.names):
        rows.append({"name": name, "label": int(inputs.y[i]) if inputs.y is not None else None,
                     "predicted": int(out["logits"][i].argmax()), "suspicion": round(float(out["suspicion"][i]), 6),
                     "flagged": bool(out["flagged"][i])})
    doc: dict[str, Any] = {
        "schema": "bdscan.guard-check/1", "guard": guard.path.name, "format": guard.format, "source": inputs.source,
        "threshold": guard.threshold, "fpr_requested": guard.guard.get("fpr_requested"),
        "guarded_from": guard.guard.get("guarded_from"), "images": len(rows),
        "flagged": sum(r["flagged"] for r in rows), "inputs": rows, "stamped": None,
    }
    if trigger is not None:
        x = inputs.x
        if inputs.y is not None and trigger.target is not None and bool((inputs.y != trigger.target).any()):
            x = x[inputs.y != trigger.target]
        st = guard.run(trigger.stamp(x))
        n, k = len(x), int(st["flagged"].sum())
        hits = st["logits"].argmax(1) == trigger.target if trigger.target is not None and n else None
        worked = int(hits.sum()) if hits is not None else 0
        doc["stamped"] = {"trigger": trigger.kind, "target": trigger.target, "images": n, "flagged": k,
                          "rate": round(k / n, 6) if n else None,
                          "attack_success": round(worked / n, 6) if hits is not None else None,
                          "flagged_successful": round(int((hits & st["flagged"]).sum()) / worked, 6) if hits is not None and worked else None}
    return doc


def require_fit(guard: LoadedGuard, trigger: Trigger) -> Trigger:
    """``trigger`` checked against the guard's input size (a trigger for another model is refused)."""
    c, h, w = guard.input_size
    if tuple(trigger.mask.shape[-2:]) != (h, w) or trigger.pattern.shape[-2:] != (h, w):
        raise UsageError(f"the trigger ({tuple(trigger.mask.shape)}) does not fit the guard's {c}x{h}x{w} input",
                         "give the trigger of the guarded model")
    return trigger

