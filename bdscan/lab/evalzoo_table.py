"""The evaluation zoo's tables (Markdown), rendered from its manifest: one row per built model, and per-cell
means, with the issue's targets checked (ASR >= 90 %, clean accuracy within 2 points of the clean twin)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bdscan.atomic import atomic_write_text
from bdscan.errors import UsageError

MIN_ASR = 0.90
MAX_DROP = 0.02
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "–"


def trigger_summary(row: dict[str, Any]) -> str:
    """A short description of a row's trigger."""
    t = row.get("trigger")
    if not t:
        return ""
    p, name = t.get("params", {}), t.get("name")
    if name == "badnets":
        pos = p.get("position")
        grid = isinstance(pos, list) and p.get("size") == 4 and pos[0] % 4 == 0 and pos[1] % 4 == 0
        what = p.get("pattern", "")
        return f"{what} {p.get('size')} px at {pos}{' (on grid)' if grid else ''}"
    if name == "blended":
        return f"{p.get('pattern')} α={p.get('alpha')}"
    if name == "trojan":
        return f"{p.get('size')} px {p.get('position')}"
    if name == "sig":
        return f"Δ={p.get('delta')} f={p.get('frequency')}{' vertical' if p.get('vertical') else ''}"
    if name == "wanet":
        return f"k={p.get('k')} s={p.get('s')}"
    if name == "issba":
        return f"ε={p.get('eps')}"
    return str(name)


def twin_acc(row: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> float | None:
    twin = by_name.get(row.get("clean_twin") or "")
    return twin.get("clean_acc") if twin else None


def meets_targets(row: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> bool | None:
    """ASR and accuracy targets of a built backdoored row (None: not built, or its twin is not)."""
    acc, asr, tw = row.get("clean_acc"), row.get("asr"), twin_acc(row, by_name)
    if row.get("attack") is None or acc is None or asr is None or tw is None:
        return None
    return bool(asr >= MIN_ASR and acc >= tw - MAX_DROP)


def _mean(vals: Sequence[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def render_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: counts, per-cell means, and one line per built model."""
    by_name = {r["name"]: r for r in rows}
    built = [r for r in rows if r.get("clean_acc") is not None]
    n_bd = sum(r["attack"] is not None for r in rows)
    built_bd = [r for r in built if r["attack"] is not None]
    working = sum((r.get("asr") or 0.0) >= MIN_ASR for r in built_bd)
    met = sum(bool(meets_targets(r, by_name)) for r in built_bd)
    lines = [f"{len(rows)} planned models ({n_bd} backdoored, {len(rows) - n_bd} clean twins); {len(built)} built "
             f"({len(built_bd)} backdoored, {len(built) - len(built_bd)} clean); of the backdoored, {working} implant "
             f"(ASR ≥ {MIN_ASR:.0%}: the models a detector is scored on) and {met} also keep the clean accuracy. Targets: "
             f"ASR ≥ {MIN_ASR:.0%}, clean accuracy at most {100 * MAX_DROP:.0f} points below the clean twin's. Accuracy and ASR in "
             "%, full test split, float16 weights.", ""]
    lines += ["| cell | built (bd + clean) | clean twins' acc | backdoored acc | mean drop vs twin | mean ASR | min ASR | targets met |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cr = [r for r in built if r["cell"] == cell]
        if not cr:
            continue
        clean = [r["clean_acc"] for r in cr if r["attack"] is None]
        bd = [r for r in cr if r["attack"] is not None]
        drops = [tw - r["clean_acc"] for r in bd if (tw := twin_acc(r, by_name)) is not None]
        asrs = [r["asr"] for r in bd if r.get("asr") is not None]
        met = [meets_targets(r, by_name) for r in bd]
        lines.append(f"| {cell} | {len(bd)} + {len(clean)} | {_pct(_mean(clean))} | {_pct(_mean([r['clean_acc'] for r in bd]))} | "
                     f"{_pct(_mean(drops))} | {_pct(_mean(asrs))} | {_pct(min(asrs) if asrs else None)} | "
                     f"{sum(m is True for m in met)}/{len(bd)} |")
    lines += ["", "| model | split | attack | target | trigger | clean acc | twin's acc | ASR | targets | build s (CPU s) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in built:
        b = r.get("build") or {}
        ok = meets_targets(r, by_name)
        secs = f"{b.get('seconds', '–')} ({b.get('cpu_seconds', '–')})" if not b.get("adopted") else "adopted"
        lines.append(f"| {r['name']} | {r['split']} | {r['attack'] or 'clean'} | {'' if r['target'] is None else r['target']} | "
                     f"{trigger_summary(r)} | {_pct(r['clean_acc'])} | {_pct(twin_acc(r, by_name)) if r['attack'] else ''} | "
                     f"{_pct(r.get('asr')) if r['attack'] else ''} | {'' if ok is None else ('yes' if ok else '**no**')} | {secs} |")
    return "\n".join(lines) + "\n"


def write_into_readme(path: Path, text: str) -> None:
    """Replaces what lies between the zoo-table markers of ``path`` with ``text`` (atomically)."""
    doc = Path(path).read_text()
    if START not in doc or END not in doc:
        raise UsageError(f"{path} has no {START} ... {END} markers", "add them where the tables should go")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(Path(path), f"{head}{START}\n{text}{END}{tail}")
