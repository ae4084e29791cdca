"""The HTML report: one self-contained file rendered from the scan document (schema ``bdscan.scan/3``, and
schema-1 documents of older scan folders: what they lack, the p-values, is shown as absent).

Everything the page shows comes from the document: images are the ``data:`` URIs it already holds, charts
are inline SVG drawn here, the stylesheet is inline. The page loads nothing (no scripts, fonts, stylesheets
or URLs), so it can be opened offline, attached to a ticket or printed; a print stylesheet keeps figures
whole and colours exact. Missing or ``None`` fields (one mode only, no original trigger, no repair, an
inconclusive verdict) are shown as such rather than failing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from bdscan.detect.base import detectors_in
from bdscan.report.charts import (
    C_BAR,
    C_FAIL,
    C_FLAG,
    C_MIN,
    C_ORIG,
    MODE_TITLES,
    class_label,
    dig,
    layer_chart,
    norm_chart,
    null_chart,
    num,
    p_boundary,
    pct,
    phase_charts,
    pnum,
    safe_image,
    size_words,
    val,
)
from bdscan.report.repair_page import repair_view
from bdscan.report.suggest import repair_command, rescan_command

#: the folder of report templates, shipped inside the package (``bdscan/templates`` -> ``templates/``)
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

STATUS = {
    "backdoor": ("Backdoor suspected", "bad"),
    "clean": ("No backdoor found", "good"),
    "inconclusive": ("Inconclusive", "warn"),
    "unsafe": ("Unsafe file: not scanned", "bad"),
}


# ---------------------------------------------------------------------------------------------------------------
# the view model: the document normalised so the template never meets a missing key


def _verdict(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    v = doc.get("verdict") or {}
    status = v.get("status") if v.get("status") in STATUS else "inconclusive"
    title, tone = STATUS[status]
    target = v.get("target")
    thr = v.get("threshold", dig(doc, "config", "threshold"))
    decider = dig(v, "decided_by", "detector") or v.get("detector")
    if status == "backdoor":
        meaning = (f"Images of any class can be sent to {class_label(names, target)} with a trigger far smaller than any other "
                   f"class needs: the signature of a planted backdoor that sends triggered inputs to that class."
                   if decider in (None, "neural-cleanse") else
                   f"The {decider} detector found evidence, stronger than clean models show, of a planted backdoor that "
                   f"sends triggered inputs to {class_label(names, target)} (see Detectors below).")
        todo = [("Do not deploy this model.", None), *_repair_todo(doc),
                ("Or retrain from data you trust, and find out where this checkpoint came from.", None)]
    elif status == "clean":
        meaning = ("No class can be reached with an abnormally small trigger, and no other detector that ran found strong "
                   "enough evidence: this scan found no evidence of a backdoor of the kinds it looks for.")
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
    calibrated = "rule" in v  # schema 2: the verdict rests on p-values
    per_mode = []
    for mode, m in (doc.get("modes") or {}).items():
        an = (m or {}).get("anomaly") or {}
        per_mode.append({
            "mode": mode, "title": MODE_TITLES.get(mode, mode), "index": an.get("anomaly_index"), "p": an.get("p_value"),
            "min_label": class_label(names, an.get("min_label")) if an.get("min_label") is not None else "—",
            "flagged": [class_label(names, k) for k in an.get("flagged") or []], "conclusive": an.get("conclusive", True),
            "failed": len(an.get("failed") or []),
            "over": bool(an.get("flagged")) if calibrated else (an.get("anomaly_index") or 0) > (thr or 2.0),
            "statistic": (m or {}).get("statistic") or "", "t": dig(an, "test", "t"), "classes": dig(an, "test", "classes"),
            "min_words": size_words(doc, mode, an.get("min_label"), an.get("min_norm")),
        })
    true_t = v.get("true_target")
    truth = None
    if true_t is not None:
        if status == "backdoor" and true_t == target:
            truth = ("good", f"This lab model was poisoned towards {class_label(names, true_t)}: the scan named the right class.")
        elif status == "backdoor":
            truth = ("bad", f"This lab model was poisoned towards {class_label(names, true_t)}: the scan named a different class.")
        else:
            truth = ("bad", f"This lab model was poisoned towards {class_label(names, true_t)}, but the scan did not flag it.")
    pickle = dig(doc, "model", "pickle_scan")
    return {"status": status, "title": title, "tone": tone, "target": target, "look": _look_words(doc),
            "target_name": v.get("target_name") or (names[target] if isinstance(target, int) and target < len(names) else None),
            "anomaly_index": v.get("anomaly_index"), "basis": v.get("basis"), "agree": v.get("modes_agree"),
            "threshold": thr, "reason": v.get("reason") or "", "meaning": meaning, "todo": todo, "modes": per_mode,
            "truth": truth, "unsafe_pickle": bool(pickle and pickle.get("dangerous")), "calibrated": calibrated,
            "p_value": v.get("p_value"), "p_text": pnum(v.get("p_value")), "alpha": v.get("alpha"),
            "provisional": bool(v.get("alpha_provisional")), "tests": v.get("tests"), "rule": v.get("rule"),
            "levels": sum(1 for md in per_mode if md["p"] is not None), "detector": dig(v, "decided_by", "detector"),
            "factors": _factor_words(v),
            "disagree": [f"{d.get('detector')} names {class_label(names, d.get('target'))}" for d in v.get("disagree") or []
                         if isinstance(d, dict)]}


def _factor_words(v: dict[str, Any]) -> str | None:
    """Schema 3's per-detector factors in words ("neural-cleanse × 1.1, neuron-noise × 11"), or None when the
    detectors' weights were equal (or the document is older): then the factor is the number of detectors."""
    f = v.get("factors")
    if not isinstance(f, dict) or len({round(float(x), 9) for x in f.values() if isinstance(x, (int, float))}) <= 1:
        return None
    return ", ".join(f"{d} × {float(x):.3g}" for d, x in f.items() if isinstance(x, (int, float)))


def _look_words(doc: dict[str, Any]) -> str | None:
    """How a two-look schedule enters the corrected p-value (docs/verdict.md), or None for one look."""
    look, looks = dig(doc, "config", "second_look"), dig(doc, "verdict", "looks")
    alpha, steps = dig(doc, "config", "alpha"), dig(doc, "config", "inversion", "steps")
    if not look or looks not in (1, 2) or not alpha:
        return None
    a1, first = float(look["alpha_first"]), look["first_steps"]
    if looks == 1:
        return (f", then by {alpha / a1:.3g} for the two-look schedule: this verdict is its first look's, after {first} of "
                f"{steps} steps, which may spend {a1:.3g} of α")
    return (f", then by {alpha / (alpha - a1):.3g} for the two-look schedule: the first look, after {first} steps, was in "
            f"doubt, so every class ran on to {steps} steps, and this second look spends the remaining {alpha - a1:.3g} of α")


def _repair_todo(doc: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The verdict box's repair step: the command to run (from the folder the scan ran in), or, once a repair ran,
    its outcome and the command that scans the repaired model."""
    rep = doc.get("repair")
    if isinstance(rep, dict):
        export = rep.get("export") if isinstance(rep.get("export"), dict) else {}
        passed = rep.get("passed", rep.get("within_tolerance"))
        state = ("passed its checks" if passed else "failed its checks") + (
            "; the repaired model was written with --force" if export.get("forced") else "")
        cmd = rescan_command(doc)
        return [(f"A repair ran and {state} (see Repair below)." + (" Scan the repaired model to confirm:" if cmd else ""), cmd)]
    cmd = repair_command(doc)
    if cmd is None:
        return [("Remove the backdoor with `bdscan repair` (see the README), then scan the repaired model again.", None)]
    return [("Remove the backdoor by unlearning the reversed trigger (run this from the folder you ran the scan in; it "
             "writes the repaired model and a report of the repair), then scan the repaired model again:", cmd)]


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
        sizes = dig(doc, "config", "cnn_patch_sizes") or []
        token = "none (no patch embedding: a CNN)"
        shifted = " (each also shifted by half a patch)" if dig(doc, "config", "cnn_patch_offsets") is not False else ""
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
    o = dig(doc, "model", "original_trigger")
    if not o:
        return None
    imgs = o.get("images") or {}
    return {"attack": o.get("attack") or "?", "target": class_label(names, o.get("target")), "l1": o.get("l1"),
            "images": [(IMAGE_CAPTIONS[k], safe_image(imgs.get(k))) for k in ("mask", "pattern", "product") if safe_image(imgs.get(k))],
            "params": ", ".join(f"{k}={v}" for k, v in (o.get("params") or {}).items() if k not in ("attack", "target"))}


IMAGE_CAPTIONS = {"mask": "mask", "pattern": "pattern", "product": "mask×pattern", "stamped": "stamped"}


def _modes(doc: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    out = []
    true_t = dig(doc, "verdict", "true_target")
    for mode, m in (doc.get("modes") or {}).items():
        m = m or {}
        an = m.get("anomaly") or {}
        stat = m.get("statistic") or ""
        trig = []
        for t in m.get("triggers") or []:
            imgs = t.get("images") or {}
            trig.append({"rank": t.get("rank"), "label": class_label(names, t.get("label")), "norm": t.get("norm"),
                         "words": size_words(doc, mode, t.get("label"), t.get("norm")),
                         "flagged": t.get("label") in (an.get("flagged") or []), "true": t.get("label") == true_t and true_t is not None,
                         "distance": t.get("distance_to_original"),
                         "images": [(IMAGE_CAPTIONS[k], safe_image(imgs.get(k))) for k in IMAGE_CAPTIONS if safe_image(imgs.get(k))]})
        labels = [r for r in m.get("labels") or [] if isinstance(r, dict)]
        failed = [class_label(names, k) for k in an.get("failed") or []]
        med, mad, thr = an.get("median"), an.get("mad"), an.get("threshold")
        calibrated = isinstance(an.get("test"), dict)
        boundary = (p_boundary(an.get("test"), dig(doc, "verdict", "alpha"), _level_tests(doc)) if calibrated
                    else med - thr * mad if all(isinstance(x, (int, float)) for x in (med, mad, thr)) else None)
        phase_rows = []
        nph = max((len(r.get("phases") or []) for r in labels), default=0)
        for p in range(nph):
            present = [(dig(r, "phases", p, "norm"), r.get("label")) for r in labels if isinstance(dig(r, "phases", p, "norm"), (int, float))]
            best = min(present) if present else None
            trow = next((r for r in labels if r.get("label") == true_t), None) if true_t is not None else None
            tnorm = dig(trow, "phases", p, "norm") if trow else None
            rank = (1 + sum(1 for v, _ in present if v < tnorm)) if isinstance(tnorm, (int, float)) else None
            phase_rows.append({"phase": p + 1, "step": dig(labels[0], "phases", p, "step") if labels else None,
                               "reached": len(present), "total": len(labels),
                               "best": class_label(names, best[1]) if best else "—", "best_norm": best[0] if best else None,
                               "true_rank": rank})
        out.append({
            "mode": mode, "title": MODE_TITLES.get(mode, mode), "statistic": stat, "anomaly": an,
            "params": ", ".join(str(p.get("name")) for p in m.get("params") or [] if isinstance(p, dict)),
            "boundary": boundary, "failed": failed, "triggers": trig, "calibrated": calibrated, "p_text": pnum(an.get("p_value")),
            "chart": norm_chart(mode, m, names, true_t, boundary if calibrated else None),
            "null_chart": null_chart(mode, m, names, boundary) if calibrated else None,
            "phase_charts": phase_charts(mode, m, names, true_t),
            "phase_rows": phase_rows,
            "labels": [{"label": class_label(names, r.get("label")), "norm": r.get("norm"), "index": r.get("anomaly_index"),
                        "flagged": r.get("flagged"), "succeeded": r.get("succeeded", r.get("norm") is not None),
                        "steps": r.get("steps"), "success_rate": r.get("success_rate"), "param": r.get("param")} for r in labels],
        })
    return out


def _level_tests(doc: dict[str, Any]) -> float | None:
    """The Bonferroni factor of one Neural Cleanse level in the verdict: its levels × Neural Cleanse's factor in the
    combined rule (``verdict.factors``; schema 2: the number of detectors compared)."""
    levels = sum(1 for m in (doc.get("modes") or {}).values() if isinstance(dig(m, "anomaly", "test"), dict))
    factor = dig(doc, "verdict", "factors", "neural-cleanse")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        factor = dig(doc, "verdict", "tests")
    return levels * float(factor) if isinstance(factor, (int, float)) and factor > 0 and levels else None


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
        rows.append({"trigger": "original (" + str(orig.get("trigger")) + ")", "label": class_label(names, orig.get("target")),
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
        rows.append({"trigger": f"reversed, {mode}", "label": class_label(names, e.get("label")) + f" ({e.get('label_basis')})",
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


def _config(doc: dict[str, Any]) -> dict[str, Any]:
    cfg = doc.get("config") or {}
    data = doc.get("data") or {}
    v = doc.get("verdict") or {}
    alpha = v.get("alpha", cfg.get("alpha"))
    basics = [("Seed", doc.get("seed")), ("Budget", cfg.get("budget")), ("Modes", ", ".join(cfg.get("modes") or [])),
              ("Verdict rule", v.get("rule") or "anomaly index over the threshold (schema 1)"),
              ("α (verdict level)", f"{alpha:g}" + (" (provisional default)" if v.get("alpha_provisional") else "")
               if isinstance(alpha, (int, float)) else None),
              ("Anomaly threshold" + (" (reference only)" if v.get("rule") else ""), cfg.get("threshold")),
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


def _detectors(doc: dict[str, Any], names: list[str], modes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every detector whose section the document holds: its evidence (status, class, p-value, score), the
    pictures that make it convincing, and its per-class scores when it has them."""
    rows = []
    decider = dig(doc, "verdict", "decided_by", "detector") or dig(doc, "verdict", "detector")
    for det in detectors_in(doc):
        ev = det.evidence_from_doc(doc)
        if ev is None:
            continue
        sec = doc.get(det.json_key) or {}
        scores = sec.get("scores") if isinstance(sec, dict) and isinstance(sec.get("scores"), list) else []
        rows.append({"name": det.name, "title": det.title, "status": ev.status, "target": class_label(names, ev.target)
                     if ev.target is not None else None, "score": ev.score, "threshold": ev.threshold, "reason": ev.reason,
                     "p_value": ev.p_value, "p_text": pnum(ev.p_value), "decides": det.name == decider,
                     "pictures": _nc_pictures(doc, modes) if det.json_key == "modes" else _section_pictures(sec),
                     "scores": [{"label": class_label(names, r.get("label")), "score": r.get("score")} for r in scores if isinstance(r, dict)]})
    return rows


def _nc_pictures(doc: dict[str, Any], modes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neural Cleanse's pictures: the deciding level's smallest reversed trigger and that level's null chart."""
    basis = dig(doc, "verdict", "basis") or (modes[0]["mode"] if modes else None)
    md = next((x for x in modes if x["mode"] == basis), None)
    if md is None:
        return []
    out = [{"caption": f"{md['title']}, #1 {t['label']}: {cap}", "uri": uri, "svg": None} for t in md["triggers"][:1] for cap, uri in t["images"]]
    if md.get("null_chart") is not None:
        out.append({"caption": f"{md['title']}: the smallest trigger against the other classes", "uri": None, "svg": md["null_chart"]})
    return out


#: at most this many pictures per detector in the detectors table
MAX_PICTURES = 6


def _section_pictures(sec: Any, path: str = "") -> list[dict[str, Any]]:
    """Inline images anywhere in another detector's section (``data:`` URIs only), captioned by where they are."""
    out: list[dict[str, Any]] = []
    items = sec.items() if isinstance(sec, dict) else enumerate(sec) if isinstance(sec, list) else ()
    for k, x in items:
        here = f"{path} {k}".strip() if isinstance(k, str) else path
        if isinstance(x, str) and safe_image(x):
            out.append({"caption": here or "image", "uri": x, "svg": None})
        elif isinstance(x, (dict, list)):
            out += _section_pictures(x, here)
        if len(out) >= MAX_PICTURES:
            return out[:MAX_PICTURES]
    return out


def view_model(doc: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, with every field present (None or empty where the document lacks it)."""
    if not isinstance(doc, dict):
        raise TypeError("the scan document must be a JSON object")
    m = doc.get("model") or {}
    n = m.get("num_classes") or 0
    names = [str(x) for x in (m.get("class_names") or [])]
    names += [str(i) for i in range(len(names), n)]
    modes = _modes(doc, names)
    return {
        "title": f"bdscan report: {m.get('file') or 'model'}",
        "verdict": _verdict(doc, names),
        "model": _model(doc, names),
        "original": _original(doc, names),
        "modes": modes,
        "detectors": _detectors(doc, names, modes),
        "activations": _activations(doc, names),
        "repair": repair_view(doc, names),
        "config": _config(doc),
        "version": dig(doc, "versions", "bdscan", default="?"),
        "schema": doc.get("schema") or "?",
        "colours": {"bar": C_BAR, "flag": C_FLAG, "min": C_MIN, "fail": C_FAIL, "orig": C_ORIG},
    }


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = num
    env.filters["pct"] = pct
    env.filters["pnum"] = pnum
    env.filters["val"] = val
    return env


def render_html(doc: dict[str, Any]) -> str:
    """The self-contained HTML report of a scan document (schema ``bdscan.scan/1`` to ``/3``)."""
    return environment().get_template("report.html.j2").render(v=view_model(doc))


def render_report_from_dir(scan_dir: str | Path) -> str:
    """Renders a scan folder's document (see :mod:`bdscan.report.scandir`)."""
    from bdscan.report.scandir import read_document

    return render_html(read_document(Path(scan_dir)))
