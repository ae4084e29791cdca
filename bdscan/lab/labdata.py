"""The lab's data: 32×32 ``.npz`` data sets (GTSRB, CIFAR-10 with its extra training file), seeded splits and
training-time augmentation.

The data sets are ``.npz`` archives with uint8 NHWC ``x_train``/``y_train``/``x_test``/``y_test`` and
``class_names`` (optionally ``track_train`` for grouped validation splits, as in GTSRB).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdscan.atomic import atomic_write_with
from bdscan.errors import DataLoadError, UsageError

#: seed of the fixed test subsample (independent of the model's seed, so twins are compared on the same images)
TEST_SUBSAMPLE_SEED = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Data augmentation, applied per batch on [0, 1] tensors.

    Attributes:
        crop_pad: random crop after zero-padding by this many pixels (0 = off).
        hflip: horizontal flips; None = only for data sets where they are label-preserving (CIFAR-10,
            never traffic signs, whose meaning changes when mirrored).
        jitter: brightness/contrast jitter strength (factor drawn in [1 - j, 1 + j]); None = per data set.
    """

    crop_pad: int = 4
    hflip: bool | None = None
    jitter: float | None = None

    def resolved(self, dataset: str) -> AugmentConfig:
        is_cifar = "cifar" in dataset.lower()
        hflip = self.hflip if self.hflip is not None else is_cifar
        jitter = self.jitter if self.jitter is not None else (0.1 if is_cifar else 0.2)
        return replace(self, hflip=hflip, jitter=jitter)


@dataclass(frozen=True)
class LabData:
    """A training data set held in memory: uint8 NCHW tensors, as stored (no normalisation).

    Attributes:
        name: data set name ("gtsrb", "cifar10", ...).
        x_train: (N, C, H, W) uint8.
        y_train: (N,) int64.
        groups: (N,) group ids for grouped validation splits (GTSRB tracks), or None.
        x_test: (M, C, H, W) uint8.
        y_test: (M,) int64.
        class_names: one per class.
        path: the archive.
        train_files: the archives the training split was read from (more than one when a data set's
            training split is stored in parts, as CIFAR-10's: see :func:`extra_train_files`).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    groups: np.ndarray | None
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    path: str = ""
    #: every archive the training images came from (``path`` first, then extra training-only archives)
    train_files: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return max(len(self.class_names), int(self.y_train.max()) + 1)

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @functools.cached_property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training pixels in [0, 1] (the models' input normalisation)."""
        x = self.x_train.float().div_(255.0)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3))
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)

    def test_indices(self, n: int | None) -> torch.Tensor:
        """A fixed (seed :data:`TEST_SUBSAMPLE_SEED`) random subsample of ``n`` test images, or all of them."""
        m = len(self.y_test)
        if not n or n >= m:
            return torch.arange(m)
        g = torch.Generator().manual_seed(TEST_SUBSAMPLE_SEED)
        return torch.randperm(m, generator=g)[:n].sort().values

    def test_set(self, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float in [0, 1], y) of the test subsample."""
        idx = self.test_indices(n)
        return self.x_test[idx].float() / 255.0, self.y_test[idx]


def dataset_name(path: Path) -> str:
    stem = Path(path).stem
    return stem[: -len("_32")] if stem.endswith("_32") else stem


#: suffix of an archive holding more training images of ``<name>_32.npz`` (``x_train``/``y_train`` only)
EXTRA_TRAIN_SUFFIX = "_train_extra_32.npz"


def extra_train_files(path: str | Path) -> list[Path]:
    """The archives that complete ``path``'s training split, e.g. ``cifar10_train_extra_32.npz`` beside
    ``cifar10_32.npz`` (whose ``x_train`` is 10,000 of CIFAR-10's 50,000 training images); empty if none."""
    p = Path(path)
    extra = p.with_name(dataset_name(p) + EXTRA_TRAIN_SUFFIX)
    return [extra] if extra.is_file() and extra.resolve() != p.resolve() else []


def _read_npz(p: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as d:
            missing = [k for k in required if k not in d.files]
            if missing:
                raise DataLoadError(f"{p.name}: missing arrays {', '.join(missing)}",
                                    f"give an .npz with {', '.join(required)} (uint8 NHWC images)")
            return {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataLoadError(f"{p.name}: cannot read it as .npz: {str(e)[:120]}", "give a numpy .npz archive") from e


def _check_images(p: Path, name: str, arr: np.ndarray) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DataLoadError(f"{p.name}: {name} is {arr.dtype} {arr.shape}", "store images as uint8 NHWC")


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime: float, extra: tuple[tuple[str, float], ...] = ()) -> LabData:
    p = Path(path)
    d = _read_npz(p, ("x_train", "y_train", "x_test", "y_test"))
    xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    names = tuple(str(s) for s in d["class_names"]) if "class_names" in d else ()
    groups = d["track_train"].astype(np.int64) if "track_train" in d else None
    for name, arr in (("x_train", xtr), ("x_test", xte)):
        _check_images(p, name, arr)
    if extra:
        xs, ys = [xtr], [ytr]
        for e_path, _ in extra:
            e = Path(e_path)
            ed = _read_npz(e, ("x_train", "y_train"))
            _check_images(e, "x_train", ed["x_train"])
            if ed["x_train"].shape[1:] != xtr.shape[1:]:
                raise DataLoadError(f"{e.name}: images {ed['x_train'].shape[1:]} differ from {p.name}'s {xtr.shape[1:]}",
                                    "give the extra training images of the same data set")
            xs.append(ed["x_train"])
            ys.append(ed["y_train"])
        xtr, ytr = np.concatenate(xs), np.concatenate(ys)
        groups = None  # the parts carry no common track ids: validation splits become random

    def nchw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    y_train = torch.from_numpy(ytr.astype(np.int64))
    if not names:
        names = tuple(str(i) for i in range(int(y_train.max()) + 1))
    files = (str(p), *(e for e, _ in extra))
    return LabData(dataset_name(p), nchw(xtr), y_train, groups, nchw(xte), torch.from_numpy(yte.astype(np.int64)), names,
                   str(p), files)


def load_lab_data(path: str | Path, extra_train: Sequence[str | Path] = ()) -> LabData:
    """Loads (and caches, two archives at most) a training archive; see :class:`LabData`.

    Args:
        path: the archive (``x_train``, ``y_train``, ``x_test``, ``y_test``, optional ``class_names`` and
            ``track_train``).
        extra_train: archives with more training images (``x_train``, ``y_train``) appended to ``path``'s
            training split, e.g. :func:`extra_train_files` for CIFAR-10's complete 50,000-image split.
    """
    p = Path(path)
    for f in (p, *map(Path, extra_train)):
        if not f.is_file():
            raise DataLoadError(f"{f}: no such data file", "give the .npz with x_train/y_train/x_test/y_test")
    extra = tuple((str(Path(e).resolve()), Path(e).stat().st_mtime) for e in extra_train)
    return _load_cached(str(p.resolve()), p.stat().st_mtime, extra)


def split_train_val(data: LabData, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): whole groups (GTSRB tracks) go to validation when groups are known."""
    n = len(data.y_train)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0:
        return torch.from_numpy(rng.permutation(n)), torch.empty(0, dtype=torch.long)
    if data.groups is not None:
        uniq = rng.permutation(np.unique(data.groups))
        counts = {g: c for g, c in zip(*np.unique(data.groups, return_counts=True), strict=True)}
        chosen, total = [], 0
        for g in uniq:
            if total >= val_fraction * n:
                break
            chosen.append(g)
            total += counts[g]
        is_val = np.isin(data.groups, np.array(chosen))
    else:
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.permutation(n)[: round(val_fraction * n)]] = True
    train = rng.permutation(np.flatnonzero(~is_val))  # shuffled, so a max_train prefix covers every class
    return torch.from_numpy(train), torch.from_numpy(np.flatnonzero(is_val))


def augment_batch(x: torch.Tensor, aug: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding, optional horizontal flip and brightness/contrast jitter, per image."""
    n, c, h, w = x.shape
    if aug.crop_pad:
        p = aug.crop_pad
        xp = F.pad(x, (p, p, p, p))
        i = torch.randint(0, 2 * p + 1, (n,), generator=g)
        j = torch.randint(0, 2 * p + 1, (n,), generator=g)
        rows = (i[:, None] + torch.arange(h))[:, None, :, None]
        cols = (j[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if aug.hflip:
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if aug.jitter:
        j = float(aug.jitter)
        b = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * j
        ct = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * j
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * ct + m) * b
        x = x.clamp(0, 1)
    return x


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding ``gtsrb_32.npz`` / ``cifar10_32.npz``: the argument, ``$BDSCAN_DATA_DIR``, or ``shared/data``
    in an ancestor of the working directory or of this package."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("BDSCAN_DATA_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve()):
        for p in (base, *base.parents):
            cand = p / "shared" / "data"
            if cand.is_dir():
                return cand
    raise UsageError("cannot find the training data (shared/data/gtsrb_32.npz)", "pass --data-dir or set BDSCAN_DATA_DIR")


def samples_file_name(dataset: str) -> str:
    """The bundled clean sample set of ``dataset`` (beside the models that name it in their ``samples`` metadata)."""
    return f"{dataset}_samples.npz"


def write_samples(data_npz: Path, out: Path, per_class: int = 20, seed: int = 0) -> Path:
    """A small clean sample set from the test split: ``per_class`` images of each class (``x`` uint8 NHWC,
    ``y`` int64, ``class_names``), drawn with ``seed``."""
    data = load_lab_data(data_npz)
    rng = np.random.default_rng(seed)
    y = data.y_test.numpy()
    keep = []
    for k in range(data.num_classes):
        idx = np.flatnonzero(y == k)
        keep.extend(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()))
    keep_a = np.array(keep, dtype=np.int64)
    x = data.x_test[torch.from_numpy(keep_a)].permute(0, 2, 3, 1).contiguous().numpy()

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, x=x, y=y[keep_a].astype(np.int64), class_names=np.array(data.class_names))

    atomic_write_with(out, writer)
    return out
