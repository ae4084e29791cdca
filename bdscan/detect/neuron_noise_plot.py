"""Neuron noise's picture: the share of the other classes' images the noisy model sent to each class, the suspected
class marked, with the share that would have been flagged.

Drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no global state: a scan may run
detectors in threads) and returned as an image tensor, which the scan folder writes as a PNG.
"""

from __future__ import annotations

import numpy as np
import torch


def inflow_figure(shares: np.ndarray, suspect: int, p_value: float, critical: float, alpha: float,
                  names: list[str] | None = None, eps: float = 0.1) -> torch.Tensor:
    """One bar per class, as an RGB image.

    Args:
        shares: (K,) per class, the share of the readout images of other classes predicted as it under the noise.
        suspect: the class with the largest inflow (the test's suspect).
        p_value: the test's calibrated p-value.
        critical: the suspect's share that would give p = ``alpha`` (the dashed line).
        alpha: the detector's level.
        names: class names, for the suspect's label.
        eps: the noise's bound, for the title.

    Returns:
        (3, H, W) float32 in [0, 1].
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = np.asarray(shares, dtype=np.float64)
    k = len(v)
    fig = Figure(figsize=(7.0, 3.2), dpi=90)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    flagged = p_value <= alpha
    colours = ["tab:blue"] * k
    colours[suspect] = "tab:red" if flagged else "tab:green"
    ax.bar(np.arange(k), v, color=colours, width=0.8)
    name = names[suspect] if names and suspect < len(names) else str(suspect)
    ax.plot([], [], "s", color=colours[suspect], label=f"class {name}: {v[suspect]:.0%}, p = {p_value:.2g}")
    if 0 < critical < 1:
        ax.axhline(critical, color="grey", ls="--", lw=1.2, label=f"flagged at {critical:.0%} or more (p ≤ {alpha:g})")
    elif critical >= 1:  # the other classes' shares spread so widely that no share would stand out
        ax.plot([], [], ls="--", color="grey", label=f"no share up to 100 % would be flagged here (p ≤ {alpha:g})")
    ax.set_xlabel("class")
    ax.set_ylabel("share of other classes' images")
    ax.set_ylim(0, max(1e-3, float(v.max()), critical if 0 < critical < 1 else 0.0) * 1.15)
    if k <= 20:
        ax.set_xticks(np.arange(k))
    ax.legend(fontsize=7, loc="best", frameon=False)
    ax.set_title(f"Neuron noise (≤ {eps:g} on every normalisation layer): where the errors went", fontsize=9)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


__all__ = ["inflow_figure"]
