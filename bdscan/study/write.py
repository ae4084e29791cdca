"""Writing a study: ``study.json``, ``study.md``, ``study.html`` and the figures (Figures 3-5 of the paper)."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bdscan.atomic import atomic_write_bytes, atomic_write_text
from bdscan.study.run import StudyResult
from bdscan.study.tables import FIGURE_OF_ARCH, Table, all_tables

# ---------------------------------------------------------------------------------------------------------------
# Documents

#: a document block: ("h", level, text) | ("p", text) | ("table", Table) | ("img", alt, relative path) | ("ul", [items])
Block = tuple[Any, ...]


def figure(model: dict[str, Any], mode: str, path: Path) -> Path | None:
    """Figures 3-5: smallest norm per class at the end of each third of the inversion (PNG, Agg backend)."""
    s = (model.get("scan") or {}).get(mode)
    if not s:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = s["labels"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for i, ax in enumerate(axes):
        ys = [float(v) if isinstance(v, (int, float)) else float("nan") for v in s["phase_norms"][i]]
        colours = ["tab:red" if k == model.get("target") else "tab:blue" for k in labels]
        ax.bar(range(len(labels)), [0 if math.isnan(y) else y for y in ys], color=colours)
        ax.set_title(f"phase {i + 1}")
        ax.set_xlabel("class label")
        if len(labels) <= 12:
            ax.set_xticks(range(len(labels)), [str(k) for k in labels])
    axes[0].set_ylabel(f"minimum norm ({s.get('statistic', mode)})")
    fig.suptitle(f"{model['name']} ({mode}); red: target class {model.get('target')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _png(fig)
    plt.close(fig)
    atomic_write_bytes(path, buf)
    return path


def _png(fig: Any) -> bytes:
    import io

    b = io.BytesIO()
    fig.savefig(b, format="png", dpi=80)
    return b.getvalue()


def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def document(result: StudyResult, figures: dict[str, list[tuple[str, str]]]) -> list[Block]:
    """The study's document as blocks (rendered by :func:`to_markdown` and :func:`to_html`)."""
    cfg = result.config
    m = result.machine
    blocks: list[Block] = [
        ("h", 1, "Neural Cleanse on CNNs and transformers: the study"),
        ("p", f"Models: {len(result.models)} ({', '.join(x['name'] for x in result.models) or 'none'}). "
              f"Budget {cfg.budget}, modes {', '.join(cfg.modes)}, seed {cfg.seed}, repair epochs {cfg.repair_epochs}, "
              f"activation threshold {cfg.activation_threshold:g}."),
        ("ul", [f"Machine: {m.get('platform')}, {m.get('cores')} cores ({m.get('torch_threads')} torch thread(s)), "
                f"Python {m.get('python')}, torch {m.get('torch')}",
                f"Total wall time: {_hms(result.compute_seconds)} of model computations "
                f"(this run: {_hms(result.seconds)}; computed {len(result.computed)}, reused {len(result.reused)})"]
         + [f"Skipped {k}: {v}" for k, v in result.skipped.items()]),
    ]
    for t in all_tables(result.models, cfg.modes, cfg.ks):
        blocks.append(("h", 2, t.title))
        blocks.append(("table", t))
    blocks.append(("h", 2, "Figures 3-5"))
    blocks.append(("p", "Smallest norm per class at the end of each third of the inversion (paper: Fig. 3 6-layer CNN, "
                        "Fig. 4 ConViT, Fig. 5 ViT; the other architectures follow). The target class is red."))
    for model in result.models:
        figs = figures.get(model["name"]) or []
        if not figs:
            continue
        n = FIGURE_OF_ARCH.get(str(model.get("arch")))
        blocks.append(("h", 3, f"Figure {n}: {model['name']}" if n else f"{model['name']} ({model.get('arch')})"))
        for alt, rel in figs:
            blocks.append(("img", alt, rel))
    return blocks


def _cell_md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]) + "\n")
        elif b[0] == "img":
            out.append(f"![{b[1]}]({b[2]})\n")
        elif b[0] == "table":
            t: Table = b[1]
            lines = [t.caption, ""]
            lines.append("| " + " | ".join(_cell_md(h) for h in t.headers) + " |")
            lines.append("|" + "|".join("---" for _ in t.headers) + "|")
            lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in t.rows]
            if not t.rows:
                lines.append("| " + " | ".join(["(no models)"] + [""] * (len(t.headers) - 1)) + " |")
            lines += [""] + [f"{n}  " for n in t.notes]
            out.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}"
        "th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;font-size:13px;padding:4px 0}"
        "img{max-width:100%;display:block;margin:.5em 0}.note{font-size:12px;color:#555}")


def to_html(blocks: Sequence[Block], base: Path) -> str:
    """A self-contained page: tables as HTML, images inline as data URIs, no external URL."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif b[0] == "img":
            p = base / b[2]
            if p.is_file():
                data = base64.b64encode(p.read_bytes()).decode()
                body.append(f'<img alt="{e(b[1])}" src="data:image/png;base64,{data}">')
        elif b[0] == "table":
            t: Table = b[1]
            rows = t.rows or [["(no models)"] + [""] * (len(t.headers) - 1)]
            body.append("<table><caption>" + e(t.caption) + "</caption><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers)
                        + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>" + "".join(f'<p class="note">{e(n)}</p>' for n in t.notes))
    title = next((b[2] for b in blocks if b[0] == "h"), "bdscan study")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_study(result: StudyResult, out_dir: Path) -> dict[str, Path]:
    """Writes ``study.json``, ``study.md``, ``study.html`` and ``figures/<model>_<mode>.png`` into ``out_dir``.

    Returns:
        ``{"json": ..., "markdown": ..., "html": ..., "figures": [...]}`` paths (figures as a list).
    """
    out_dir = Path(out_dir)
    figs: dict[str, list[tuple[str, str]]] = {}
    fig_paths: list[Path] = []
    for model in result.models:
        for mode in result.config.modes:
            rel = f"figures/{_safe(model['name'])}_{mode}.png"
            p = figure(model, mode, out_dir / rel)
            if p is not None:
                figs.setdefault(model["name"], []).append((f"{model['name']} {mode}: smallest norm per class per phase", rel))
                fig_paths.append(p)
    blocks = document(result, figs)
    doc = result.to_dict()
    doc["tables"] = [t.to_dict() for t in all_tables(result.models, result.config.modes, result.config.ks)]
    paths = {"json": out_dir / "study.json", "markdown": out_dir / "study.md", "html": out_dir / "study.html"}
    atomic_write_text(paths["json"], json.dumps(doc, indent=1))
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, out_dir))
    return {**paths, "figures": fig_paths}  # type: ignore[dict-item]
