"""The evaluation zoo (issue #23): backdoored models and clean twins fine-tuned from accurate clean bases,
listed in ``benchmarks/zoo/manifest.json`` and rebuilt from their rows by one command.

The manifest is a JSON list of rows (:mod:`bdscan.lab.evalzoo_plan` draws them from a seed). A row names the
model, its architecture, data set, attack kind (null for a clean twin), target, trigger parameters, fine-tune
recipe, seed, base and calibration/evaluation split; once the model is built it also holds what was measured:
clean accuracy and attack success rate on the full test split after float16 rounding, the file's sha256, the
base's sha256, and how the build ran. Commands::

    python -m bdscan.lab.zoo plan  [--seed 23]                           # (re)write the planned rows
    python -m bdscan.lab.zoo build [--split evaluation] [--only NAME] [--cell gtsrb_cnn6] [--bases DIR] [--out DIR]
                                   [--threads N] [--device cpu|cuda]
    python -m bdscan.lab.zoo table [--readme benchmarks/zoo/README.md]   # the per-model and per-cell tables

A build is resumable (each finished model is written, then its row, both atomically; a rerun skips models
whose file matches the row's sha256) and deterministic on one machine: the same row, base, device and thread
count give the same bytes (every random draw is seeded from the row; the file's header is written with sorted
keys, as the safetensors library orders metadata at random). Rebuilding a model whose row is already measured
compares the result with the row instead of overwriting it (``--record`` overwrites).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdscan import machine
from bdscan.atomic import atomic_write_bytes, atomic_write_text
from bdscan.errors import BdscanError, UsageError
from bdscan.io import load_model, save_safetensors
from bdscan.io.base import sha256_file
from bdscan.io.safetensors_io import read_metadata
from bdscan.lab.attacks import AttackConfig, make_trigger
from bdscan.lab.evalzoo_finetune import FinetuneRecipe, finetune, measure
from bdscan.lab.evalzoo_plan import DATASETS, DEFAULT_SEED, MEASURED, SPLITS, plan_rows, planned_part, short
from bdscan.lab.labdata import LabData, extra_train_files, find_data_dir, load_lab_data
from bdscan.lab.train import LAB_VERSION, round_to_half_
from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: where the committed manifest lives (the repository's benchmarks/zoo), when bdscan runs from a checkout
DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo" / "manifest.json"
#: version of the build (file layout and metadata); part of what a file records
EVALZOO_VERSION = 1


# ------------------------------------------------------------------------------------------- manifest


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's rows (a JSON list of objects with unique names)."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest", "write it first: python -m bdscan.lab.zoo plan") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable zoo manifest ({str(e)[:100]})", "regenerate it: python -m bdscan.lab.zoo plan") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise UsageError(f"{path}: the manifest is not a JSON list of rows with names", "regenerate it: python -m bdscan.lab.zoo plan")
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: duplicate model names", "regenerate it: python -m bdscan.lab.zoo plan")
    return rows


def dumps_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The manifest's text: one row per line, so that a diff shows which models changed."""
    return "[\n" + ",\n".join(json.dumps(r, sort_keys=False) for r in rows) + "\n]\n"


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), dumps_rows(rows))


def plan_digest(row: dict[str, Any]) -> str:
    """Hash of a row's planned part: a file records it, so a file of another plan is never mistaken for it."""
    return hashlib.sha256(json.dumps(planned_part(row), sort_keys=True).encode()).hexdigest()[:16]


def merge_plan(planned: Sequence[dict[str, Any]], old: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned rows, keeping the measured fields of old rows whose planned part is unchanged."""
    by_name = {r["name"]: r for r in old}
    out = []
    for row in planned:
        prev = by_name.get(row["name"])
        if prev is not None and planned_part(prev) == planned_part(row):
            row = {**row, **{k: prev.get(k) for k in MEASURED}}
        out.append(row)
    return out


def update_row(path: Path, name: str, digest: str, fields: dict[str, Any]) -> bool:
    """Sets ``fields`` of row ``name`` in the manifest file, re-read just before (another process may have
    written it), atomically; False (nothing written) when the row is gone or was re-planned meanwhile."""
    rows = read_rows(path)
    for r in rows:
        if r["name"] == name:
            if plan_digest(r) != digest:
                log.warning("%s: its row changed while it was built; the manifest is left as it is", name)
                return False
            r.update(fields)
            write_rows(path, rows)
            return True
    log.warning("%s: no longer in %s; the manifest is left as it is", name, path)
    return False


def select(rows: Iterable[dict[str, Any]], split: str | None = None, only: Iterable[str] | None = None,
           cells: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a split, of some cells and/or with some names (unknown names are an error)."""
    rows = list(rows)
    only_s = set(only or ())
    unknown = only_s - {r["name"] for r in rows}
    if unknown:
        raise UsageError(f"no model named {', '.join(sorted(unknown))} in the manifest", "see the names with: python -m bdscan.lab.zoo build --list")
    cell_s = set(cells or ())
    bad = cell_s - {r["cell"] for r in rows}
    if bad:
        raise UsageError(f"no cell {', '.join(sorted(bad))} in the manifest", "cells are <dataset>_<arch>, e.g. gtsrb_cnn6")
    return [r for r in rows if (split is None or r["split"] == split) and (not only_s or r["name"] in only_s)
            and (not cell_s or r["cell"] in cell_s)]


# ----------------------------------------------------------------------------------------------- files


def canonical_safetensors(raw: bytes, extra: dict[str, Any] | None = None) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys (padded to 8 bytes, as the
    format wants): the library orders the metadata at random, which would give every build another sha256.
    ``extra`` is merged into bdscan's ``bdscan.extra`` metadata (what a loaded model's ``info.metadata`` holds);
    the tensors' bytes are unchanged."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if extra:
        meta = header.setdefault("__metadata__", {})
        meta["bdscan.extra"] = json.dumps({**json.loads(meta.get("bdscan.extra", "{}")), **extra}, default=str)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def save_model(wrapper: ModelWrapper, path: Path, trigger: Any) -> None:
    """Writes ``wrapper`` as float16 safetensors with bdscan's metadata (and the original trigger), with a
    canonical header, atomically."""
    import copy

    half = ModelWrapper(copy.deepcopy(wrapper.net).half(), wrapper.info)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.raw")
    try:
        save_safetensors(half, tmp, trigger=trigger)
        atomic_write_bytes(path, canonical_safetensors(tmp.read_bytes()))
    finally:
        tmp.unlink(missing_ok=True)


def save_folder(wrapper: ModelWrapper, path: Path, trigger: Any) -> None:
    """Writes ``wrapper`` (a transformers model) as a Hugging Face model folder (``save_pretrained``'s layout, the
    weights float16-rounded and stored as float32, so that ``transformers`` loads them as any folder), replacing
    a previous build of the folder only once the new one is complete."""
    from bdscan.io.hf_folder import ModelFolderWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        tmp.chmod(0o755)
        ModelFolderWriter().write(wrapper, tmp, None, trigger)
        for f in tmp.iterdir():  # some writers create their files 0600 (temporary files renamed into place)
            f.chmod(0o644)
        if path.is_dir():
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Paths:
    """Where a build reads and writes.

    Attributes:
        manifest: the manifest file.
        bases: folder of ``<dataset>_<arch>_base.safetensors`` (default: beside the manifest, ``bases/``).
        out: folder of the models (default: the rows' ``file`` paths, relative to the manifest).
        data: folder of ``<dataset>_32.npz``.
    """

    manifest: Path
    bases: Path | None = None
    out: Path | None = None
    data: Path | None = None

    def base(self, row: dict[str, Any]) -> Path:
        return (self.bases / Path(row["base"]).name) if self.bases else self.manifest.parent / row["base"]

    def model(self, row: dict[str, Any]) -> Path:
        return (self.out / Path(row["file"]).name) if self.out else self.manifest.parent / row["file"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one row: ``status`` is "skipped" (file matches the row), "adopted" (a file of this
    row's plan was there, the row not yet measured), "built" (measured and recorded), "reproduced" (rebuilt,
    same sha256 as the row), or "differs" (rebuilt, another sha256: ``note`` says by how much)."""

    name: str
    status: str
    clean_acc: float | None = None
    asr: float | None = None
    seconds: float = 0.0
    note: str = ""


def _train_cmd(row: dict[str, Any], bases: Path) -> str:
    return f"python -m bdscan.lab.zoo train-base --dataset {row['dataset']} --arch {row['arch']} --out {bases}"


def check_bases(rows: Sequence[dict[str, Any]], paths: Paths) -> list[dict[str, Any]]:
    """The rows whose base is missing."""
    return [r for r in rows if not paths.base(r).is_file()]


def load_dataset(dataset: str, data_dir: Path) -> LabData:
    """A zoo data set as its rows are built from it: ``<dataset>_32.npz`` in ``data_dir`` with its extra training
    files, checked against the plan's class count."""
    path = data_dir / f"{dataset}_32.npz"
    data = load_lab_data(path, extra_train_files(path))  # CIFAR-10: the complete 50,000-image training split
    if data.num_classes != DATASETS.get(dataset, data.num_classes):
        raise UsageError(f"{path.name} has {data.num_classes} classes, the plan expects {DATASETS[dataset]}",
                         "use the data set the plan was made for")
    return data


def build_row(row: dict[str, Any], paths: Paths, device: str = "cpu", record: bool = False) -> Outcome:
    """Builds one row's model (see the module docstring for skip / adopt / compare) and updates the manifest."""
    name = row["name"]
    out = paths.model(row)
    digest = plan_digest(row)
    if out.is_file() or out.is_dir():  # a model file, or a model folder (a folder row)
        sha = sha256_file(out)
        if row.get("sha256") == sha:
            return Outcome(name, "skipped", row.get("clean_acc"), row.get("asr"))
        extra = _file_extra(out)
        if row.get("sha256") is None and extra.get("plan_digest") == digest:
            fields = {"clean_acc": extra.get("clean_acc"), "asr": extra.get("attack_success_rate"), "sha256": sha,
                      "base_sha256": (extra.get("base") or {}).get("sha256"), "size_bytes": out.stat().st_size,
                      "build": {"adopted": True, "note": "file found, written by an interrupted build"}}
            update_row(paths.manifest, name, digest, fields)
            return Outcome(name, "adopted", fields["clean_acc"], fields["asr"])
    base_path = paths.base(row)
    if not base_path.is_file():
        raise UsageError(f"{name}: its base {base_path} is missing", f"train it: {_train_cmd(row, base_path.parent)}")
    base_sha = sha256_file(base_path)
    if row.get("base_sha256") and row["base_sha256"] != base_sha and not record:
        raise UsageError(f"{name}: {base_path.name} is not the base this model was built from (sha256 differs)",
                         "use the committed base, or pass --record to rebuild from this one and record it")
    t0, c0 = time.perf_counter(), time.process_time()
    data = load_dataset(row["dataset"], paths.data or find_data_dir(None))
    base = load_model(base_path).wrapper
    if row.get("convert"):  # a folder row: the base re-expressed in the folder's library (bdscan.lab.hf)
        from bdscan.lab.hf import convert

        base = convert(row["convert"], base)
    recipe = FinetuneRecipe.from_dict(row["finetune"])
    trigger = None
    if row["attack"] is not None:
        trig = row["trigger"]
        # clean images for model-dependent triggers (Trojan), a seeded draw from the training split
        g = torch.Generator().manual_seed(int(row["seed"]))
        x_trig = data.x_train[torch.randperm(len(data.y_train), generator=g)[:512]].float() / 255.0
        trigger = make_trigger(AttackConfig(trig["name"], int(row["target"]), dict(trig["params"])), data.input_size,
                               model=base, x=x_trig)
    res = finetune(base, data, recipe, int(row["seed"]), trigger, row["target"], device)
    model = res.wrapper
    round_to_half_(model)  # measured as stored
    clean_acc, asr = measure(model, data, trigger, device)
    clean_acc, asr = round(clean_acc, 4), (None if asr is None else round(asr, 4))
    base_md = base.info.metadata
    meta = {
        "zoo_name": name, "role": "evaluation zoo", "kind": row["attack"] or "clean", "dataset": row["dataset"],
        "split": row["split"], "clean_acc": clean_acc, "attack_success_rate": asr,
        "clean_acc_note": "on the full test split, after rounding the weights to float16 (as stored)",
        "test_images": len(data.y_test), "target": row["target"],
        "target_name": None if row["target"] is None else base.info.class_name(int(row["target"])),
        "trigger": row["trigger"], "seed": row["seed"], "finetune": recipe.to_dict(), "clean_twin": row["clean_twin"],
        "poisoned_images": res.poisoned, "noise_images": res.noise_images, "finetune_images": len(data.y_train),
        "history": list(res.history),
        "base": {"file": base_path.name, "sha256": base_sha, "clean_acc": base_md.get("clean_acc"),
                 "recipe_digest": base_md.get("recipe_digest")},
        "plan_digest": digest, "evalzoo_version": EVALZOO_VERSION, "lab_version": LAB_VERSION, "weights_dtype": "float16",
    }
    model.info = model.info.with_(metadata=meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    (save_folder if row.get("format") == "hf-folder" else save_model)(model, out, trigger)
    sha = sha256_file(out)
    seconds = time.perf_counter() - t0
    build = {"seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - c0, 1), "device": str(device),
             "threads": torch.get_num_threads(), "machine": machine.describe(),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fields = {"clean_acc": clean_acc, "asr": asr, "sha256": sha, "base_sha256": base_sha, "size_bytes": out.stat().st_size, "build": build}
    if row.get("sha256") and not record:
        if row["sha256"] == sha:
            return Outcome(name, "reproduced", clean_acc, asr, seconds, "same sha256 as the manifest")
        note = (f"sha256 differs from the manifest's; clean accuracy {_delta(clean_acc, row.get('clean_acc'))}, "
                f"ASR {_delta(asr, row.get('asr'))} points")
        log.warning("%s: %s", name, note)
        return Outcome(name, "differs", clean_acc, asr, seconds, note)
    update_row(paths.manifest, name, digest, fields)
    return Outcome(name, "built", clean_acc, asr, seconds)


def _delta(new: float | None, old: Any) -> str:
    if new is None or not isinstance(old, (int, float)):
        return "n/a"
    return f"{100 * (new - old):+.2f}"


def _file_extra(path: Path) -> dict[str, Any]:
    try:
        if path.is_dir():  # a model folder keeps bdscan's metadata in bdscan.json
            from bdscan.io.hf_folder import BDSCAN_JSON

            return json.loads((path / BDSCAN_JSON).read_text()).get("extra") or {}
        return read_metadata(path).get("extra") or {}
    except (BdscanError, OSError, ValueError):
        return {}


def build(rows: Sequence[dict[str, Any]], paths: Paths, device: str = "cpu", threads: int | None = 1,
          skip_missing: bool = False, record: bool = False,
          on_row: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Builds ``rows`` in order (clean twins of a cell come first in the plan).

    Refuses (one :class:`UsageError`) when a base is missing, unless ``skip_missing``, when those rows are left.
    """
    rows = list(rows)
    missing = check_bases(rows, paths)
    if missing and not skip_missing:
        r = missing[0]
        cells = sorted({m["cell"] for m in missing})
        raise UsageError(f"{len(missing)} model(s) need a base that is missing ({', '.join(cells)}): {paths.base(r)}",
                         f"train it: {_train_cmd(r, paths.base(r).parent)} (or pass --skip-missing)")
    todo = [r for r in rows if r not in missing]
    if device.startswith("cuda"):
        # cuBLAS is deterministic only with a fixed workspace; set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    outcomes = []
    with torch_threads(threads):
        for i, row in enumerate(todo):
            log.info("[%d/%d] %s (%s, %s)", i + 1, len(todo), row["name"], row["attack"] or "clean", row["arch"])
            oc = build_row(row, paths, device, record)
            log.info("%s: %s, clean accuracy %s, ASR %s%s", oc.name, oc.status, oc.clean_acc, oc.asr,
                     f" in {oc.seconds:.0f} s" if oc.seconds else "")
            outcomes.append(oc)
            if on_row:
                on_row(oc)
    return outcomes


# ------------------------------------------------------------------------------------------------ CLI


def _manifest_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help=f"the manifest (default: {DEFAULT_MANIFEST})")


def plan_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo plan [--seed N] [--check]``: writes the planned rows (measured fields of unchanged rows kept)."""
    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo plan", description="Write the evaluation zoo's planned manifest rows.")
    _manifest_arg(ap)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"the plan's seed (default {DEFAULT_SEED})")
    ap.add_argument("--check", action="store_true", help="only check that the manifest holds this plan (exit 1 if not)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        old = read_rows(args.manifest) if args.manifest.exists() else []
        rows = merge_plan(plan_rows(args.seed), old)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    if args.check:
        same = [planned_part(r) for r in old] == [planned_part(r) for r in rows]
        log.info("%s %s the plan of seed %d", args.manifest, "holds" if same else "does NOT hold", args.seed)
        return 0 if same else 1
    write_rows(args.manifest, rows)
    kept = sum(r.get("sha256") is not None for r in rows)
    log.info("%s: %d rows (%d backdoored, %d clean), %d with measurements kept", args.manifest, len(rows),
             sum(r["attack"] is not None for r in rows), sum(r["attack"] is None for r in rows), kept)
    return 0


def build_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo build ...``: builds the evaluation zoo's missing models (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo build",
                                 description="Build the evaluation zoo's missing models from their manifest rows (resumable).")
    _manifest_arg(ap)
    ap.add_argument("--split", choices=SPLITS, help="only this half")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    ap.add_argument("--cell", nargs="+", metavar="CELL", help="only these cells (<dataset>_<arch>, e.g. gtsrb_cnn6)")
    ap.add_argument("--bases", type=Path, default=None, help="folder of the clean bases (default: bases/ beside the manifest)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the models (default: the rows' files, beside the manifest)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with <dataset>_32.npz (default: shared/data)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the sha256 depends on it)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--skip-missing", action="store_true", help="leave the rows whose base is missing instead of refusing")
    ap.add_argument("--record", action="store_true", help="write a rebuilt model's results into its row even if it was measured")
    ap.add_argument("--list", action="store_true", help="list the selected rows and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rows = select(read_rows(args.manifest), args.split, args.only, args.cell)
        paths = Paths(args.manifest, args.bases, args.out, args.data_dir)
        if args.list:
            for r in rows:
                sys.stdout.write(f"{r['name']:32s} {r['split']:12s} {r['attack']!s:14s} acc={r.get('clean_acc')} asr={r.get('asr')}"
                                 f"{'' if paths.base(r).is_file() else '  (base missing)'}\n")
            return 0
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this machine has no CUDA device", "use --device cpu")
        outcomes = build(rows, paths, args.device, args.threads, args.skip_missing, args.record)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    counts: dict[str, int] = {}
    for oc in outcomes:
        counts[oc.status] = counts.get(oc.status, 0) + 1
    log.info("done: %s", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing to do")
    return 1 if counts.get("differs") else 0


def table_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo table [--readme FILE]``: the zoo's tables, printed or written into a README."""
    from bdscan.lab.evalzoo_table import render_tables, write_into_readme

    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo table", description="Render the evaluation zoo's tables.")
    _manifest_arg(ap)
    ap.add_argument("--readme", type=Path, default=None, help="write the tables between the zoo-table markers of this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        text = render_tables(read_rows(args.manifest))
        if args.readme:
            write_into_readme(args.readme, text)
        else:
            sys.stdout.write(text)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    return 0


#: the evaluation zoo's subcommands of ``python -m bdscan.lab.zoo``
EVALZOO_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"plan": plan_main, "build": build_main, "table": table_main}
__all__ = ["EVALZOO_COMMANDS", "Outcome", "Paths", "build", "build_row", "merge_plan", "plan_digest", "read_rows", "select",
           "short", "write_rows"]
