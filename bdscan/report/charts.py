"""Number formatting and inline SVG charts of the HTML report (no JavaScript, no external files)."""

from __future__ import annotations

import math
import re
from typing import Any

from markupsafe import Markup, escape
from scipy import stats

#: JSON has no infinity: the scan document writes an infinite anomaly index (MAD 0) as 1e9
INF_INDEX = 1e9
_DATA_URI = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}$")
#: colours used in charts (also in the legend in the template)
C_BAR, C_FLAG, C_MIN, C_FAIL, C_MED, C_BOUND, C_ORIG = "#4a78a8", "#c0392b", "#e08a1e", "#9a9a9a", "#333333", "#c0392b", "#2e8b57"
MODE_TITLES = {"pixel": "Pixel level", "patch": "Patch level"}


# ---------------------------------------------------------------------------------------------------------------
# small formatting helpers (also registered as jinja filters)


def num(x: Any, nd: int = 2) -> str:
    """A number for people: None -> "—", 1e9 -> "∞", floats to ``nd`` decimals (3 significant digits if tiny)."""
    if x is None or isinstance(x, bool):
        return "—" if x is None else str(x)
    if not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and (math.isinf(x) or x >= INF_INDEX):
        return "∞"
    if isinstance(x, int):
        return f"{x:,}"
    if x != 0 and abs(x) < 10 ** (-nd):
        return f"{x:.3g}"
    return f"{x:,.{nd}f}"


def val(x: Any) -> str:
    """A configuration value: booleans as yes/no, lists comma-separated, None as "—"."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (list, tuple)):
        return ", ".join(val(i) for i in x) if x else "—"
    return str(x)


def pct(x: Any, nd: int = 1) -> str:
    if x is None or not isinstance(x, (int, float)):
        return "—"
    return f"{100 * x:.{nd}f} %"


def safe_image(uri: Any) -> str | None:
    """The URI if it is an inline base64 image, else None (a scan.json is input: never link out from it)."""
    return uri if isinstance(uri, str) and _DATA_URI.match(uri) else None


def dig(d: Any, *keys: Any, default: Any = None) -> Any:
    """Nested ``.get`` that tolerates None and missing keys at any depth."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
        if d is None:
            return default
    return d


def class_label(names: list[str], k: Any) -> str:
    if k is None:
        return "—"
    return f"{names[k]} ({k})" if isinstance(k, int) and 0 <= k < len(names) and names[k] != str(k) else str(k)


# ---------------------------------------------------------------------------------------------------------------
# inline SVG charts


def _nice_step(span: float, n: int = 5) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _ticks(ymax: float, n: int = 5) -> list[float]:
    step = _nice_step(ymax, n)
    return [i * step for i in range(int(ymax / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}"


class _Svg:
    """A minimal SVG writer: every attribute and text is escaped."""

    def __init__(self, width: int, height: int, label: str) -> None:
        self.w, self.h = width, height
        self.parts: list[str] = []
        self.label = label

    def el(self, tag: str, text: str | None = None, **attrs: Any) -> None:
        a = " ".join(f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items() if v is not None)
        if text is None:
            self.parts.append(f"<{tag} {a}/>")
        else:
            self.parts.append(f"<{tag} {a}>{escape(text)}</{tag}>")

    def raw(self, s: str) -> None:
        self.parts.append(s)

    def text(self, x: float, y: float, s: str, size: int = 11, anchor: str = "start", **attrs: Any) -> None:
        self.el("text", s, x=f"{x:.1f}", y=f"{y:.1f}", font_size=size, text_anchor=anchor, **attrs)

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str = "#000", width: float = 1, dash: str | None = None) -> None:
        self.el("line", x1=f"{x1:.1f}", y1=f"{y1:.1f}", x2=f"{x2:.1f}", y2=f"{y2:.1f}", stroke=stroke, stroke_width=width,
                stroke_dasharray=dash)

    def render(self) -> Markup:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.w} {self.h}" width="{self.w}" height="{self.h}" '
                f'role="img" aria-label="{escape(self.label)}" class="chart" font-family="sans-serif">')
        return Markup(head + f"<title>{escape(self.label)}</title>" + "".join(self.parts) + "</svg>")


def _bar_axes(s: _Svg, left: float, top: float, pw: float, ph: float, ymax: float, ylabel: str | None) -> None:
    for t in _ticks(ymax):
        y = top + ph - t / ymax * ph
        s.line(left, y, left + pw, y, "#e4e4e4")
        s.text(left - 4, y + 3.5, _tick_label(t), 10, "end", fill="#555")
    s.line(left, top, left, top + ph, "#888")
    s.line(left, top + ph, left + pw, top + ph, "#888")
    if ylabel:
        s.text(12, top + ph / 2, ylabel, 11, "middle", fill="#333", transform=f"rotate(-90 12 {top + ph / 2:.1f})")


def _x_labels(s: _Svg, labels: list[int], left: float, bw: float, y: float) -> None:
    every = max(1, math.ceil(len(labels) / 40))
    for i, k in enumerate(labels):
        if i % every == 0:
            s.text(left + (i + 0.5) * bw, y, str(k), 10, "middle", fill="#333")


def p_boundary(test: Any, alpha: Any, tests: Any) -> float | None:
    """The size below which a level's smallest trigger is flagged, the other classes as they are: where its
    p-value times ``tests`` (the verdict's correction of that level: levels × Neural Cleanse's factor) reaches
    ``alpha`` (:func:`bdscan.detect.anomaly.min_size_test`). None when the document lacks what it needs."""
    if (not isinstance(test, dict) or not isinstance(alpha, (int, float)) or not isinstance(tests, (int, float))
            or isinstance(tests, bool) or tests < 1):
        return None
    k, mean, sd, df = test.get("classes"), test.get("log_mean"), test.get("log_sd"), test.get("df")
    if not (isinstance(k, int) and k >= 3 and isinstance(df, int) and df >= 1 and all(isinstance(v, (int, float)) for v in (mean, sd))):
        return None
    t_crit = float(stats.t.isf(min(1.0, alpha / (tests * k)), df))
    return math.exp(mean - t_crit * sd * math.sqrt(1 + 1 / (k - 1)))


def norm_chart(mode: str, m: dict[str, Any], names: list[str], true_target: int | None,
               boundary: float | None = None) -> Markup | None:
    """Bar chart of each label's trigger size with the median and the flagging boundary: ``boundary`` (from
    :func:`p_boundary`) when given, else Neural Cleanse's median - threshold·MAD (schema-1 documents). A level with a
    calibrated test gets its null distribution drawn below the bars (:func:`_draw_null`)."""
    labels = [r for r in (m.get("labels") or []) if isinstance(r, dict) and isinstance(r.get("label"), int)]
    if not labels:
        return None
    an = m.get("anomaly") or {}
    norms = [r.get("norm") for r in labels]
    ok = [v for v in norms if isinstance(v, (int, float))]
    med, mad, thr = an.get("median"), an.get("mad"), an.get("threshold")
    if boundary is None:
        boundary = med - thr * mad if all(isinstance(v, (int, float)) for v in (med, mad, thr)) and an.get("conclusive") else None
    ymax = max([*ok, med or 0.0, 1e-9]) * 1.12
    w, h, left, top, bottom = 820, 250, 56, 18, 34
    pw, ph = w - left - 96, h - top - bottom
    stat = m.get("statistic") or ("L1 norm of the pixel mask" if mode == "pixel" else "tokens touched")
    with_null = isinstance(an.get("test"), dict)  # schema 2: the null panel goes below the bars, in the same figure
    s = _Svg(w, h + (150 if with_null else 0), f"{MODE_TITLES.get(mode, mode)}: {stat} per class")
    if with_null:
        _draw_null(s, left, h + 26, pw, 84, m, names, boundary)
    _bar_axes(s, left, top, pw, ph, ymax, stat)
    bw = pw / len(labels)
    flagged = set(an.get("flagged") or [])
    for i, r in enumerate(labels):
        k, v = r["label"], r.get("norm")
        x = left + i * bw + bw * 0.12
        tip = f"{class_label(names, k)}: {num(v)}" + (" (flagged)" if k in flagged else "")
        if not isinstance(v, (int, float)):
            s.text(x + bw * 0.38, top + ph - 4, "✕", 11, "middle", fill=C_FAIL)
            continue
        bh = max(0.5, v / ymax * ph)
        colour = C_FLAG if k in flagged else (C_MIN if k == an.get("min_label") else C_BAR)
        s.raw(f'<rect x="{x:.1f}" y="{top + ph - bh:.1f}" width="{bw * 0.76:.1f}" height="{bh:.1f}" fill="{colour}">'
              f"<title>{escape(tip)}</title></rect>")
        if k == true_target:
            cx = x + bw * 0.38
            ty = top + ph - bh - 3
            s.el("path", d=f"M{cx - 5:.1f} {ty - 8:.1f} L{cx + 5:.1f} {ty - 8:.1f} L{cx:.1f} {ty:.1f} Z", fill=C_ORIG)
    _x_labels(s, [r["label"] for r in labels], left, bw, top + ph + 13)
    s.text(left + pw / 2, h - 4, "class index", 10, "middle", fill="#555")
    y_med = top + ph - med / ymax * ph if isinstance(med, (int, float)) and an.get("conclusive") else None
    y_b = top + ph - boundary / ymax * ph if boundary is not None and boundary > 0 else None
    if y_med is not None:
        s.line(left, y_med, left + pw, y_med, C_MED, 1.2, "6 4")
    if y_b is not None:
        s.line(left, y_b, left + pw, y_b, C_BOUND, 1.2, "2 3")
    # labels in the right margin, pushed apart when the two lines are close
    lx = left + pw + 6
    if y_med is not None:
        ty = y_med + 3 if y_b is None or y_b - y_med >= 22 else y_b - 22 + 3
        s.text(lx, ty - 6, "median", 10, fill=C_MED)
        s.text(lx, ty + 5, num(med), 10, fill=C_MED)
    if y_b is not None:
        ty = y_b + 3 if y_med is None or y_b - y_med >= 22 else max(y_b, y_med + 22) + 3
        s.text(lx, ty - 6, "flag below", 10, fill=C_BOUND)
        s.text(lx, ty + 5, num(boundary), 10, fill=C_BOUND)
    return s.render()


def phase_charts(mode: str, m: dict[str, Any], names: list[str], true_target: int | None) -> list[Markup]:
    """Three small bar charts: each label's smallest trigger size at the end of each third of the run (paper, Fig. 3-5)."""
    labels = [r for r in (m.get("labels") or []) if isinstance(r, dict) and isinstance(r.get("label"), int)]
    nph = max((len(r.get("phases") or []) for r in labels), default=0)
    if not labels or nph == 0:
        return []
    vals = [[dig(r, "phases", p, "norm") for r in labels] for p in range(nph)]
    allv = [v for row in vals for v in row if isinstance(v, (int, float))]
    ymax = max([*allv, 1e-9]) * 1.1
    out = []
    stat = m.get("statistic") or "size"
    for p, row in enumerate(vals):
        w, h, left, top, bottom = 250, 170, 44, 22, 26
        pw, ph = w - left - 8, h - top - bottom
        step = dig(labels[0], "phases", p, "step")
        s = _Svg(w, h, f"{MODE_TITLES.get(mode, mode)}, phase {p + 1}: smallest {stat} per class")
        s.text(left + pw / 2, 13, f"Phase {p + 1}" + (f" (step {step})" if step is not None else ""), 11, "middle",
               font_weight="bold", fill="#222")
        _bar_axes(s, left, top, pw, ph, ymax, None)
        bw = pw / len(labels)
        present = [(v, r["label"]) for v, r in zip(row, labels, strict=True) if isinstance(v, (int, float))]
        best = min(present)[1] if present else None
        for i, (v, r) in enumerate(zip(row, labels, strict=True)):
            x = left + i * bw + bw * 0.12
            if not isinstance(v, (int, float)):
                s.text(x + bw * 0.38, top + ph - 3, "✕", 9, "middle", fill=C_FAIL)
                continue
            bh = max(0.5, v / ymax * ph)
            colour = C_MIN if r["label"] == best else C_BAR
            s.raw(f'<rect x="{x:.1f}" y="{top + ph - bh:.1f}" width="{bw * 0.76:.1f}" height="{bh:.1f}" fill="{colour}">'
                  f"<title>{escape(class_label(names, r['label']))}: {escape(num(v))}</title></rect>")
            if r["label"] == true_target:
                cx, ty = x + bw * 0.38, top + ph - bh - 2
                s.el("path", d=f"M{cx - 4:.1f} {ty - 6:.1f} L{cx + 4:.1f} {ty - 6:.1f} L{cx:.1f} {ty:.1f} Z", fill=C_ORIG)
        _x_labels(s, [r["label"] for r in labels], left, bw, top + ph + 12)
        out.append(s.render())
    return out


def null_chart(mode: str, m: dict[str, Any], names: list[str], boundary: float | None) -> Markup | None:
    """The level's null distribution with the model's smallest trigger on it, as a chart of its own (see :func:`_draw_null`)."""
    s = _Svg(420, 150, f"{MODE_TITLES.get(mode, mode)}: the other classes' log sizes, the null they fit, and the smallest class")
    return s.render() if _draw_null(s, 14, 24, 392, 96, m, names, boundary) else None


def _draw_null(s: _Svg, left: float, top: float, pw: float, ph: float, m: dict[str, Any], names: list[str],
               boundary: float | None) -> bool:
    """Draws, in the box (left, top, pw, ph) of ``s``, every class's size on a log axis (dots), the predictive density
    the other classes' log sizes fit (a Student t, :func:`bdscan.detect.anomaly.min_size_test`), the smallest class
    marked with its p-value, and ``boundary`` (:func:`p_boundary`) as the line left of which it would be flagged.
    Returns False (drawing nothing) when the level has no test."""
    an = m.get("anomaly") or {}
    test = an.get("test")
    sizes = [(r.get("label"), r.get("norm")) for r in m.get("labels") or [] if isinstance(r, dict)]
    sizes = [(k, float(v)) for k, v in sizes if isinstance(k, int) and isinstance(v, (int, float)) and v > 0]
    need = ("log_mean", "log_sd", "df", "classes")
    if not isinstance(test, dict) or len(sizes) < 3 or not all(isinstance(test.get(k), (int, float)) for k in need):
        return False
    mean, sd, df, k = float(test["log_mean"]), float(test["log_sd"]), int(test["df"]), int(test["classes"])
    scale = sd * math.sqrt(1 + 1 / max(1, k - 1))
    logs = [math.log(v) for _, v in sizes]
    lo = min([*logs, mean - 4 * scale] + ([math.log(boundary)] if boundary and boundary > 0 else []))
    hi = max([*logs, mean + 3.5 * scale])
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    dens = [(v, float(stats.t.pdf((v - mean) / scale, df)) / scale) for v in (lo + i * (hi - lo) / 120 for i in range(121))]
    dmax = max(d for _, d in dens) or 1.0
    base = top + ph
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(v):.1f} {base - d / dmax * (ph - 14):.1f}" for i, (v, d) in enumerate(dens))
    s.el("path", d=path, fill="none", stroke=C_BAR, stroke_width=1.5)
    s.line(left, base, left + pw, base, "#888")
    for t in _log_ticks(lo, hi):
        s.line(x(math.log(t)), base, x(math.log(t)), base + 4, "#888")
        s.text(x(math.log(t)), base + 15, _tick_label(t), 9, "middle", fill="#555")
    s.text(left + pw / 2, base + 27, f"{m.get('statistic') or 'size'} (log scale): the other classes' null and the smallest class",
           10, "middle", fill="#555")
    min_label = test.get("min_label")
    c_min = C_FLAG if min_label in (an.get("flagged") or []) else C_MIN  # red only when the verdict's rule flags it, as the bars
    for lab, v in sizes:
        is_min = lab == min_label
        s.raw(f'<circle cx="{x(math.log(v)):.1f}" cy="{base - 6:.1f}" r="{4 if is_min else 2.6}" fill="{c_min if is_min else C_MED}" '
              f'fill-opacity="{1 if is_min else 0.55}"><title>{escape(class_label(names, lab))}: {escape(num(v))}</title></circle>')
    if boundary and boundary > 0:
        bx = x(math.log(boundary))
        s.line(bx, top, bx, base, C_BOUND, 1.2, "2 3")
        s.text(bx + 3, top + 8, f"flag below {num(boundary)}", 9, fill=C_BOUND)
    mx = x(float(test.get("log_min", math.log(min(v for _, v in sizes)))))
    s.text(min(max(mx, left + 40), left + pw - 40), top - 6, f"{class_label(names, min_label)}: p = {pnum(test.get('p_value'))}", 10,
           "middle", fill=c_min)
    return True


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Round sizes (1, 2, 5 × 10^n) between exp(lo) and exp(hi), at most about 7."""
    out = [m * 10.0**e for e in range(math.floor(lo / math.log(10)) - 1, math.ceil(hi / math.log(10)) + 1) for m in (1, 2, 5)]
    out = [t for t in out if lo <= math.log(t) <= hi]
    while len(out) > 7:
        out = out[::2]
    return out


def pnum(p: Any) -> str:
    """A p-value for people: "—" when absent, 2 significant digits, "< 0.0001" below that."""
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        return "—"
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:.2g}"


def layer_chart(series: list[tuple[str, str, dict[str, Any]]]) -> Markup | None:
    """Horizontal grouped bars: per hooked layer, the fraction of its neurons each trigger activates."""
    series = [(n, c, st) for n, c, st in series if st and st.get("layers")]
    if not series:
        return None
    layer_names = [ly.get("name", "?") for ly in series[0][2]["layers"]]
    per = {n: {ly.get("name"): ly.get("fraction") or 0.0 for ly in st["layers"]} for n, _, st in series}
    row = 6 + 9 * len(series)
    longest = max((min(len(n), 30) for n in layer_names), default=4)
    w, left, top = 760, int(min(200, 16 + 6.3 * longest)), 26
    h = top + row * len(layer_names) + 30
    pw = w - left - 60
    xmax = max([v for d in per.values() for v in d.values()] + [0.01]) * 1.1
    s = _Svg(w, h, "Fraction of each layer's neurons activated by each trigger")
    lx = left
    for n, c, _ in series:  # legend
        s.el("rect", x=f"{lx:.1f}", y="6", width="10", height="10", fill=c)
        s.text(lx + 14, 15, n, 10, fill="#222")
        lx += 24 + 6.2 * len(n)
    for i, name in enumerate(layer_names):
        y0 = top + i * row
        short = name if len(name) <= 30 else "…" + name[-29:]
        s.text(left - 6, y0 + row / 2 + 3, short, 10, "end", fill="#333")
        for j, (n, c, _) in enumerate(series):
            v = per[n].get(name, 0.0)
            bw = v / xmax * pw
            s.raw(f'<rect x="{left}" y="{y0 + 3 + j * 9:.1f}" width="{max(0.5, bw):.1f}" height="8" fill="{c}">'
                  f"<title>{escape(name)} — {escape(n)}: {escape(pct(v))}</title></rect>")
            s.text(left + bw + 3, y0 + 10 + j * 9, pct(v), 8, fill="#444")
    base = top + row * len(layer_names)
    s.line(left, top, left, base, "#888")
    for t in _ticks(xmax, 4):
        x = left + t / xmax * pw
        s.line(x, base, x, base + 4, "#888")
        s.text(x, base + 15, f"{100 * t:g} %", 9, "middle", fill="#555")
    return s.render()


# ---------------------------------------------------------------------------------------------------------------
# trigger sizes in words an auditor can picture


def size_words(doc: dict[str, Any], mode: str, label: Any, norm: Any) -> str | None:
    """A trigger's size as area: "about 5 pixels at full strength, 0.5 % of the 32×32 image".

    The pixel level's size is the mask's L1 norm: its total weight, so N is the area of N fully opaque pixels.
    The patch level's is "tokens touched", the sum of a mask with one value per token: on a grid of
    non-overlapping P×P tokens, N tokens is the area of N·P² pixels (0.33 tokens of 4×4 pixels: about 5 pixels).
    On an overlapping tokenizer (CCT) a token's receptive field overlaps its neighbours', so no area is given.
    """
    if not isinstance(norm, (int, float)) or isinstance(norm, bool) or norm >= INF_INDEX:
        return None
    size = dig(doc, "model", "input_size") or []
    h, w = (size[1], size[2]) if len(size) == 3 and all(isinstance(s, int) for s in size) else (None, None)
    pixels: float | None = None
    unit = ""
    m = dig(doc, "modes", mode) or {}
    if mode == "pixel":
        pixels = float(norm)
    elif mode == "patch":
        row = next((r for r in m.get("labels") or [] if isinstance(r, dict) and r.get("label") == label), {})
        params = [p for p in m.get("params") or [] if isinstance(p, dict)]
        param = next((p for p in params if p.get("name") == row.get("param")), params[0] if params else {})
        grid = param.get("grid") or dig(doc, "model", "token_grid") or {}
        stride, foot = grid.get("stride"), grid.get("footprint")
        if not (isinstance(stride, int) and stride == foot and stride > 0):
            return f"{norm:.2f} tokens whose receptive field the mask reaches, weighted by the mask" if foot else None
        pixels = float(norm) * stride * stride
        unit = f"{norm:.2f} of one {stride}×{stride}-pixel token, i.e. "
    if pixels is None:
        return None
    share = f", {pixels / (h * w):.1%} of the {h}×{w} image" if h and w else ""
    return f"{unit}the area of about {pixels:.0f} pixel{'s' if round(pixels) != 1 else ''} at full strength{share}"
