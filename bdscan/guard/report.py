"""The guard's report: its own small JSON document (schema ``bdscan.guard/1``) and a self-contained HTML page.

The document holds what the guard measured (:meth:`bdscan.guard.core.GuardResult.to_dict`: threshold,
layer, neurons, split, rates with 95 % intervals, and the test images' suspicion scores), which model and
data it was built from, the machine, and the exported file's check. The HTML page is rendered from the
document alone (``templates/guard.html.j2``, with the scan report's stylesheet): the rates, and histograms of
the clean and triggered test images' suspicion scores with the threshold, drawn as inline SVG. It loads
nothing (no scripts, fonts or URLs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

import bdscan
from bdscan import machine
from bdscan.atomic import atomic_write_text
from bdscan.data import CleanData
from bdscan.guard.core import SCHEMA, GuardResult
from bdscan.io.base import LoadedModel
from bdscan.report.charts import class_label, num, pct
from bdscan.report.html import environment

#: histogram colours: clean, stamped with the guard's trigger, stamped with the original trigger, threshold
C_CLEAN, C_STAMPED, C_ORIGINAL, C_THRESHOLD = "#4a78a8", "#c0392b", "#2e8b57", "#222222"
SERIES = (("clean", "clean test images", C_CLEAN), ("stamped", "stamped with the guard's trigger", C_STAMPED),
          ("original", "stamped with the original trigger", C_ORIGINAL))


def guard_document(result: GuardResult, lm: LoadedModel, data: CleanData, source: dict[str, Any] | None = None,
                   export: dict[str, Any] | None = None) -> dict[str, Any]:
    """The guard document (see the module docstring).

    Args:
        result: the guard.
        lm: the guarded model as loaded.
        data: the clean images the guard was built on (all parts).
        source: where the trigger came from (``trigger_source``, ``scan``...).
        export: the exported file's name and check (None when nothing was written).
    """
    info = lm.wrapper.info
    return {
        "schema": SCHEMA,
        "bdscan": bdscan.__version__,
        "model": {"file": Path(lm.path).name, "sha256": lm.sha256, "format": lm.format, "arch": info.arch,
                  "num_classes": info.num_classes, "class_names": list(info.class_names), "input_size": list(info.input_size),
                  "token_grid": info.token_grid.to_dict() if info.token_grid else None},
        "data": {"source": data.source, "images": len(data)},
        "source": source or {},
        "guard": result.to_dict(),
        "export": export,
        "machine": machine.describe(),
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def write_html(doc: dict[str, Any], path: Path) -> None:
    atomic_write_text(Path(path), render_html(doc))


def render_html(doc: dict[str, Any]) -> str:
    """The self-contained HTML page of a guard document."""
    return environment().get_template("guard.html.j2").render(v=view_model(doc))


# ---------------------------------------------------------------------------------------------- view model


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) else None


def _rate_row(title: str, r: dict[str, Any] | None, goal: str) -> dict[str, Any] | None:
    if not isinstance(r, dict):
        return None
    ci = r.get("ci95") or [None, None]
    return {"title": title, "images": r.get("images"), "flagged": r.get("flagged"), "rate": pct(r.get("rate")),
            "ci": f"{pct(ci[0])} – {pct(ci[1])}" if ci and ci[0] is not None else "—",
            "asr": pct(r.get("attack_success")) if r.get("attack_success") is not None else "—",
            "worked": pct(r.get("flagged_successful")) if r.get("flagged_successful") is not None else "—", "goal": goal}


def view_model(doc: dict[str, Any]) -> dict[str, Any]:
    """The document normalised for the template (missing fields shown as such)."""
    g = doc.get("guard") or {}
    model = doc.get("model") or {}
    names = [str(n) for n in (model.get("class_names") or [])]
    test = g.get("test") or {}
    fpr = _f(g.get("fpr_requested"))
    trig = g.get("trigger") or {}
    orig = g.get("original_trigger")
    rows = [r for r in (
        _rate_row("Clean test images (false positives)", test.get("clean"), f"≤ {pct(fpr)}" if fpr is not None else "—"),
        _rate_row(f"Stamped with the guard's trigger ({trig.get('kind', '?')})", test.get("stamped"), "high"),
        _rate_row(f"Stamped with the original trigger ({(orig or {}).get('kind', '?')})", test.get("stamped_original"), "high"),
    ) if r is not None]
    layer = g.get("layer") or {}
    neurons = g.get("neurons") or {}
    export = doc.get("export")
    return {
        "version": doc.get("bdscan", "?"),
        "title": f"bdscan guard: {model.get('file', 'model')}",
        "model": {"file": model.get("file", "—"), "arch": model.get("arch", "—"), "sha256": model.get("sha256", "—"),
                  "format": model.get("format", "—")},
        "reached": bool(g.get("reached")),
        "reason": g.get("reason"),
        "fpr": pct(fpr),
        "threshold": num(_f(g.get("threshold")), 3),
        "target": class_label(names, trig.get("target")),
        "trigger": {"kind": str(trig.get("kind", "—")), "l1": num(_f(trig.get("l1"))), "mode": str(trig.get("mode") or "—")},
        "original": {"kind": str(orig.get("kind", "—")), "target": class_label(names, orig.get("target"))} if isinstance(orig, dict) else None,
        "rows": rows,
        "split": g.get("split") or {},
        "layer": {"kind": layer.get("kind", "—"), "modules": ", ".join(layer.get("modules") or []) or "—", "width": layer.get("width")},
        "neurons": {"count": neurons.get("count"), "of": neurons.get("of"), "share": pct(_f(neurons.get("share")), 1)},
        "chart": histogram(g.get("scores") or {}, _f(g.get("threshold"))),
        "export": export if isinstance(export, dict) else None,
        "source": [(str(k), "—" if v is None else str(v)) for k, v in (doc.get("source") or {}).items()],
        "data": {"source": (doc.get("data") or {}).get("source", "—"), "images": (doc.get("data") or {}).get("images")},
        "machine": doc.get("machine", "—"),
        "config": [(str(k), v) for k, v in (g.get("config") or {}).items()],
        "seconds": g.get("seconds"),
        "colours": {key: colour for key, _, colour in SERIES} | {"threshold": C_THRESHOLD},
    }


# ---------------------------------------------------------------------------------------------- the histogram


def _nice_step(span: float, n: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) that cuts ``span`` into about ``n`` parts."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def histogram(scores: dict[str, Any], threshold: float | None, bins: int = 30) -> Markup | None:
    """Overlaid histograms of the test images' suspicion per series (share of the series per bin), and the
    threshold as a vertical line; inline SVG."""
    series = [(key, label, colour, [v for v in (scores.get(key) or []) if _f(v) is not None])
              for key, label, colour in SERIES]
    series = [s for s in series if s[3]]
    if not series:
        return None
    vals = [v for s in series for v in s[3]] + ([threshold] if threshold is not None else [])
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.03
    lo, hi = lo - pad, hi + pad
    width = (hi - lo) / bins
    hists = []
    for key, label, colour, vs in series:
        counts = [0] * bins
        for v in vs:
            counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
        hists.append((key, label, colour, [c / len(vs) for c in counts], len(vs)))
    ystep = _nice_step(max(max(h[3]) for h in hists) * 1.05, 5)
    ymax = ystep * math.ceil(max(max(h[3]) for h in hists) * 1.05 / ystep)
    w, h, left, top, bottom = 820, 260, 56, 16, 40
    pw, ph = w - left - 16, h - top - bottom
    parts: list[str] = []

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    for i in range(round(ymax / ystep) + 1):
        y = top + ph - i * ystep / ymax * ph
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end" fill="#555">{100 * i * ystep:g} %</text>')
    xstep = _nice_step(hi - lo, 8)
    v = math.ceil(lo / xstep) * xstep
    while v <= hi:
        label = f"{v:.10g}" if abs(v) > xstep * 1e-6 else "0"
        parts.append(f'<line x1="{x_of(v):.1f}" y1="{top + ph}" x2="{x_of(v):.1f}" y2="{top + ph + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x_of(v):.1f}" y="{top + ph + 15:.1f}" font-size="10" text-anchor="middle" fill="#555">{escape(label)}</text>')
        v += xstep
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>')
    for _key, label, colour, shares, n in hists:
        for b, share in enumerate(shares):
            if share <= 0:
                continue
            bh = share / ymax * ph
            x0 = x_of(lo + b * width)
            parts.append(f'<rect x="{x0:.1f}" y="{top + ph - bh:.1f}" width="{pw / bins:.1f}" height="{bh:.1f}" fill="{colour}" '
                         f'fill-opacity="0.45" stroke="{colour}" stroke-width="0.8"><title>{escape(label)}: {100 * share:.1f} % of {n} '
                         f'in [{lo + b * width:.3g}, {lo + (b + 1) * width:.3g})</title></rect>')
    if threshold is not None:
        tx = x_of(threshold)
        parts.append(f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{top + ph}" stroke="{C_THRESHOLD}" stroke-width="1.6" '
                     'stroke-dasharray="6 3"/>')
        anchor = "end" if tx > left + pw * 0.8 else "start"
        dx = -4 if anchor == "end" else 4
        parts.append(f'<text x="{tx + dx:.1f}" y="{top + 10}" font-size="11" text-anchor="{anchor}" fill="{C_THRESHOLD}">'
                     f'threshold {escape(f"{threshold:.3g}")}: flagged above</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" font-size="11" text-anchor="middle" fill="#333">suspicion score</text>')
    label = "Suspicion scores of the test images: clean against triggered, with the threshold"
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="{escape(label)}" class="chart" font-family="sans-serif"><title>{escape(label)}</title>')
    return Markup(head + "".join(parts) + "</svg>")
