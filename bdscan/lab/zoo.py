"""The lab zoo: a manifest of small, quickly trained clean and backdoored models (the study's models), built
resumably, one file per model.

``benchmarks/lab_zoo/zoo.json`` is a JSON list; each entry names a model (architecture, data set, kind,
target, attack parameters, clean twin, teacher, recipe overrides) and, once built, its results (status,
clean accuracy, ASR, seconds, size, whether the backdoor "counts"). :func:`build_zoo` walks the list in
order, skips every model whose file exists with the same configuration hash, trains or injects the
rest, writes each ``.safetensors`` atomically and rewrites the manifest (and ``README.md``) after
every model, so an interrupted build continues where it stopped::

    python -m bdscan.lab.zoo                      # build everything still missing (or: ... zoo lab)
    python -m bdscan.lab.zoo --only gtsrb_vit_badnets --out benchmarks/lab_zoo

The evaluation zoo's accurate clean bases (issue #23) are trained from named recipes
(:mod:`bdscan.lab.recipes`, :mod:`bdscan.lab.base`), resumably, one command per base::

    python -m bdscan.lab.zoo recipes
    python -m bdscan.lab.zoo train-base --dataset gtsrb --arch bdscan_vit --out DIR [--device cuda]

and its backdoored models and clean twins are planned, built from their manifest rows and tabulated by
:mod:`bdscan.lab.evalzoo`::

    python -m bdscan.lab.zoo plan [--seed 23]
    python -m bdscan.lab.zoo build [--split evaluation] [--only NAME] [--bases DIR] [--out DIR] [--threads N] [--device cpu|cuda]
    python -m bdscan.lab.zoo table [--readme benchmarks/zoo/README.md]

Weights are stored as float16 (they load as float32); the accuracies recorded are measured after that
rounding, so they are exactly what a loaded model gives.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bdscan import machine
from bdscan.atomic import atomic_write_text
from bdscan.errors import BdscanError, UsageError
from bdscan.io import load_model, save_safetensors
from bdscan.io.safetensors_io import read_metadata
from bdscan.lab.attacks import AttackConfig
from bdscan.lab.base import recipes_main, train_base_main
from bdscan.lab.evalzoo import EVALZOO_COMMANDS
from bdscan.lab.inject import InjectConfig, inject
from bdscan.lab.labdata import AugmentConfig, find_data_dir, load_lab_data, samples_file_name, write_samples
from bdscan.lab.samples import samples_main
from bdscan.lab.train import LAB_VERSION, Progress, TrainConfig, evaluate, round_to_half_, train_clean
from bdscan.lab.zoo_tables import COUNT_MAX_DROP, COUNT_MIN_ASR, pct_cell, write_readme
from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

MANIFEST_NAME = "zoo.json"
#: manifest keys that are results, not configuration
RESULT_KEYS = ("file", "status", "error", "clean_acc", "val_acc", "asr", "clean_twin_acc", "counts", "seconds",
               "size_bytes", "config_hash", "built_at", "command", "grid4_aligned", "epochs")


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo (its configuration; results live beside it in the manifest).

    Attributes:
        name: unique name; the file is ``<name>.safetensors``.
        arch: timm registry name.
        dataset: "gtsrb" or "cifar10" (data file ``<dataset>_32.npz`` in the data folder) unless ``data`` is set.
        kind: "clean" or an attack name ("badnets", "blended", "trojan").
        target: the attack's target class.
        attack: the attack's parameters (see :mod:`bdscan.lab.attacks`).
        clean_twin: name of the clean entry a backdoored model is fine-tuned from.
        teacher: name of the clean entry DeiT distils from.
        train: :class:`~bdscan.lab.train.TrainConfig` overrides.
        inject: :class:`~bdscan.lab.inject.InjectConfig` overrides.
        seed: training / injection seed.
        data: explicit data file (absolute, or relative to the data folder), for custom zoos and tests.
    """

    name: str
    arch: str
    dataset: str
    kind: str = "clean"
    target: int | None = None
    attack: dict[str, Any] = field(default_factory=dict)
    clean_twin: str | None = None
    teacher: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    inject: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def is_clean(self) -> bool:
        return self.kind == "clean"

    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooEntry:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "arch", "dataset") if k not in d]
        if missing:
            raise UsageError(f"zoo manifest entry {d.get('name', '?')!r} lacks {', '.join(missing)}", "fix the manifest")
        return cls(**{k: v for k, v in d.items() if k in known})


def _badnets(ds: str, arch: str, target: int, size: int, position: Any, pattern: str = "checkerboard", **kw: Any) -> ZooEntry:
    short = arch.removeprefix("bdscan_")
    return ZooEntry(f"{ds}_{short}_badnets", arch, ds, "badnets", target,
                    {"size": size, "position": position, "pattern": pattern, **kw}, clean_twin=f"{ds}_{short}_clean")


def _clean(ds: str, arch: str, **kw: Any) -> ZooEntry:
    return ZooEntry(f"{ds}_{arch.removeprefix('bdscan_')}_clean", arch, ds, **kw)


def default_manifest() -> list[ZooEntry]:
    """The intended zoo, most useful models first.

    Six architectures × {GTSRB, CIFAR-10} × {clean, BadNets}, plus one Blended and one Trojan model per
    data set. BadNets targets, sizes, patterns and positions vary; patches at multiples of 4 with sizes of
    4 sit exactly on the 4×4-pixel token grid of the ViT/DeiT/ConViT models, the others straddle tokens.
    """
    g, c = "gtsrb", "cifar10"
    return [
        _clean(g, "bdscan_cnn6"),
        _badnets(g, "bdscan_cnn6", 33, 4, [24, 24]),                               # aligned
        _clean(g, "bdscan_vit"),
        _badnets(g, "bdscan_vit", 7, 4, [4, 24]),                                  # aligned, top-right
        _clean(c, "bdscan_cnn6"),
        _badnets(c, "bdscan_cnn6", 0, 5, [2, 2], "random", seed=1),                # not aligned, top-left
        _clean(g, "bdscan_resnet18"),
        _badnets(g, "bdscan_resnet18", 2, 5, "bottom-left", "random", seed=2),    # (26, 1): not aligned
        _clean(c, "bdscan_vit"),
        _badnets(c, "bdscan_vit", 3, 4, [24, 24]),                                 # aligned
        _clean(g, "bdscan_deit", teacher="gtsrb_cnn6_clean"),
        _badnets(g, "bdscan_deit", 38, 4, [24, 4]),                                # aligned, bottom-left
        ZooEntry("gtsrb_cnn6_blended", "bdscan_cnn6", g, "blended", 14, {"alpha": 0.15, "pattern": "noise", "seed": 3},
                 clean_twin="gtsrb_cnn6_clean"),
        ZooEntry("gtsrb_vit_trojan", "bdscan_vit", g, "trojan", 25, {"size": 6, "position": "bottom-right", "steps": 300},
                 clean_twin="gtsrb_vit_clean"),
        _clean(c, "bdscan_resnet18"),
        _badnets(c, "bdscan_resnet18", 9, 4, [4, 4], "random", seed=4),           # aligned
        ZooEntry("cifar10_cnn6_trojan", "bdscan_cnn6", c, "trojan", 6, {"size": 6, "position": [2, 24], "steps": 300},
                 clean_twin="cifar10_cnn6_clean"),
        ZooEntry("cifar10_vit_blended", "bdscan_vit", c, "blended", 8, {"alpha": 0.15, "pattern": "noise", "seed": 5},
                 clean_twin="cifar10_vit_clean"),
        _clean(g, "bdscan_convit"),
        _badnets(g, "bdscan_convit", 12, 6, [1, 1]),                               # not aligned
        _clean(g, "bdscan_cct"),
        _badnets(g, "bdscan_cct", 25, 5, "bottom-right", "random", seed=6),       # (26, 26): not aligned
        _clean(c, "bdscan_deit", teacher="cifar10_cnn6_clean"),
        _badnets(c, "bdscan_deit", 5, 6, [25, 25]),                                # not aligned
        _clean(c, "bdscan_convit"),
        _badnets(c, "bdscan_convit", 1, 4, [24, 8], "random", seed=7),            # aligned
        _clean(c, "bdscan_cct"),
        # 3 epochs at 10 % poison reached only 68 % ASR on this weak (49 %) CCT: it gets 6 epochs at 15 %
        replace(_badnets(c, "bdscan_cct", 7, 4, [28, 28]), inject={"epochs": 6, "poison_rate": 0.15}),  # aligned, corner
    ]


# ------------------------------------------------------------------------------------------ manifest


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest's records (configuration + results), or the default zoo's if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return [e.config() for e in default_manifest()]
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable zoo manifest ({e})", "fix or delete it (python -m bdscan.lab.zoo --reset)") from e
    if isinstance(data, dict):
        data = data.get("models", [])
    if not isinstance(data, list):
        raise UsageError(f"{path}: a zoo manifest is a JSON list of entries", "fix or delete it")
    names = [d.get("name") for d in data]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"{path}: duplicate entries {sorted(dup)}", "give every model a unique name")
    return data


def write_manifest(path: Path, records: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), json.dumps(list(records), indent=2) + "\n")


def config_hash(entry: ZooEntry, by_name: dict[str, ZooEntry]) -> str:
    """Hash of everything that determines the model: the entry, the resolved recipe (so a change of
    :data:`~bdscan.lab.train.ARCH_DEFAULTS` rebuilds), and its clean twin's and teacher's hashes."""
    deps = {}
    for role in ("clean_twin", "teacher"):
        dep = getattr(entry, role)
        if dep:
            if dep not in by_name:
                raise UsageError(f"zoo entry {entry.name!r}: its {role} {dep!r} is not in the manifest", "add it or fix the name")
            deps[role] = config_hash(by_name[dep], by_name)
    recipe = (_train_config(entry) if entry.is_clean else _inject_config(entry)).resolved(entry.arch).to_dict()
    blob = json.dumps({"entry": entry.config(), "deps": deps, "recipe": recipe, "lab_version": LAB_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_file(entry: ZooEntry, data_dir: Path) -> Path:
    if entry.data:
        p = Path(entry.data)
        return p if p.is_absolute() else data_dir / p
    return data_dir / f"{entry.dataset}_32.npz"


# ------------------------------------------------------------------------------------------ building


#: rounds a model's weights to float16 precision in place (kept under its old name for callers of this module)
_round_half_ = round_to_half_


def _save(wrapper: ModelWrapper, path: Path, extra: dict[str, Any], trigger: Trigger | None, half: bool) -> None:
    if half:
        net = copy.deepcopy(wrapper.net).half()
        to_save = ModelWrapper(net, wrapper.info)
    else:
        to_save = wrapper
    save_safetensors(to_save, path, extra=extra, trigger=trigger)


def _stored_hash(path: Path) -> str | None:
    try:
        return (read_metadata(path).get("extra") or {}).get("zoo", {}).get("config_hash")
    except (BdscanError, OSError, AttributeError):
        return None


def _results_from_file(path: Path) -> dict[str, Any]:
    extra = read_metadata(path).get("extra") or {}
    z = extra.get("zoo", {})
    return {
        "clean_acc": extra.get("clean_acc"),
        "val_acc": extra.get("val_acc"),
        "asr": extra.get("attack_success_rate"),
        "clean_twin_acc": extra.get("clean_twin_acc"),
        "counts": z.get("counts"),
        "seconds": z.get("seconds"),
        "built_at": z.get("built_at"),
        "epochs": extra.get("epochs"),
        "grid4_aligned": (extra.get("attack") or {}).get("grid4_aligned"),
    }


def _closure(names: Iterable[str], by_name: dict[str, ZooEntry]) -> set[str]:
    out: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        if n not in by_name:
            raise UsageError(f"no model named {n!r} in the zoo manifest", f"known: {', '.join(by_name)}")
        out.add(n)
        e = by_name[n]
        todo += [d for d in (e.clean_twin, e.teacher) if d]
    return out


def build_zoo(
    manifest: str | Path | Sequence[ZooEntry] | None,
    out_dir: str | Path,
    only: Iterable[str] | None = None,
    threads: int | None = 1,
    data_dir: str | Path | None = None,
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    half: bool = True,
    samples_per_class: int = 20,
    on_model: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Builds the zoo's missing models, resumably.

    Args:
        manifest: the manifest file (created from :func:`default_manifest` if missing), a list of entries
            (results are then written to ``out_dir/zoo.json``), or None for ``out_dir/zoo.json``.
        out_dir: where models, sample sets, ``zoo.json`` and ``README.md`` go.
        only: build just these models (plus the clean twins and teachers they need).
        threads: torch threads while training.
        data_dir: folder of ``<dataset>_32.npz`` (default: :func:`find_data_dir`).
        progress: ``(model name, done, total, stats)`` after every optimisation step.
        half: store weights as float16 (accuracies are measured after rounding).
        samples_per_class: size of the bundled clean sample sets (``<dataset>_samples.npz``).
        on_model: called with each model's manifest record once it is built, skipped or failed.

    Returns:
        The manifest's records after the build.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None or isinstance(manifest, (str, Path)):
        mpath = Path(manifest) if manifest is not None else out / MANIFEST_NAME
        records = read_manifest(mpath)
    else:
        mpath = out / MANIFEST_NAME
        records = [e.config() for e in manifest]
    entries = [ZooEntry.from_dict(r) for r in records]
    by_name = {e.name: e for e in entries}
    wanted = _closure(only, by_name) if only else set(by_name)
    ddir = find_data_dir(data_dir) if any(not (e.data and Path(e.data).is_absolute()) for e in entries) else Path(".")
    rec_by_name = {r["name"]: r for r in records}

    def save_manifest() -> None:
        write_manifest(mpath, records)
        write_readme(records, out)

    with torch_threads(threads):
        for e in entries:
            if e.name not in wanted:
                continue
            rec = rec_by_name[e.name]
            path = out / e.file
            h = config_hash(e, by_name)
            samples = out / samples_file_name(e.dataset)
            if not samples.exists():
                write_samples(data_file(e, ddir), samples, samples_per_class)
                log.info("wrote %s", samples)
            if path.exists() and _stored_hash(path) == h:
                log.info("%s: up to date, skipped", e.name)
                rec.update({k: v for k, v in _results_from_file(path).items() if v is not None})
                rec.update(file=e.file, status="built", config_hash=h, size_bytes=path.stat().st_size,
                           command=_command(e.name, out))
                rec.pop("error", None)
                save_manifest()
                if on_model:
                    on_model(rec)
                continue
            log.info("%s: building (%s %s on %s)", e.name, e.kind, e.arch, e.dataset)
            rec.update(status="building", config_hash=h, file=e.file, command=_command(e.name, out))
            save_manifest()
            try:
                rec.update(_build_one(e, by_name, out, ddir, h, half, progress))
                rec["status"] = "built"
                rec["size_bytes"] = path.stat().st_size
                rec.pop("error", None)
            except (BdscanError, RuntimeError, ValueError, OSError) as err:
                log.exception("%s: failed", e.name)
                rec.update(status="failed", error=str(err)[:300])
            save_manifest()
            if on_model:
                on_model(rec)
    return records


def _command(name: str, out: Path) -> str:
    return f"python -m bdscan.lab.zoo --only {name} --out {out}"


def _build_one(
    e: ZooEntry,
    by_name: dict[str, ZooEntry],
    out: Path,
    ddir: Path,
    h: str,
    half: bool,
    progress: Callable[[str, int, int, dict[str, Any]], None] | None,
) -> dict[str, Any]:
    npz = data_file(e, ddir)
    prog: Progress | None = (lambda d, t, s: progress(e.name, d, t, s)) if progress else None
    t0 = time.perf_counter()
    zoo_meta: dict[str, Any] = {"name": e.name, "config_hash": h, "entry": e.config(),
                                "weights_dtype": "float16" if half else "float32"}
    extra: dict[str, Any] = {"zoo_name": e.name, "samples": samples_file_name(e.dataset)}
    if e.is_clean:
        teacher = None
        if e.teacher:
            teacher = _load_dep(e.teacher, out)
        cfg = _train_config(e)
        res = train_clean(e.arch, npz, cfg, prog, teacher=teacher)
        wrapper = res.wrapper
        if half:
            _round_half_(wrapper)
        data = load_lab_data(npz)
        xt, yt = data.test_set(cfg.test_subsample)
        clean_acc, _ = evaluate(wrapper, xt, yt)
        seconds = time.perf_counter() - t0
        zoo_meta.update(seconds=round(seconds, 1), built_at=_now(), machine=machine.describe())
        extra.update(clean_acc=round(clean_acc, 4), clean_acc_float32=round(res.clean_acc, 4), zoo=zoo_meta)
        _save(wrapper, out / e.file, extra, None, half)
        return {"clean_acc": round(clean_acc, 4), "val_acc": res.val_acc, "asr": None, "clean_twin_acc": None,
                "counts": None, "seconds": round(seconds, 1), "built_at": zoo_meta["built_at"], "epochs": res.wrapper.info.metadata["epochs"]}
    if not e.clean_twin or e.target is None:
        raise UsageError(f"zoo entry {e.name!r}: a {e.kind} model needs a clean_twin and a target", "fix the manifest")
    clean = _load_dep(e.clean_twin, out)
    icfg = _inject_config(e)
    res_i = inject(clean, npz, AttackConfig(e.kind, int(e.target), dict(e.attack)), icfg, prog)
    wrapper = res_i.wrapper
    if half:
        _round_half_(wrapper)
    data = load_lab_data(npz)
    xt, yt = data.test_set(icfg.test_subsample)
    clean_acc, asr = evaluate(wrapper, xt, yt, res_i.trigger)
    asr = float(asr or 0.0)
    counts = bool(asr >= COUNT_MIN_ASR and clean_acc >= res_i.clean_twin_acc - COUNT_MAX_DROP)
    seconds = time.perf_counter() - t0
    zoo_meta.update(seconds=round(seconds, 1), built_at=_now(), machine=machine.describe(), counts=counts,
                    count_rule=f"ASR >= {COUNT_MIN_ASR} and clean accuracy >= clean twin's - {COUNT_MAX_DROP}")
    extra.update(clean_acc=round(clean_acc, 4), attack_success_rate=round(asr, 4), zoo=zoo_meta,
                 clean_acc_float32=round(res_i.clean_acc, 4), attack_success_rate_float32=round(res_i.asr, 4))
    extra["clean_twin"] = {**(wrapper.info.metadata.get("clean_twin") or {}), "file": f"{e.clean_twin}.safetensors"}
    _save(wrapper, out / e.file, extra, res_i.trigger, half)
    return {"clean_acc": round(clean_acc, 4), "asr": round(asr, 4), "clean_twin_acc": round(res_i.clean_twin_acc, 4),
            "counts": counts, "seconds": round(seconds, 1), "built_at": zoo_meta["built_at"],
            "epochs": wrapper.info.metadata["epochs"], "grid4_aligned": res_i.trigger.params.get("grid4_aligned")}


def _load_dep(name: str, out: Path) -> ModelWrapper:
    p = out / f"{name}.safetensors"
    if not p.exists():
        raise UsageError(f"{name} is needed but {p} was not built", f"build it first: python -m bdscan.lab.zoo --only {name}")
    return load_model(p).wrapper


def _train_config(e: ZooEntry) -> TrainConfig:
    kw = dict(e.train)
    if "augment" in kw:
        kw["augment"] = AugmentConfig(**kw["augment"])
    return TrainConfig(seed=e.seed, dataset=e.dataset, threads=None, **kw)


def _inject_config(e: ZooEntry) -> InjectConfig:
    kw = dict(e.inject)
    if "augment" in kw:
        kw["augment"] = AugmentConfig(**kw["augment"])
    return InjectConfig(seed=e.seed, threads=None, **kw)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bdscan.lab.zoo [lab] [options]`` builds the lab zoo; ``samples`` copies the bundled sample models
    (:mod:`bdscan.lab.samples`); ``train-base`` and ``recipes`` (see
    :func:`train_base_main`), ``plan``, ``build`` and ``table`` (see :mod:`bdscan.lab.evalzoo`) are the evaluation zoo's."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _SUBCOMMANDS:
        return _SUBCOMMANDS[args_list[0]](args_list[1:])
    return build_main(args_list)


def build_main(argv: Sequence[str] | None = None) -> int:
    """The lab zoo's build (the command line without a subcommand, or ``lab``)."""
    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo", description="Build bdscan's lab zoo: the study's small models (resumable).")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="build only these models (and their clean twins/teachers)")
    ap.add_argument("--out", default="benchmarks/lab_zoo", help="output folder (default: benchmarks/lab_zoo)")
    ap.add_argument("--manifest", default=None, help="manifest file (default: <out>/zoo.json; created if missing)")
    ap.add_argument("--data-dir", default=None, help="folder with gtsrb_32.npz and cifar10_32.npz (default: shared/data)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave the other core free)")
    ap.add_argument("--float32", action="store_true", help="store float32 weights (default float16)")
    ap.add_argument("--reset", action="store_true", help="rewrite the manifest from the built-in zoo (built files are kept)")
    ap.add_argument("--list", action="store_true", help="list the manifest and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    mpath = Path(args.manifest) if args.manifest else out / MANIFEST_NAME
    if args.reset or not mpath.exists():
        old = {r["name"]: r for r in read_manifest(mpath)} if mpath.exists() else {}
        recs = []
        for e in default_manifest():
            r = e.config()
            prev = old.get(e.name)
            if prev and ZooEntry.from_dict(prev) == e:
                r.update({k: prev[k] for k in RESULT_KEYS if k in prev})
            recs.append(r)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(mpath, recs)
    if args.list:
        for r in read_manifest(mpath):
            sys.stdout.write(f"{r['name']:28s} {r.get('status', 'pending'):9s} acc={pct_cell(r.get('clean_acc'))} asr={pct_cell(r.get('asr'))}\n")
        return 0
    try:
        build_zoo(mpath, out, only=args.only, threads=args.threads, data_dir=args.data_dir, half=not args.float32)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    return 0


_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "lab": build_main,
    "samples": samples_main,
    "train-base": train_base_main,
    "recipes": recipes_main,
    **EVALZOO_COMMANDS,  # plan, build (the evaluation zoo's, as issue #23 names it), table
}


if __name__ == "__main__":
    raise SystemExit(main())
