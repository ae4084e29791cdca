"""The bundled sample models (``sample_models/``): a few accurate models of the evaluation zoo, ready to scan.

Each sample is a copy of one evaluation-zoo row's file (:mod:`bdscan.lab.evalzoo`) whose bdscan metadata
(``bdscan.extra``) gains three keys: ``samples`` (the bundled clean sample set beside it, ``<dataset>_samples.npz``, which a scan
uses when no ``--data`` is given), ``sample_of`` (the zoo row) and ``zoo_sha256`` (the row's file). The tensors
are the row's, byte for byte, so every accuracy and attack success rate in the zoo's manifest holds for the
copy. One command copies them and rewrites ``sample_models/README.md`` from the manifest::

    python -m bdscan.lab.zoo samples [--out sample_models] [--check]

``--check`` rebuilds every copy in memory and compares it with the bundled file (exit 1 if one differs or is
missing), so the bundle cannot drift from the zoo unnoticed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdscan.atomic import atomic_write_bytes, atomic_write_text
from bdscan.errors import BdscanError, UsageError
from bdscan.lab.evalzoo import DEFAULT_MANIFEST, canonical_safetensors, read_rows
from bdscan.lab.evalzoo_table import trigger_summary, twin_acc
from bdscan.lab.labdata import find_data_dir, samples_file_name, write_samples

log = logging.getLogger(__name__)

#: the repository's bundled folder, when bdscan runs from a checkout
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "sample_models"


@dataclass(frozen=True)
class SampleModel:
    """One bundled model.

    Attributes:
        row: the evaluation-zoo row it is copied from.
        file: its file name in ``sample_models/``.
        role: what it is there for (one line of the README).
    """

    row: str
    file: str
    role: str


#: The bundle, in the README's order. Calibration-half rows only: the evaluation half stays unseen by anyone
#: tuning on what they see in the samples.
SAMPLE_SET: tuple[SampleModel, ...] = (
    SampleModel("cifar10_vit_trojan", "cifar10_vit_trojan.safetensors",
                "the README's demo: a Vision Transformer with an optimised (Trojan) patch"),
    SampleModel("cifar10_vit_clean1", "cifar10_vit_clean.safetensors", "the demo's clean twin"),
    SampleModel("cifar10_cct_trojan", "cifar10_cct_trojan.safetensors",
                "a Compact Convolutional Transformer with an optimised (Trojan) patch"),
    SampleModel("cifar10_cct_clean1", "cifar10_cct_clean.safetensors", "its clean twin"),
    SampleModel("gtsrb_cnn6_badnets_grid", "gtsrb_cnn6_badnets.safetensors", "a 6-layer CNN with a 4-px patch"),
    SampleModel("gtsrb_cnn6_clean1", "gtsrb_cnn6_clean.safetensors", "its clean twin"),
    SampleModel("gtsrb_vit_trojan", "gtsrb_vit_trojan.safetensors", "a ViT with an optimised (Trojan) patch"),
    SampleModel("gtsrb_vit_clean2", "gtsrb_vit_clean.safetensors", "its clean twin"),
    SampleModel("gtsrb_resnet18_blended", "gtsrb_resnet18_blended.safetensors",
                "a ResNet-18 with a picture blended over the whole image (α 0.14)"),
)
#: the model the README's first command scans, and its clean twin
DEMO, DEMO_TWIN = SAMPLE_SET[0], SAMPLE_SET[1]


def _row_file(row: dict[str, Any], manifest: Path) -> Path:
    path = manifest.parent / row["file"]
    if row.get("sha256") is None:
        raise UsageError(f"{row['name']}: not built yet", f"run: python -m bdscan.lab.zoo build --only {row['name']}")
    if not path.is_file():
        what = "a model folder, not a file" if path.is_dir() else "missing"
        raise UsageError(f"{row['name']}: {path} is {what}", "choose a built safetensors row of the evaluation zoo")
    return path


def sample_bytes(sample: SampleModel, rows: dict[str, dict[str, Any]], manifest: Path) -> bytes:
    """The bundled file of ``sample``, from its zoo row's file (whose sha256 must match the row)."""
    row = rows.get(sample.row)
    if row is None:
        raise UsageError(f"{sample.row}: no such row in {manifest}", "name a row of the evaluation zoo's manifest")
    raw = _row_file(row, manifest).read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != row["sha256"]:
        raise UsageError(f"{sample.row}: the file's sha256 {got[:12]} is not the row's {row['sha256'][:12]}",
                         f"rebuild it: python -m bdscan.lab.zoo build --only {sample.row}")
    return canonical_safetensors(raw, {"samples": samples_file_name(row["dataset"]), "sample_of": sample.row,
                               "zoo_sha256": row["sha256"]})


def render_readme(samples: Sequence[SampleModel], rows: dict[str, dict[str, Any]], sizes: dict[str, int]) -> str:
    """``sample_models/README.md``: what each bundled model is, measured figures from the zoo's manifest."""
    lines = [
        "# bdscan sample models",
        "",
        "Accurate clean and backdoored classifiers for trying `bdscan`, copied from the evaluation zoo",
        "([benchmarks/zoo](../benchmarks/zoo/README.md), its calibration half) by `python -m bdscan.lab.zoo samples`,",
        "which also writes this file. Every model was trained from scratch at 32×32 on a 2-core CPU: an accurate clean",
        "base per architecture and data set (strong augmentation, label smoothing, cosine schedule), then fine-tuned on",
        "poisoned data (the backdoored models) or on clean data with another seed (the clean twins).",
        "",
        "* Clean accuracy and attack success rate (ASR: the share of triggered test images not of the target class that",
        "  the model assigns to the target) are the zoo manifest's, measured on the **full test split** after rounding the",
        "  weights to float16, as stored.",
        "* The tensors are the zoo row's, byte for byte; the metadata gains `samples` (the clean sample set beside the",
        "  model, used when a scan is given no `--data`), `sample_of` (the zoo row) and `zoo_sha256` (the row's file).",
        "  `python -m bdscan.lab.zoo samples --check` verifies every copy against its row.",
        "* Backdoored models carry their original trigger (`bdscan.trigger.mask` / `.pattern`), which reports show",
        "  beside the reversed one.",
        "* `gtsrb_samples.npz`, `cifar10_samples.npz`: 20 test images per class (seed 0), `x` uint8 NHWC, `y`, `class_names`.",
        "",
        "| file | what it is | architecture | data set | attack, trigger | target | clean accuracy | twin's accuracy | ASR | zoo row | size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in samples:
        r = rows[s.row]
        bd = r["attack"] is not None
        target = f"{r['target']}" if bd else ""
        attack = f"{r['attack']}, {trigger_summary(r)}" if bd else "clean"
        twin = twin_acc(r, rows) if bd else None
        twin_s = "" if twin is None else f"{100 * twin:.2f} %"
        asr_s = f"{100 * r['asr']:.2f} %" if bd else ""
        lines.append(f"| `{s.file}` | {s.role} | {r['arch']} | {r['dataset']} | {attack} | {target} | {100 * r['clean_acc']:.2f} % | "
                     f"{twin_s} | {asr_s} | {s.row} ({r['split']}) | {sizes[s.file] / 1e6:.1f} MB |")
    lines += ["", "Try one (the scan finds the clean samples beside it):", "", "```bash",
              f"bdscan scan sample_models/{DEMO.file} --out scan-out --report report.html", "```", ""]
    return "\n".join(lines)


def write_samples_folder(out: Path, manifest: Path = DEFAULT_MANIFEST, samples: Sequence[SampleModel] | None = None,
                         data_dir: Path | None = None) -> list[Path]:
    """Copies ``samples`` into ``out`` (each atomically, only when its bytes change), writes a data set's clean sample
    set (20 test images per class, seed 0) where it is missing, and rewrites the README.

    Args:
        out: the sample folder.
        manifest: the evaluation zoo's manifest.
        samples: what to bundle (default: :data:`SAMPLE_SET`).
        data_dir: folder with ``<dataset>_32.npz``, for a missing sample set.

    Returns:
        The files written.

    Raises:
        UsageError: a row is unknown or not built, or its file does not match the row (nothing is written then),
            or a sample set is missing and the training data cannot be found.
    """
    samples = SAMPLE_SET if samples is None else samples
    rows = {r["name"]: r for r in read_rows(manifest)}
    blobs = {s.file: sample_bytes(s, rows, manifest) for s in samples}  # every row checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in dict.fromkeys(rows[s.row]["dataset"] for s in samples):
        npz = out / samples_file_name(dataset)
        if not npz.is_file():
            written.append(write_samples(find_data_dir(data_dir) / f"{dataset}_32.npz", npz))
    for name, blob in blobs.items():
        path = out / name
        if not path.is_file() or path.read_bytes() != blob:
            atomic_write_bytes(path, blob)
            written.append(path)
    atomic_write_text(out / "README.md", render_readme(samples, rows, {k: len(v) for k, v in blobs.items()}))
    return written


def check_samples_folder(out: Path, manifest: Path = DEFAULT_MANIFEST, samples: Sequence[SampleModel] | None = None) -> list[str]:
    """What is wrong with the bundle in ``out`` (empty when every copy is exactly what its row gives); ``samples``
    defaults to :data:`SAMPLE_SET`."""
    samples = SAMPLE_SET if samples is None else samples
    rows = {r["name"]: r for r in read_rows(manifest)}
    problems = []
    for s in samples:
        path = out / s.file
        want = sample_bytes(s, rows, manifest)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != want:
            problems.append(f"{path}: differs from what row {s.row} gives")
    return problems


def samples_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo samples [--out DIR] [--manifest FILE] [--check]``."""
    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo samples",
                                 description="Copy the bundled sample models from the evaluation zoo and rewrite their README.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the sample folder (default: {DEFAULT_OUT})")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help=f"the zoo's manifest (default: {DEFAULT_MANIFEST})")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with <dataset>_32.npz, for a missing sample set (default: shared/data)")
    ap.add_argument("--check", action="store_true", help="only verify the bundled copies (exit 1 if one differs or is missing)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.check:
            problems = check_samples_folder(args.out, args.manifest)
            for p in problems:
                sys.stderr.write(f"{p}\n")
            log.info("%d of %d sample models as their rows give", len(SAMPLE_SET) - len(problems), len(SAMPLE_SET))
            return 1 if problems else 0
        written = write_samples_folder(args.out, args.manifest, data_dir=args.data_dir)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    log.info("%s: %d sample models, %d files written; README.md rewritten", args.out, len(SAMPLE_SET), len(written))
    return 0


__all__ = ["DEMO", "DEMO_TWIN", "SAMPLE_SET", "SampleModel", "check_samples_folder", "render_readme", "sample_bytes", "samples_main",
           "write_samples_folder"]
