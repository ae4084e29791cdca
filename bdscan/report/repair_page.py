"""The report's Repair page: what an auditor needs to accept or reject a repaired model.

It shows, from the document's ``repair`` section (:func:`bdscan.report.json_report.repair_section`): a clear
pass or fail with the reason, the before/after table with 95 % intervals, the two checks and their rules, the
trigger the repair removed as images, what happened to the repaired model (written, refused, or written with
``--force`` and marked so), and the method's settings. A document from before the checks existed (no
``checks``) is judged by its ``within_tolerance`` alone and says so.
"""

from __future__ import annotations

import json
from typing import Any

from bdscan.report.charts import class_label, dig, pct, safe_image
from bdscan.report.suggest import rescan_command

#: the rows of the before/after table: (metric key, what it measures)
REPAIR_ROWS = (
    ("clean_accuracy", "Clean accuracy", "share of held-out images classified as their label"),
    ("asr_reversed", "Attack success of the trigger used", "share of held-out images of other classes the stamped trigger sends to the target"),
    ("asr_original", "Attack success of the original trigger", "the same, with the trigger this lab model was poisoned with"),
    ("target_without_trigger", "Sent to the target with no trigger", "share of held-out images of other classes the model puts in the "
                                                                        "target class anyway: the floor of any attack success"),
)

#: the rules of the two checks, as the page states them (bdscan.repair.checks implements them)
RULES = (
    "Clean accuracy fails only when the whole 95 % interval of the drop lies above the tolerance: the interval is "
    "Newcombe's for paired proportions (the same images are measured before and after), so it rests on the images "
    "whose answer changed. A measured drop above the tolerance whose interval reaches into it passes with a caution.",
    "Attack success fails when, after the repair, any trigger measured (the one used, and the original when known) "
    "still sends more than the limit of the held-out images of other classes to the target. The measured share decides, "
    "not its interval: a few dozen images cannot clear a backdoor that still works on them.",
)

IMAGE_CAPTIONS = {"mask": "mask (contrast-stretched)", "pattern": "pattern", "product": "mask×pattern", "stamped": "stamped image"}


def _ci(iv: Any) -> str:
    if not (isinstance(iv, (list, tuple)) and len(iv) == 2 and all(isinstance(x, (int, float)) for x in iv)):
        return ""
    return f"{pct(iv[0])} – {pct(iv[1])}"


def _pts(x: Any) -> str:
    return f"{100 * x:+.1f}" if isinstance(x, (int, float)) else "—"


def _trigger(r: dict[str, Any], names: list[str]) -> dict[str, Any]:
    t = r.get("trigger") or {}
    kind = str(t.get("kind") or "?")
    level = kind.split("-", 1)[1] if kind.startswith("reversed-") else None
    source = (f"reversed by the scan at the {level} level for class {class_label(names, t.get('label', t.get('target')))}"
              if level else ("the original trigger this lab model was poisoned with" if kind not in ("file", "?") else
                             f"read from {t.get('file') or 'a trigger file'}"))
    imgs = t.get("images") or {}
    return {"kind": kind, "target": class_label(names, t.get("target")), "source": source, "l1": t.get("l1"),
            "inferred": bool(t.get("target_inferred")),
            "images": [(cap, safe_image(imgs.get(k))) for k, cap in IMAGE_CAPTIONS.items() if safe_image(imgs.get(k))]}


def _outcome(r: dict[str, Any], passed: bool, failed: list[str]) -> tuple[str, str, str]:
    """(tone, headline, what happened to the model)."""
    export = r.get("export") if isinstance(r.get("export"), dict) else {}
    file = export.get("file") or "the repaired model"
    reason = " and ".join(failed)
    if passed:
        head = "Repair passed: the backdoor's trigger no longer works and clean accuracy held"
        fate = f"The repaired model was written to {file}." if export.get("written") else (
            "The repaired model was not written." if export else "")
        return "good", head, fate
    head = f"Repair failed its {reason} check" if reason else "Repair failed"
    if export.get("written") and export.get("forced"):
        return "bad", head, (f"FORCED EXPORT: {file} was written anyway because --force was given. It is marked as "
                             "forced in its provenance; do not treat it as repaired.")
    if export.get("written"):
        return "bad", head, f"{file} was written anyway."
    return "bad", head, ("The repaired model was not written (rerun with --force to write it anyway, marked as forced)."
                         if export else "")


def repair_view(doc: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """Everything the Repair page shows (None when no repair ran)."""
    r = doc.get("repair")
    if not r or not isinstance(r, dict):
        return None
    before, after = r.get("before") or {}, r.get("after") or {}
    iv = r.get("intervals") if isinstance(r.get("intervals"), dict) else {}
    rows = []
    for key, title, what in REPAIR_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        rows.append({"metric": title, "what": what, "before": pct(b), "before_ci": _ci(dig(iv, "before", key)),
                     "after": pct(a), "after_ci": _ci(dig(iv, "after", key)),
                     "change": _pts(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "—"})
    checks = [c for c in r.get("checks") or [] if isinstance(c, dict)]
    legacy = not checks
    if legacy:  # a document from before the checks: the tolerance was its only check
        ok = bool(r.get("within_tolerance", True))
        checks = [{"check": "clean accuracy", "passed": ok,
                   "text": f"Drop {pct(r.get('acc_drop'))} against a tolerance of {pct(r.get('tolerance'))} (no interval recorded)."}]
    passed = bool(r.get("passed", all(c.get("passed") for c in checks)))
    tone, headline, fate = _outcome(r, passed, [str(c.get("check")) for c in checks if not c.get("passed")])
    cfg = r.get("config") if isinstance(r.get("config"), dict) else {}
    counts = r.get("counts") if isinstance(r.get("counts"), dict) else {}
    method = str(r.get("method") or "?")
    settings = [("Method", {"unlearn": "unlearning (fine-tuning with the trigger stamped on images)",
                            "prune": "pruning (zeroing the penultimate neurons the trigger excites)"}.get(method, method))]
    if method == "unlearn":
        targets = {"model": "the input model's own answer on the unstamped image", "labels": "the true labels"}
        settings += [("Trained towards", targets.get(str(cfg.get("targets")), str(cfg.get("targets") or "true labels"))),
                     ("Epochs, learning rate", f"{cfg.get('epochs', '—')}, {cfg.get('lr', '—')}"),
                     ("Images stamped per epoch", pct(cfg.get("stamp_fraction"), 0))]
    settings += [("Images", f"{r.get('repair_images', '—')} to repair with, {r.get('holdout_images', '—')} held out to measure "
                            f"(never seen by the repair)"),
                 ("Tolerance, attack-success limit", f"{pct(r.get('tolerance'))} accuracy drop, {pct(r.get('max_asr'))} attack success"),
                 ("Seconds", r.get("seconds"))]
    if counts.get("clean"):
        settings.append(("Images that changed answer", f"{counts.get('lost', 0)} right → wrong, {counts.get('gained', 0)} wrong → right"))
    return {"passed": passed, "tone": tone, "headline": headline, "fate": fate, "rows": rows, "checks": checks,
            "legacy": legacy, "rules": RULES, "confidence": iv.get("confidence", 0.95), "drop_ci": _ci(iv.get("acc_drop")),
            "trigger": _trigger(r, names), "settings": settings, "rescan": rescan_command(doc),
            "details": json.dumps({"config": cfg, "details": r.get("details")}, indent=1, sort_keys=True, default=str)[:6000]}
