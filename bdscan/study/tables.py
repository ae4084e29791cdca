"""The study's tables, as pure functions from per-model result dicts (``models/<name>.json``) to rows.

Every builder returns a :class:`Table` (title, caption, headers, string rows, notes); rendering to Markdown or
HTML is :mod:`bdscan.study.run`'s business. Numbers are formatted here so both renderings show the same text.
Missing values are shown as "–".

The per-model dict (see :func:`bdscan.study.run.study_model`) has the keys used below: ``name``, ``arch``,
``dataset``, ``kind``, ``target``, ``manifest`` (``clean_acc``, ``asr``, ``clean_twin_acc``), ``scan``
(per mode: ``anomaly_index``, ``min_label``, ``target_norm``, ``target_rank``, ``identified``, ``phase_norms``),
``verdict``, ``repair``, ``activations``, ``precision``, ``distance``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DASH = "–"
#: the paper's datasets of tables 2/4 and 3/5
PAPER_DATASETS = ("gtsrb", "cifar10")
DATASET_NAMES = {"gtsrb": "GTSRB", "cifar10": "CIFAR-10"}
#: paper figure per architecture family (Fig. 3: 6-layer CNN, Fig. 4: ConViT, Fig. 5: ViT)
FIGURE_OF_ARCH = {"bdscan_cnn6": 3, "bdscan_convit": 4, "bdscan_vit": 5}
#: paper's Euclidean distances (section 5.4)
PAPER_DISTANCE = {"CNN": 0.014, "ViT": 0.023}


@dataclass
class Table:
    """One table: ``rows`` are lists of strings as long as ``headers``."""

    title: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "caption": self.caption, "headers": self.headers, "rows": self.rows, "notes": self.notes}


def fmt(x: Any, nd: int = 3) -> str:
    """A number with ``nd`` decimals, a bool as yes/no, None as a dash."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def pct(x: float | None, nd: int = 2) -> str:
    return DASH if x is None else f"{100 * x:.{nd}f}"


def backdoored(models: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in models if m.get("kind") != "clean"]


def dataset_label(ds: str | None) -> str:
    return DATASET_NAMES.get(str(ds), str(ds))


def datasets_in_order(models: Sequence[dict[str, Any]]) -> list[str]:
    """The paper's datasets first (GTSRB, CIFAR-10), then any other, in manifest order."""
    seen = [m.get("dataset") for m in models]
    rest = [d for i, d in enumerate(seen) if d not in PAPER_DATASETS and d not in seen[:i]]
    return [d for d in PAPER_DATASETS if d in seen] + [str(d) for d in rest]


def _mode(m: dict[str, Any], mode: str) -> dict[str, Any]:
    return (m.get("scan") or {}).get(mode) or {}


def table1(models: Sequence[dict[str, Any]], modes: Sequence[str]) -> Table:
    """Table 1: anomaly index and target-class norm per mode, and whether the target was identified."""
    headers = ["Model", "Dataset", "Arch", "Kind", "Target"]
    for mode in modes:
        headers += [f"AI ({mode})", f"Target norm ({mode})", f"Smallest-norm label ({mode})", f"Identified ({mode})"]
    headers += ["Verdict", "Suspect"]
    rows = []
    for m in models:
        row = [m["name"], dataset_label(m.get("dataset")), str(m.get("arch")), str(m.get("kind")), fmt(m.get("target"))]
        for mode in modes:
            s = _mode(m, mode)
            ident = s.get("identified")
            row += [fmt(s.get("anomaly_index"), 2), fmt(s.get("target_norm"), 3), fmt(s.get("min_label")),
                    DASH if m.get("target") is None else fmt(ident)]
        v = m.get("verdict") or {}
        row += [str(v.get("status", DASH)), fmt(v.get("target"))]
        rows.append(row)
    return Table("Table 1", "Anomaly index (AI) and norm of the target class's reversed mask, per scan mode. "
                 "Identified: the smallest-norm label of that mode is the true target and the mode's AI is above the threshold. "
                 "Clean models are listed too (a high AI there is a false alarm).", headers, rows)


def accuracy_table(models: Sequence[dict[str, Any]], dataset: str, title: str) -> Table:
    """Tables 2-3: the injection's quality, from the manifest (Accuracy 1-3 as in the paper)."""
    rows = []
    for m in backdoored(models):
        if m.get("dataset") != dataset:
            continue
        mf = m.get("manifest") or {}
        rows.append([m["name"], str(m.get("arch")), str(m.get("kind")), fmt(mf.get("clean_acc")), fmt(mf.get("clean_twin_acc")),
                     fmt(mf.get("asr"))])
    return Table(title, f"Backdoor injection on {dataset_label(dataset)} (zoo manifest, test images). Accuracy 1: infected model on "
                 "clean samples; Accuracy 2: clean twin on clean samples; Accuracy 3: infected model on poisoned samples "
                 "(attack success rate).", ["Model", "Arch", "Kind", "Accuracy 1", "Accuracy 2", "Accuracy 3"], rows)


def repair_table(models: Sequence[dict[str, Any]], dataset: str, title: str) -> Table:
    """Tables 4-5: accuracy (and remaining attack success of the original trigger) after unlearning."""
    rows = []
    notes = []
    for m in backdoored(models):
        if m.get("dataset") != dataset:
            continue
        r = m.get("repair") or {}
        rev = r.get("reversed") or {}
        orig = r.get("original") or {}
        before = rev.get("before") or orig.get("before") or {}
        mf = m.get("manifest") or {}
        label = DASH if not rev else f"{rev.get('mode', DASH)}, class {fmt(rev.get('label'))}"
        if rev.get("fallback"):
            label += " *"
        rows.append([m["name"], str(m.get("arch")), fmt((rev.get("after") or {}).get("clean_accuracy")),
                     fmt((orig.get("after") or {}).get("clean_accuracy")), fmt(mf.get("clean_twin_acc")),
                     fmt(before.get("clean_accuracy")), fmt(before.get("asr_original")),
                     fmt((rev.get("after") or {}).get("asr_original")), fmt((orig.get("after") or {}).get("asr_original")), label])
        if r.get("skipped"):
            notes.append(f"{m['name']}: {r['skipped']}")
    if any(r[-1].endswith("*") for r in rows):
        notes.append("* the scan named no suspect, so the true target's reversed trigger was unlearned.")
    return Table(title, f"Unlearning on {dataset_label(dataset)} (held-out part of the bundled clean samples). Accuracy 1: model "
                 "cleaned with the reverse-engineered trigger; Accuracy 2: cleaned with the original trigger; Accuracy 3: clean "
                 "twin on clean samples (manifest). ASR: attack success of the original trigger.",
                 ["Model", "Arch", "Accuracy 1", "Accuracy 2", "Accuracy 3", "Accuracy before", "ASR before",
                  "ASR after (reversed)", "ASR after (original)", "Reversed trigger"], rows, notes)


def table6(models: Sequence[dict[str, Any]], modes: Sequence[str]) -> Table:
    """Table 6: % of Conv2d/Linear neurons activated by the original and the reversed trigger, poisoned vs clean twin."""
    headers = ["Model", "Arch", "Clean twin"]
    for who in ("Poisoned", "Clean"):
        headers += [f"{who} · Reverse Eng ({mode})" for mode in modes] + [f"{who} · Original"]
    rows = []
    for m in backdoored(models):
        a = m.get("activations") or {}
        row = [m["name"], str(m.get("arch")), str(m.get("clean_twin") or DASH)]
        for who in ("poisoned", "clean"):
            w = a.get(who) or {}
            row += [pct((w.get("reversed") or {}).get(mode)) for mode in modes] + [pct(w.get("original"))]
        rows.append(row)
    thr = next((m["activations"].get("threshold") for m in models if m.get("activations")), None)
    return Table("Table 6", "Percentage of neurons (elements of every Conv2d/Linear output) activated by the original and the "
                 f"reverse-engineered trigger of the target class, in the poisoned model and in its clean twin (same triggers). "
                 f"Activated: mean activation rises by more than {fmt(thr, 2)} × the layer's largest clean activation.",
                 headers, rows)


def precision_table(models: Sequence[dict[str, Any]], modes: Sequence[str], phase: int, ks: Sequence[int]) -> Table:
    """Tables 7-9: precision@k between the original and the phase-``phase`` reversed trigger's neuron rankings.

    A k above the model's neuron count is shown as a dash (with every neuron compared, precision is 1 by construction).
    """
    title = f"Table {6 + phase}"
    headers = ["Model", "Mode", "Neurons"] + [f"K={k:,}" for k in ks]
    rows = []
    capped_any = False
    for m in backdoored(models):
        prec = m.get("precision") or {}
        for mode in modes:
            p = prec.get(mode)
            if not p:
                continue
            ph = (p.get("phases") or [None] * 3)[phase - 1] if len(p.get("phases") or []) >= phase else None
            n = p.get("neurons")
            cells = []
            by_k = {e["k"]: e for e in (ph or {}).get("precision") or []}
            for k in ks:
                e = by_k.get(k)
                if e is None:
                    cells.append(DASH)
                elif e.get("capped") or (n is not None and k > n):
                    cells.append(DASH)
                    capped_any = True
                else:
                    cells.append(f"{e['precision']:.2f}")
            rows.append([m["name"], mode, fmt(n), *cells])
    notes = ["– : k exceeds the model's neuron count (or no trigger had succeeded by the end of the phase)."] if capped_any else []
    third = ["first", "second", "third"][phase - 1]
    return Table(title, f"Precision@K between the neuron rankings under the original and the reverse-engineered trigger "
                 f"(target class) for phase {phase} of the inversion (best trigger at the end of its {third} third).",
                 headers, rows, notes)


def family(arch: str | None) -> str:
    a = str(arch or "")
    return "CNN" if any(s in a for s in ("cnn", "resnet")) else "ViT"


def distance_table(models: Sequence[dict[str, Any]], modes: Sequence[str]) -> Table:
    """Section 5.4: Euclidean distance between the original and the reversed trigger (target class), per mode."""
    rows = []
    for m in backdoored(models):
        d = m.get("distance") or {}
        if not d:
            continue
        rows.append([m["name"], str(m.get("arch")), family(m.get("arch"))] + [fmt(d.get(mode), 4) for mode in modes])
    notes = []
    for fam in ("CNN", "ViT"):
        for mode in modes:
            vals = [(m.get("distance") or {}).get(mode) for m in backdoored(models) if family(m.get("arch")) == fam]
            vals = [v for v in vals if v is not None]
            if vals:
                notes.append(f"Mean {fam} ({mode}): {sum(vals) / len(vals):.4f} over {len(vals)} model(s); paper: {PAPER_DISTANCE[fam]}.")
    return Table("Section 5.4", "Euclidean distance (RMS of m·p − m'·p' over all C×H×W values, Trigger.distance) between the "
                 "original trigger and the target class's reversed trigger.", ["Model", "Arch", "Family"] + [f"Distance ({mo})" for mo in modes],
                 rows, notes)


def all_tables(models: Sequence[dict[str, Any]], modes: Sequence[str], ks: Sequence[int]) -> list[Table]:
    """Tables 1-9 and the section 5.4 distances, in the paper's order.

    Tables 2/4 hold GTSRB and 3/5 CIFAR-10 (as in the paper); any other dataset gets its own pair, titled
    "Table 2–3 (name)" and "Table 4–5 (name)".
    """
    out = [table1(models, modes)]
    datasets = datasets_in_order(models)
    acc, rep = [], []
    for ds in datasets or list(PAPER_DATASETS):
        if ds in PAPER_DATASETS:
            i = PAPER_DATASETS.index(ds)
            acc.append(accuracy_table(models, ds, f"Table {2 + i}"))
            rep.append(repair_table(models, ds, f"Table {4 + i}"))
        else:
            acc.append(accuracy_table(models, ds, f"Table 2–3 ({dataset_label(ds)})"))
            rep.append(repair_table(models, ds, f"Table 4–5 ({dataset_label(ds)})"))
    # a paper table without models still appears (empty), so the document always has Tables 1-9
    for ds, i in zip(PAPER_DATASETS, (0, 1), strict=True):
        if ds not in datasets:
            acc.insert(i, accuracy_table(models, ds, f"Table {2 + i}"))
            rep.insert(i, repair_table(models, ds, f"Table {4 + i}"))
    out += acc + rep
    out.append(table6(models, modes))
    out += [precision_table(models, modes, p, ks) for p in (1, 2, 3)]
    out.append(distance_table(models, modes))
    return out
