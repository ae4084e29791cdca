"""Synthetic tiny data for the lab's tests: 4 classes told apart by a class-dependent colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: class colours (RGB in [0, 1]); images are a noisy tint of their class colour
COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9], [0.8, 0.8, 0.2]], dtype=np.float32)


def make_synthetic(path: Path, n_train: int = 320, n_test: int = 160, size: int = 16, seed: int = 0,
                   groups: bool = False) -> Path:
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % len(COLOURS)
        x = COLOURS[y][:, None, None, :] * 0.7 + rng.uniform(0, 0.3, size=(n, size, size, 3)).astype(np.float32)
        return (x.clip(0, 1) * 255).astype(np.uint8), y.astype(np.int64)

    xtr, ytr = images(n_train)
    xte, yte = images(n_test)
    arrays = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
              "class_names": np.array(["red", "green", "blue", "yellow"])}
    if groups:
        arrays["track_train"] = (ytr * 1000 + (np.arange(n_train) // 8)).astype(np.int32)
    np.savez_compressed(path, **arrays)
    return path
