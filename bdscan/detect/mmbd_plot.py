"""MM-BD's picture: every class's maximum margin against the fitted null density, the largest marked.

Drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no global state: a scan may run
detectors in threads) and returned as an image tensor, which the scan folder writes as a PNG.
"""

from __future__ import annotations

import numpy as np
import torch

from bdscan.detect.mmbd_stats import MaxTest


def null_figure(values: np.ndarray, test: MaxTest, names: list[str] | None = None, title: str = "",
                xlabel: str = "maximum logit margin reachable by an input (per class)") -> torch.Tensor:
    """The per-class statistics, the fitted Gamma null and the maximum, as an RGB image.

    Args:
        values: (K,) per-class statistics.
        test: MM-BD's test on them (fitted null, p-values, critical value).
        names: class names, for the label of the maximum.
        title: the figure's title.
        xlabel: what the statistic is.

    Returns:
        (3, H, W) float32 in [0, 1].
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = np.asarray(values, dtype=np.float64)
    others = np.delete(v, test.target)
    fig = Figure(figsize=(7.0, 3.4), dpi=90)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    hi = max(float(v.max()), test.critical if np.isfinite(test.critical) else float(v.max()))
    span = max(hi - float(v.min()), 1e-9)
    # the classes' range with a margin, not the fit's location: a nearly normal fit puts that far below the data
    lo = max(test.loc, float(v.min()) - 0.25 * span)
    xs = np.linspace(lo, hi + 0.08 * span, 400)
    dens = test.pdf(xs)
    dens = np.where(np.isfinite(dens), dens, 0.0)
    mean, sd = test.loc + test.shape * test.scale, float(np.sqrt(test.shape)) * test.scale
    ax.plot(xs, dens, color="tab:blue", lw=1.8, label=f"null: Gamma fitted to the other classes (mean {mean:.3g}, sd {sd:.3g})")
    top = float(dens.max()) if dens.size and dens.max() > 0 else 1.0
    # every other class as a tick on the axis, so the reader sees the sample the null was fitted to
    ax.plot(others, np.full_like(others, -0.04 * top), "|", color="tab:blue", ms=14, mew=1.5,
            label=f"other classes ({len(others)})")
    name = names[test.target] if names and test.target < len(names) else str(test.target)
    colour = "tab:red" if test.p_value < test.alpha else "tab:green"
    ax.axvline(test.top, color=colour, lw=2.2, label=f"max: class {name} ({test.top:.3g}), p = {test.p_value:.2g}")
    if np.isfinite(test.critical):
        ax.axvline(test.critical, color="grey", ls="--", lw=1.2, label=f"flagged above {test.critical:.3g} (p < {test.alpha:g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("null density")
    ax.set_ylim(-0.1 * top, 1.15 * top)
    ax.legend(fontsize=7, loc="best", frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


__all__ = ["null_figure"]
