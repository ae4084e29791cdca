"""Clean sample data: an image folder (one sub-folder per class) or an ``.npz`` with ``x`` and ``y``.

Everything is returned as float images in [0, 1], shape (N, C, H, W), resized to the model's input size,
with labels (N,) checked against the model's classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdscan.errors import DataLoadError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
#: refuse archives/folders larger than this many images (a scan needs a few hundred)
MAX_IMAGES = 200_000


@dataclass(frozen=True)
class CleanData:
    """Clean labelled images.

    Attributes:
        x: (N, C, H, W) float32 in [0, 1].
        y: (N,) int64 class indices.
        source: where they came from (for reports).
    """

    x: torch.Tensor
    y: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, idx: torch.Tensor) -> CleanData:
        return CleanData(self.x[idx], self.y[idx], self.source)


def to_nchw_float(x: np.ndarray, name: str) -> torch.Tensor:
    """Images as stored (uint8 NHWC, float NCHW or NHWC, grey (N, H, W)) -> float (N, C, H, W) in [0, 1].

    Raises:
        DataLoadError: another shape or dtype, or NaN/inf values (``name`` is the file the message names).
    """
    if x.ndim == 3:  # (N, H, W) grey
        x = x[:, None] if x.dtype != np.uint8 else x[..., None]
    if x.ndim != 4:
        raise DataLoadError(f"{name}: images have shape {x.shape}, expected (N, H, W, C) or (N, C, H, W)",
                            "store images as uint8 NHWC or float NCHW")
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):  # float NHWC
            t = t.permute(0, 3, 1, 2)
        if not torch.isfinite(t).all():
            raise DataLoadError(f"{name}: images contain NaN or inf", "clean the data set")
        if t.max() > 1.0 + 1e-6:
            if t.max() <= 255.0 + 1e-3 and t.min() >= 0:
                t = t / 255.0
            else:
                raise DataLoadError(f"{name}: float images outside [0, 1] and [0, 255]", "store raw pixels, not normalised ones")
        if t.min() < -1e-6:
            raise DataLoadError(f"{name}: float images have negative values", "store raw pixels in [0, 1], not normalised ones")
    else:
        raise DataLoadError(f"{name}: images of dtype {x.dtype}", "use uint8 (0-255) or float (0-1) images")
    return t.contiguous()


def fit_channels_and_size(x: torch.Tensor, input_size: tuple[int, int, int], name: str) -> torch.Tensor:
    """Converts (N, c, h, w) images to the model's (C, H, W): grey→RGB, RGBA→RGB, bilinear resize."""
    c = input_size[0]
    if x.shape[1] != c:
        if x.shape[1] == 1:
            log.info("%s: grey images replicated to %d channels", name, c)
            x = x.repeat(1, c, 1, 1)
        elif x.shape[1] == 4 and c == 3:
            x = x[:, :3]
        elif c == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataLoadError(f"{name}: images have {x.shape[1]} channels but the model takes {c}",
                                f"give {c}-channel images")
    if tuple(x.shape[2:]) != tuple(input_size[1:]):
        x = F.interpolate(x, size=input_size[1:], mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x.contiguous()


#: what ``--data`` accepts, for messages
DATA_HINT = "give a folder with one sub-folder of images per class, or an .npz with x (images) and y (labels) saved with numpy.savez"


def _clip(text: str, limit: int = 160) -> str:
    """``text`` on one line, cut at a word boundary with "…" when longer than ``limit``."""
    one = " ".join(text.split())
    if len(one) <= limit:
        return one
    return one[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def _not_an_npz(path: Path) -> DataLoadError | None:
    """A clear error for a file that cannot be an .npz archive (numpy would call a text file "pickled data")."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK") or head.startswith(b"\x93NUMPY"):
        return None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return DataLoadError(f"{path.name}: a single image, not a set of clean images", DATA_HINT)
    try:
        text = head.decode("utf-8")
        is_text = bool(text.strip()) and all(c.isprintable() or c in "\r\n\t" for c in text)
    except UnicodeDecodeError:
        is_text = False
    what = "a text file" if is_text else "not a zip archive, which an .npz is"
    return DataLoadError(f"{path.name}: not clean images: it is {what}", DATA_HINT)


def load_npz(path: Path, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``x``/``y`` (or ``x_<split>``/``y_<split>``, preferring test) without allowing pickles."""
    bad = _not_an_npz(path)
    if bad is not None:
        raise bad
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a single .npy array, not an archive of named arrays
            raise DataLoadError(f"{path.name}: a single numpy array, not an .npz with x and y", DATA_HINT)
        with loaded as d:
            keys = set(d.files)
            for xs, ys in ([(f"x_{split}", f"y_{split}")] if split else []) + [("x", "y"), ("x_test", "y_test"), ("x_train", "y_train")]:
                if xs in keys and ys in keys:
                    return d[xs], d[ys]
    except DataLoadError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError, EOFError, zlib errors
        raise DataLoadError(f"{path.name}: cannot read it as .npz ({type(e).__name__}: {_clip(str(e))})", DATA_HINT) from e
    raise DataLoadError(f"{path.name}: no arrays named x and y (found: {', '.join(sorted(keys)) or 'none'})",
                        "save images as x (uint8 NHWC or float NCHW) and labels as y")


def load_folder(path: Path, class_names: tuple[str, ...]) -> tuple[list[np.ndarray], list[int]]:
    """Reads ``path/<class>/<image>``; a class folder is named by class index or by class name."""
    from PIL import Image, UnidentifiedImageError

    index = {n: i for i, n in enumerate(class_names)}
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not subdirs:
        raise DataLoadError(f"{path}: no class sub-folders", "put images in one sub-folder per class (named by index or name)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for d in subdirs:
        if d.name.isdigit():
            label = int(d.name)
        elif d.name in index:
            label = index[d.name]
        else:
            raise DataLoadError(f"{path}: sub-folder {d.name!r} is neither a class index nor a class name",
                                "name class folders 0, 1, 2, ... or by the model's class names")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    images.append(np.array(im.convert("RGB"), dtype=np.uint8))  # a writable copy (torch.from_numpy)
            except (UnidentifiedImageError, OSError) as e:
                raise DataLoadError(f"{f}: not a readable image", "remove or replace the file") from e
            labels.append(label)
            if len(images) > MAX_IMAGES:
                raise DataLoadError(f"{path}: more than {MAX_IMAGES} images", "give a smaller sample of clean images")
    if not images:
        raise DataLoadError(f"{path}: no images found in its class sub-folders", "add .png/.jpg images")
    return images, labels


def load_clean_data(
    path: str | Path,
    input_size: tuple[int, int, int],
    num_classes: int,
    class_names: tuple[str, ...] = (),
    samples_per_class: int | None = None,
    seed: int = 0,
    split: str | None = None,
) -> CleanData:
    """Loads clean images for a model.

    Args:
        path: an image folder or an ``.npz``.
        input_size: the model's (C, H, W); images are converted and resized to it.
        num_classes: the model's class count; labels outside [0, num_classes) are an error.
        class_names: for folders named by class.
        samples_per_class: keep at most this many per class, chosen with ``seed`` (balanced sampling).
        seed: sampling seed.
        split: for npz archives with ``x_<split>``/``y_<split>`` arrays.

    Returns:
        :class:`CleanData` with x (N, C, H, W) in [0, 1] and y (N,).
    """
    p = Path(path)
    if not p.exists():
        raise DataLoadError(f"{p}: no such file or folder", "give clean images as a folder or an .npz with --data")
    if p.is_dir():
        imgs, labels = load_folder(p, class_names)
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:  # mixed sizes: resize one by one
            x = torch.cat([fit_channels_and_size(to_nchw_float(im[None], p.name), input_size, p.name) for im in imgs])
        else:
            x = fit_channels_and_size(to_nchw_float(np.stack(imgs), p.name), input_size, p.name)
        y = torch.tensor(labels, dtype=torch.long)
    else:
        xa, ya = load_npz(p, split)
        if len(xa) == 0:
            raise DataLoadError(f"{p.name}: contains no images", "give a non-empty sample of clean images")
        if ya.ndim != 1 or len(ya) != len(xa) or not np.issubdtype(ya.dtype, np.integer):
            raise DataLoadError(f"{p.name}: y must be one integer label per image", "store labels as an int array of length N")
        x = fit_channels_and_size(to_nchw_float(xa, p.name), input_size, p.name)
        y = torch.from_numpy(ya.astype(np.int64))
    if len(y) == 0:
        raise DataLoadError(f"{p}: contains no images", "give a non-empty sample of clean images")
    if int(y.min()) < 0:
        raise DataLoadError(f"{p.name}: labels include {int(y.min())}", f"labels are class indices 0..{num_classes - 1}")
    if int(y.max()) >= num_classes:
        raise DataLoadError(
            f"{p.name}: labels go up to {int(y.max())} but the model has {num_classes} classes",
            "use data of the model's own classes, or check --num-classes",
        )
    data = CleanData(x, y, str(p))
    if samples_per_class:
        data = balanced_sample(data, samples_per_class, seed)
    return data


def balanced_sample(data: CleanData, per_class: int, seed: int) -> CleanData:
    """At most ``per_class`` images of each class, drawn with ``seed``; order is by class then draw."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(data.y).tolist():
        idx = (data.y == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return data.subset(torch.cat(keep))
