"""The HTML report: one self-contained file rendered from the scan document (schema ``bdscan.scan/1``).

Everything the page shows comes from the document: images are the ``data:`` URIs it already holds, charts
are inline SVG drawn here, the stylesheet is inline. The page loads nothing (no scripts, fonts, stylesheets
or URLs), so it can be opened offline, attached to a ticket or printed; a print stylesheet keeps figures
whole and colours exact. Missing or ``None`` fields (one mode only, no original trigger, no repair, an
inconclusive verdict) are shown as such rather than failing.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

#: the folder of report templates, shipped inside the package (``bdscan/templates`` -> ``templates/``)
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
#: JSON has no infinity: the scan document writes an infinite anomaly index (MAD 0) as 1e9
INF_INDEX = 1e9
_DATA_URI = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}$")

STATUS = {
    "backdoor": ("Backdoor suspected", "bad"),
    "clean": ("No backdoor found", "good"),
    "inconclusive": ("Inconclusive", "warn"),
    "unsafe": ("Unsafe file: not scanned", "bad"),
}
MODE_TITLES = {"pixel": "Pixel level", "patch": "Patch level"}
#: colours used in charts (also in the legend in the template)
C_BAR, C_FLAG, C_MIN, C_FAIL, C_MED, C_BOUND, C_ORIG = "#4a78a8", "#c0392b", "#e08a1e", "#9a9a9a", "#333333", "#c0392b", "#2e8b57"


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


def _g(d: Any, *keys: Any, default: Any = None) -> Any:
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


def _name(names: list[str], k: Any) -> str:
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


def norm_chart(mode: str, m: dict[str, Any], names: list[str], true_target: int | None) -> Markup | None:
    """Bar chart of each label's trigger size with the median and the flagging boundary (median - threshold·MAD)."""
    labels = [r for r in (m.get("labels") or []) if isinstance(r, dict) and isinstance(r.get("label"), int)]
    if not labels:
        return None
    an = m.get("anomaly") or {}
    norms = [r.get("norm") for r in labels]
    ok = [v for v in norms if isinstance(v, (int, float))]
    med, mad, thr = an.get("median"), an.get("mad"), an.get("threshold")
    boundary = med - thr * mad if all(isinstance(v, (int, float)) for v in (med, mad, thr)) and an.get("conclusive") else None
    ymax = max([*ok, med or 0.0, 1e-9]) * 1.12
    w, h, left, top, bottom = 820, 250, 56, 18, 34
    pw, ph = w - left - 96, h - top - bottom
    stat = m.get("statistic") or ("L1 norm of the pixel mask" if mode == "pixel" else "tokens touched")
    s = _Svg(w, h, f"{MODE_TITLES.get(mode, mode)}: {stat} per class")
    _bar_axes(s, left, top, pw, ph, ymax, stat)
    bw = pw / len(labels)
    flagged = set(an.get("flagged") or [])
    for i, r in enumerate(labels):
        k, v = r["label"], r.get("norm")
        x = left + i * bw + bw * 0.12
        tip = f"{_name(names, k)}: {num(v)}" + (" (flagged)" if k in flagged else "")
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
    vals = [[_g(r, "phases", p, "norm") for r in labels] for p in range(nph)]
    allv = [v for row in vals for v in row if isinstance(v, (int, float))]
    ymax = max([*allv, 1e-9]) * 1.1
    out = []
    stat = m.get("statistic") or "size"
    for p, row in enumerate(vals):
        w, h, left, top, bottom = 250, 170, 44, 22, 26
        pw, ph = w - left - 8, h - top - bottom
        step = _g(labels[0], "phases", p, "step")
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
                  f"<title>{escape(_name(names, r['label']))}: {escape(num(v))}</title></rect>")
            if r["label"] == true_target:
                cx, ty = x + bw * 0.38, top + ph - bh - 2
                s.el("path", d=f"M{cx - 4:.1f} {ty - 6:.1f} L{cx + 4:.1f} {ty - 6:.1f} L{cx:.1f} {ty:.1f} Z", fill=C_ORIG)
        _x_labels(s, [r["label"] for r in labels], left, bw, top + ph + 12)
        out.append(s.render())
    return out


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
# the view model: the document normalised so the template never meets a missing key


def _verdict(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    v = doc.get("verdict") or {}
    status = v.get("status") if v.get("status") in STATUS else "inconclusive"
    title, tone = STATUS[status]
    target = v.get("target")
    model_file = _g(doc, "model", "file", default="MODEL")
    data_src = _g(doc, "data", "source", default="") or "DATA"
    if not re.match(r"^[\w./:\\ -]+$", data_src):
        data_src = "DATA"
    thr = v.get("threshold", _g(doc, "config", "threshold"))
    if status == "backdoor":
        meaning = (f"Images of any class can be sent to {_name(names, target)} with a trigger far smaller than any other "
                   f"class needs: the signature of a planted backdoor that sends triggered inputs to that class.")
        todo = [("Do not deploy this model.", None),
                ("Remove the backdoor by unlearning the reversed trigger, then scan the repaired model again:",
                 f"bdscan repair {model_file} --data {data_src}"),
                ("Or retrain from data you trust, and find out where this checkpoint came from.", None)]
    elif status == "clean":
        meaning = ("No class can be reached with an abnormally small trigger: this scan found no evidence of a backdoor "
                   "of the kinds it looks for.")
        todo = [("Clean means no small, image-independent patch or pixel trigger was found for any class within this "
                 "budget. It does not prove the model is backdoor-free: large or image-wide triggers (blending, filters), "
                 "input-specific triggers and backdoors spread over several target classes can evade Neural Cleanse.", None),
                ("For a stronger check, scan again with a larger budget and more clean images per class.", None)]
    elif status == "unsafe":
        meaning = ("The file was refused before any scan: its pickle data imports functions that run code when it is "
                   "loaded, so bdscan did not load it and could not look for a backdoor.")
        todo = [("Do not load this file with torch.load or pickle outside a sandbox.", None),
                ("Obtain the weights as safetensors or ONNX (or convert them in an isolated environment) and scan that "
                 "file; check where this one came from.", None)]
    else:
        meaning = ("The scan cannot judge this model: too few classes could be reached by any trigger to tell an "
                   "outlier from normal variation.")
        todo = [("Scan again with a larger budget (more optimisation steps) and more clean images of every class; check "
                 "that the data matches the model's classes and input preprocessing.", None)]
    per_mode = []
    for mode, m in (doc.get("modes") or {}).items():
        an = (m or {}).get("anomaly") or {}
        per_mode.append({
            "mode": mode, "title": MODE_TITLES.get(mode, mode), "index": an.get("anomaly_index"),
            "min_label": _name(names, an.get("min_label")) if an.get("min_label") is not None else "—",
            "flagged": [_name(names, k) for k in an.get("flagged") or []], "conclusive": an.get("conclusive", True),
            "failed": len(an.get("failed") or []), "over": (an.get("anomaly_index") or 0) > (thr or 2.0),
            "statistic": (m or {}).get("statistic") or "",
        })
    true_t = v.get("true_target")
    truth = None
    if true_t is not None:
        if status == "backdoor" and true_t == target:
            truth = ("good", f"This lab model was poisoned towards {_name(names, true_t)}: the scan named the right class.")
        elif status == "backdoor":
            truth = ("bad", f"This lab model was poisoned towards {_name(names, true_t)}: the scan named a different class.")
        else:
            truth = ("bad", f"This lab model was poisoned towards {_name(names, true_t)}, but the scan did not flag it.")
    pickle = _g(doc, "model", "pickle_scan")
    return {"status": status, "title": title, "tone": tone, "target": target,
            "target_name": v.get("target_name") or (names[target] if isinstance(target, int) and target < len(names) else None),
            "anomaly_index": v.get("anomaly_index"), "basis": v.get("basis"), "agree": v.get("modes_agree"),
            "threshold": thr, "reason": v.get("reason") or "", "meaning": meaning, "todo": todo, "modes": per_mode,
            "truth": truth, "unsafe_pickle": bool(pickle and pickle.get("dangerous"))}


def _model(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    m = doc.get("model") or {}
    tg = m.get("token_grid")
    if tg:
        grid = tg.get("grid") or ["?", "?"]
        token = (f"{grid[0]}×{grid[1]} tokens, stride {tg.get('stride')} px, footprint {tg.get('footprint')} px, "
                 f"offset {tg.get('offset', 0)}")
        token_src = tg.get("source") or "not recorded"
    elif not doc.get("modes"):
        token, token_src = "—", "—"
    else:
        sizes = _g(doc, "config", "cnn_patch_sizes") or []
        token = "none (no patch embedding: a CNN)"
        shifted = " (each also shifted by half a patch)" if _g(doc, "config", "cnn_patch_offsets") is not False else ""
        token_src = ("patch mode swept square grids of " + ", ".join(f"{s} px" for s in sizes) + shifted) if sizes else "—"
    ps = m.get("pickle_scan")
    fmt = m.get("format") or "?"
    if ps is None:
        pickle = {"state": "na", "text": f"not applicable: {fmt} files hold no pickled code" if fmt in ("safetensors", "onnx")
                  else "not run for this format", "findings": []}
    else:
        state = "bad" if ps.get("dangerous") else "good"
        text = f"{ps.get('scanner', 'scanner')}: {ps.get('scanned_files', 0)} file(s) scanned, "
        text += f"{len(ps.get('findings') or [])} finding(s)" + (f"; error: {ps['error']}" if ps.get("error") else "")
        pickle = {"state": state, "text": text, "findings": ps.get("findings") or []}
    size = m.get("input_size") or []
    shown = names[:24]
    classes = ", ".join(f"{i}: {n}" for i, n in enumerate(shown)) + (f", … and {len(names) - 24} more" if len(names) > 24 else "")
    meta = m.get("metadata") or {}
    return {"file": m.get("file") or "—", "sha256": m.get("sha256") or "—", "format": fmt, "arch": m.get("arch") or "—",
            "num_classes": m.get("num_classes", len(names)), "classes": classes,
            "input_size": "×".join(str(s) for s in size) if size else "—",
            "preprocessing": f"× {m.get('scale', 1)}, mean {m.get('mean')}, std {m.get('std')}" if m.get("mean") is not None else "—",
            "output": m.get("output") or "—", "parameters": m.get("parameters"), "token": token, "token_src": token_src,
            "pickle": pickle, "notes": m.get("notes") or [],
            "metadata": json.dumps(meta, indent=1, sort_keys=True, default=str)[:4000] if meta else None}


def _original(doc: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    o = _g(doc, "model", "original_trigger")
    if not o:
        return None
    imgs = o.get("images") or {}
    return {"attack": o.get("attack") or "?", "target": _name(names, o.get("target")), "l1": o.get("l1"),
            "images": [(IMAGE_CAPTIONS[k], safe_image(imgs.get(k))) for k in ("mask", "pattern", "product") if safe_image(imgs.get(k))],
            "params": ", ".join(f"{k}={v}" for k, v in (o.get("params") or {}).items() if k not in ("attack", "target"))}


IMAGE_CAPTIONS = {"mask": "mask", "pattern": "pattern", "product": "mask×pattern", "stamped": "stamped"}


def _modes(doc: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    out = []
    true_t = _g(doc, "verdict", "true_target")
    for mode, m in (doc.get("modes") or {}).items():
        m = m or {}
        an = m.get("anomaly") or {}
        stat = m.get("statistic") or ""
        trig = []
        for t in m.get("triggers") or []:
            imgs = t.get("images") or {}
            trig.append({"rank": t.get("rank"), "label": _name(names, t.get("label")), "norm": t.get("norm"),
                         "flagged": t.get("label") in (an.get("flagged") or []), "true": t.get("label") == true_t and true_t is not None,
                         "distance": t.get("distance_to_original"),
                         "images": [(IMAGE_CAPTIONS[k], safe_image(imgs.get(k))) for k in IMAGE_CAPTIONS if safe_image(imgs.get(k))]})
        labels = [r for r in m.get("labels") or [] if isinstance(r, dict)]
        failed = [_name(names, k) for k in an.get("failed") or []]
        med, mad, thr = an.get("median"), an.get("mad"), an.get("threshold")
        boundary = med - thr * mad if all(isinstance(x, (int, float)) for x in (med, mad, thr)) else None
        phase_rows = []
        nph = max((len(r.get("phases") or []) for r in labels), default=0)
        for p in range(nph):
            present = [(_g(r, "phases", p, "norm"), r.get("label")) for r in labels if isinstance(_g(r, "phases", p, "norm"), (int, float))]
            best = min(present) if present else None
            trow = next((r for r in labels if r.get("label") == true_t), None) if true_t is not None else None
            tnorm = _g(trow, "phases", p, "norm") if trow else None
            rank = (1 + sum(1 for v, _ in present if v < tnorm)) if isinstance(tnorm, (int, float)) else None
            phase_rows.append({"phase": p + 1, "step": _g(labels[0], "phases", p, "step") if labels else None,
                               "reached": len(present), "total": len(labels),
                               "best": _name(names, best[1]) if best else "—", "best_norm": best[0] if best else None,
                               "true_rank": rank})
        out.append({
            "mode": mode, "title": MODE_TITLES.get(mode, mode), "statistic": stat, "anomaly": an,
            "params": ", ".join(str(p.get("name")) for p in m.get("params") or [] if isinstance(p, dict)),
            "boundary": boundary, "failed": failed, "triggers": trig,
            "chart": norm_chart(mode, m, names, true_t), "phase_charts": phase_charts(mode, m, names, true_t),
            "phase_rows": phase_rows,
            "labels": [{"label": _name(names, r.get("label")), "norm": r.get("norm"), "index": r.get("anomaly_index"),
                        "flagged": r.get("flagged"), "succeeded": r.get("succeeded", r.get("norm") is not None),
                        "steps": r.get("steps"), "success_rate": r.get("success_rate"), "param": r.get("param")} for r in labels],
        })
    return out


SERIES_COLOURS = {"original": C_ORIG, "pixel": "#4a78a8", "patch": "#8e44ad"}


def _activations(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    a = doc.get("activations")
    if not a:
        return {"state": "absent"}
    if not a.get("computed", True):
        return {"state": "failed", "reason": a.get("reason") or "unknown reason"}
    rows, series, tops = [], [], []
    orig = a.get("original")
    if orig:
        rows.append({"trigger": "original (" + str(orig.get("trigger")) + ")", "label": _name(names, orig.get("target")),
                     "neurons": orig.get("neurons"), "activated": orig.get("activated"), "fraction": orig.get("fraction")})
        series.append(("original", C_ORIG, orig))
        tops.append(("Original trigger", orig.get("top") or []))
    prec = []
    ks: list[tuple[int, int, bool]] = []
    for mode, e in (a.get("modes") or {}).items():
        st = (e or {}).get("reversed")
        if not st:
            rows.append({"trigger": f"reversed, {mode}", "label": "—", "neurons": None, "activated": None, "fraction": None,
                         "note": (e or {}).get("label_basis")})
            continue
        rows.append({"trigger": f"reversed, {mode}", "label": _name(names, e.get("label")) + f" ({e.get('label_basis')})",
                     "neurons": st.get("neurons"), "activated": st.get("activated"), "fraction": st.get("fraction")})
        series.append((f"reversed {mode}", SERIES_COLOURS.get(mode, "#777"), st))
        tops.append((f"Reversed trigger, {mode} level", st.get("top") or []))
        pk = e.get("precision_at_k")
        if pk:
            for ph in pk.get("phases") or []:
                prec.append({"mode": mode, "when": f"phase {ph.get('phase')} (step {ph.get('step')})",
                             "values": {p["k"]: p.get("precision") for p in ph.get("precision") or []}, "reason": ph.get("reason")})
            prec.append({"mode": mode, "when": "final trigger", "values": {p["k"]: p.get("precision") for p in pk.get("final") or []},
                         "reason": None})
            if not ks:
                ks = [(p["k"], p.get("k_used", p["k"]), bool(p.get("capped"))) for p in pk.get("final") or []]
    return {"state": "ok", "method": a.get("method") or {}, "images": a.get("images"), "neurons": a.get("neurons"),
            "layers": a.get("layers"), "rows": rows, "chart": layer_chart(series), "tops": tops, "prec": prec, "ks": ks,
            "any_capped": any(c for _, _, c in ks)}


REPAIR_LABELS = {
    "clean_accuracy": "Clean accuracy",
    "accuracy": "Clean accuracy",
    "asr_reversed": "Attack success, reversed trigger",
    "attack_success_reversed": "Attack success, reversed trigger",
    "asr_original": "Attack success, original trigger",
    "attack_success_original": "Attack success, original trigger",
}


def _metric(key: str, v: Any) -> str:
    if isinstance(v, float) and 0 <= v <= 1 and any(s in key for s in ("acc", "asr", "success", "rate")):
        return pct(v)
    return num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("—" if v is None else str(v))


def _repair(doc: dict[str, Any]) -> dict[str, Any] | None:
    r = doc.get("repair")
    if not r or not isinstance(r, dict):
        return None
    before, after = r.get("before") or {}, r.get("after") or {}
    keys = [k for k in REPAIR_LABELS if k in before or k in after]
    keys += [k for k in dict.fromkeys([*before, *after]) if k not in keys and not isinstance(before.get(k, after.get(k)), (dict, list))]
    seen: set[str] = set()
    table = []
    for k in keys:
        label = REPAIR_LABELS.get(k, k.replace("_", " ").capitalize())
        if label in seen:  # two spellings of the same metric: the first wins
            continue
        seen.add(label)
        table.append({"metric": label, "before": _metric(k, before.get(k)), "after": _metric(k, after.get(k))})
    other = [(k.replace("_", " ").capitalize(), v if not isinstance(v, (dict, list)) else json.dumps(v, default=str))
             for k, v in r.items() if k not in ("before", "after")]
    return {"table": table, "other": [(k, _metric(k.lower(), v) if not isinstance(v, str) else v) for k, v in other]}


def _config(doc: dict[str, Any]) -> dict[str, Any]:
    cfg = doc.get("config") or {}
    data = doc.get("data") or {}
    basics = [("Seed", doc.get("seed")), ("Budget", cfg.get("budget")), ("Modes", ", ".join(cfg.get("modes") or [])),
              ("Anomaly threshold", cfg.get("threshold")),
              ("Labels scanned", "all" if cfg.get("labels") is None else ", ".join(map(str, cfg["labels"]))),
              ("Device", cfg.get("device")), ("Inversions at once", cfg.get("workers")),
              ("CNN patch grid sizes", ", ".join(map(str, cfg.get("cnn_patch_sizes") or []))),
              ("Clean data", data.get("source")), ("Clean images", data.get("images")),
              ("Images used for inversion", data.get("samples_used")), ("Schema", doc.get("schema"))]
    return {"basics": [(k, val(v) if v != "" else "—") for k, v in basics],
            "inversion": list((cfg.get("inversion") or {}).items()),
            "versions": list((doc.get("versions") or {}).items()),
            "timings": list((doc.get("timings") or {}).items()),
            "json": json.dumps(cfg, indent=2, sort_keys=True, default=str)}


def view_model(doc: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, with every field present (None or empty where the document lacks it)."""
    if not isinstance(doc, dict):
        raise TypeError("the scan document must be a JSON object")
    m = doc.get("model") or {}
    n = m.get("num_classes") or 0
    names = [str(x) for x in (m.get("class_names") or [])]
    names += [str(i) for i in range(len(names), n)]
    return {
        "title": f"bdscan report: {m.get('file') or 'model'}",
        "verdict": _verdict(doc, names),
        "model": _model(doc, names),
        "original": _original(doc, names),
        "modes": _modes(doc, names),
        "activations": _activations(doc, names),
        "repair": _repair(doc),
        "config": _config(doc),
        "version": _g(doc, "versions", "bdscan", default="?"),
        "schema": doc.get("schema") or "?",
        "colours": {"bar": C_BAR, "flag": C_FLAG, "min": C_MIN, "fail": C_FAIL, "orig": C_ORIG},
    }


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = num
    env.filters["pct"] = pct
    env.filters["val"] = val
    return env


def render_html(doc: dict[str, Any]) -> str:
    """The self-contained HTML report of a scan document (schema ``bdscan.scan/1``)."""
    return environment().get_template("report.html.j2").render(v=view_model(doc))


def render_report_from_dir(scan_dir: str | Path) -> str:
    """Renders ``scan_dir/scan.json`` (a folder written by :func:`bdscan.report.outdir.write_scan_dir`)."""
    path = Path(scan_dir) / "scan.json"
    with open(path, encoding="utf-8") as f:
        return render_html(json.load(f))
