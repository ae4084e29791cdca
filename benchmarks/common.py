"""What the benchmarks share: bdscan's API, arguments, models and samples, timing, the machine line, JSON output.

Every bdscan symbol the suite uses is imported here and nowhere else (a test checks), so that a change of
bdscan's detection API is adapted in one file. Benchmarks import what they need from this module.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bdscan import machine
from bdscan.atomic import atomic_path
from bdscan.data import CleanData, load_clean_data
from bdscan.detect.anomaly import (
    LOG_SD_FLOOR,
    PATCH_MAD_FLOOR,
    SpreadFloor,
    anomaly,
    level_anomaly,
    level_floor,
    min_size_test,
)
from bdscan.detect.base import DEFAULT_DETECTORS, DETECTORS, Evidence, ScanSettings
from bdscan.detect.base import combine as combine_detectors
from bdscan.detect.config import DEFAULT_BUDGET, LEVELS, budget
from bdscan.detect.config import MODES as DEFAULT_LEVELS
from bdscan.detect.inversion import invert
from bdscan.detect.neuron_noise import (
    P_RULES,
    NeuronNoise,
    NeuronNoiseConfig,
    NoiseRun,
    ascend,
    collapsed_without_noise,
    inflow_test,
    joint_test,
    noisy_names,
    noisy_params,
    split_halves,
    split_seeds,
)
from bdscan.detect.neuron_noise import measure as noise_run
from bdscan.detect.scan import ScanConfig, combine, params_for, resolve_second_look, scan
from bdscan.guard import GuardConfig, build_guard, split_guard_data
from bdscan.io import load_model
from bdscan.io.base import sha256_file
from bdscan.io.hf_folder import ModelFolderWriter
from bdscan.lab.attacks import AttackConfig, make_trigger
from bdscan.lab.evalzoo import load_dataset
from bdscan.lab.evalzoo_finetune import finetune, measure
from bdscan.lab.evalzoo_plan import finetune_recipe
from bdscan.lab.hf import make_hf_swin
from bdscan.lab.labdata import AugmentConfig, augment_batch, find_data_dir, load_lab_data
from bdscan.lab.train import round_to_half_
from bdscan.models.archs import BDSCAN_ARCHS
from bdscan.repair import RepairConfig, repair, reversed_trigger_from_findings
from bdscan.trigger import Trigger

__all__ = [
    "BDSCAN_ARCHS",
    "DATASET_SAMPLES",
    "DEFAULT_BUDGET",
    "DEFAULT_DETECTORS",
    "DEFAULT_LEVELS",
    "DETECTORS",
    "EVAL_ZOO",
    "LAB_ZOO",
    "LEVELS",
    "LOG_SD_FLOOR",
    "PATCH_MAD_FLOOR",
    "P_RULES",
    "RESULTS",
    "ROOT",
    "SAMPLE_MODELS",
    "THRESHOLD",
    "ZOO_MANIFEST",
    "AttackConfig",
    "AugmentConfig",
    "CleanData",
    "Evidence",
    "GuardConfig",
    "ModelFolderWriter",
    "NeuronNoise",
    "NeuronNoiseConfig",
    "NoiseRun",
    "RepairConfig",
    "ScanSettings",
    "SpreadFloor",
    "Stopwatch",
    "Trigger",
    "add_budget",
    "add_manifest",
    "add_out",
    "add_overrides",
    "add_threads",
    "anomaly",
    "ascend",
    "at",
    "atomic_path",
    "augment_batch",
    "best_seconds",
    "budget_config",
    "build_guard",
    "cached_reversed_trigger",
    "collapsed_without_noise",
    "combine_detectors",
    "combined_verdict",
    "find_data_dir",
    "finetune",
    "finetune_recipe",
    "inflow_test",
    "invert",
    "is_right",
    "joint_test",
    "judge",
    "level_anomaly",
    "level_floor",
    "load_dataset",
    "load_lab_data",
    "load_model",
    "load_rows",
    "load_with_samples",
    "machine_line",
    "make_hf_swin",
    "make_trigger",
    "measure",
    "min_size_test",
    "nc_evidence",
    "new_parser",
    "noise_run",
    "noisy_names",
    "noisy_params",
    "parse_overrides",
    "print_row",
    "read_json",
    "recordings",
    "repair",
    "resolve_second_look",
    "reversed_trigger_from_findings",
    "round_to_half_",
    "run_benchmark",
    "samples_of",
    "scan",
    "scan_cli",
    "scan_config",
    "set_threads",
    "sha16",
    "smin",
    "split_guard_data",
    "split_halves",
    "split_seeds",
    "table_header",
    "trigger_param",
    "true_target",
    "utc_now",
    "versions",
    "write_json",
]

#: the repository root: default paths hang off it, so the suite runs the same from any directory
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: the bundled sample models and the clean sample sets (``<dataset>_samples.npz``) the zoos' scans use
SAMPLE_MODELS = ROOT / "sample_models"
#: the clean images every scan of an evaluation-zoo model uses: the bundled samples of its data set, those a user
#: would try first
DATASET_SAMPLES = {"gtsrb": SAMPLE_MODELS / "gtsrb_samples.npz", "cifar10": SAMPLE_MODELS / "cifar10_samples.npz"}
#: the lab zoo: the small, quickly trained models of the study and of the speed benchmarks
LAB_ZOO = ROOT / "benchmarks" / "lab_zoo"
ZOO_MANIFEST = LAB_ZOO / "zoo.json"
#: the evaluation zoo (issue #23): calibration and evaluation halves
EVAL_ZOO = ROOT / "benchmarks" / "zoo" / "manifest.json"

#: the anomaly-index threshold of a default scan (Neural Cleanse's 2), taken from bdscan rather than copied
THRESHOLD = ScanConfig().threshold


# ---------------------------------------------------------------------------------------------- arguments


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser, its module docstring as the description (``--help`` shows what it measures)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_threads(ap: argparse.ArgumentParser, default: int) -> None:
    ap.add_argument("--threads", type=int, default=default, help="torch threads (default: %(default)s)")


def add_out(ap: argparse.ArgumentParser, name: str, help: str = "JSON output") -> None:
    """``--out``, by default ``benchmarks/results/NAME``."""
    ap.add_argument("--out", type=Path, default=RESULTS / name, help=f"{help} (default: benchmarks/results/{name})")


def add_budget(ap: argparse.ArgumentParser, default: str = "fast", help: str = "scan budget") -> None:
    ap.add_argument("--budget", default=default, help=f"{help} (default: %(default)s)")


def add_overrides(ap: argparse.ArgumentParser, many: bool = False) -> None:
    """``--set``: overrides of the budget's fields (``'steps=20,lr=0.2'``); ``many``: one per variant, as ``sets``."""
    if many:
        ap.add_argument("--set", dest="sets", nargs="*", default=[""],
                        help="budget overrides per variant, e.g. 'lr=0.2' ('' = the budget as it is)")
    else:
        ap.add_argument("--set", default="", help="budget overrides, e.g. 'steps=20,batches_per_step=1'")


def add_manifest(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--manifest", type=Path, default=ZOO_MANIFEST, help="zoo manifest (default: benchmarks/lab_zoo/zoo.json)")


def parse_overrides(spec: str) -> dict[str, Any]:
    """Budget field overrides from ``'steps=20,lr=0.2,precision=bf16'`` or ``'dict(steps=20, early_stop=False)'``.

    Values are Python literals where they parse as one (``20``, ``0.2``, ``False``), words otherwise (``bf16``).
    """
    spec = spec.strip()
    if spec.startswith("dict(") and spec.endswith(")"):
        spec = spec[len("dict("):-1]
    return {k.strip(): _value(v.strip()) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv.strip())}


def _value(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        try:
            return float(v)  # "inf", "nan"
        except ValueError:
            return v


# ---------------------------------------------------------------------------------------------- bdscan


def budget_config(name: str = "fast", overrides: str | dict[str, Any] = "", **changes: Any) -> Any:
    """The named budget's inversion configuration with ``changes`` and then ``overrides`` applied."""
    over = parse_overrides(overrides) if isinstance(overrides, str) else overrides
    return budget(name).with_(**(changes | over))


def scan_config(budget_name: str = "fast", inversion: Any = None, **fields: Any) -> ScanConfig:
    """A scan configuration for the named budget (its inversion unless ``inversion`` is given), with the budget's own
    two-look schedule unless ``fields`` set ``second_look`` (as ``bdscan scan`` resolves ``--second-look auto``);
    ``fields``: the other fields of bdscan's ``ScanConfig`` (``modes``, ``labels``, ``device``...)."""
    inv = budget(budget_name) if inversion is None else inversion
    if "second_look" not in fields:
        fields["second_look"] = resolve_second_look("auto", budget_name, inv.steps, fields.get("alpha", ScanConfig().alpha))
    return ScanConfig(budget=budget_name, inversion=inv, **fields)


def trigger_param(wrapper: Any, mode: str) -> Any:
    """The first trigger parametrisation a default scan inverts at ``mode`` (its grid, not a copy of it)."""
    defaults = ScanConfig()
    return params_for(wrapper, mode, defaults.cnn_patch_sizes, defaults.cnn_patch_offsets)[0]


def samples_of(path: str | Path, metadata: dict[str, Any]) -> Path:
    """The clean samples a model is scanned with: those its metadata names (a lab model's ``*_samples.npz`` next
    to it), else the bundled samples of its data set (an evaluation-zoo model, as ``zoo-detect`` scans it)."""
    if "samples" in metadata:
        return Path(path).parent / metadata["samples"]
    if metadata.get("dataset") in DATASET_SAMPLES:
        return DATASET_SAMPLES[metadata["dataset"]]
    raise SystemExit(f"{path}: its metadata names neither samples nor a data set (not a lab or zoo model)")


def load_with_samples(path: str | Path) -> tuple[Any, Any]:
    """A model file and its clean samples (:func:`samples_of`)."""
    lm = load_model(path)
    info = lm.wrapper.info
    data = load_clean_data(samples_of(path, info.metadata), info.input_size, info.num_classes, info.class_names)
    return lm, data


def true_target(lm: Any) -> int | None:
    """The target class a lab model was poisoned for (None: clean, or not a lab model)."""
    return lm.original_trigger.target if lm.original_trigger else None


def judge(sizes: dict[str, dict[int, float | None]], patch_floor: bool = True) -> tuple[dict[str, Any], Any]:
    """Each level's outlier test on per-label trigger sizes, and the scan's combined verdict, as a scan makes them.

    ``patch_floor``: the patch level's MAD floor (meaningless for log sizes, where it is left out).
    """
    modes = {m: anomaly(s, THRESHOLD, PATCH_MAD_FLOOR if m == "patch" and patch_floor else 0.0, level_floor(m))
             for m, s in sizes.items()}
    return modes, combine({m: SimpleNamespace(anomaly=a) for m, a in modes.items()}, THRESHOLD)


def nc_evidence(sizes: dict[str, dict[int, float | None]]) -> tuple[float, int | None]:
    """Neural Cleanse's corrected p-value over its levels and its suspected class (the deciding level's smallest
    class, flagged or not) from per-level trigger sizes, as :func:`judge` decides; (1.0, None) if inconclusive."""
    modes, v = judge(sizes)
    if v.basis is None or v.p_value is None:
        return 1.0, None
    return float(v.p_value), modes[v.basis].test.min_label


def combined_verdict(evidence: dict[str, tuple[float, int | None]], alpha: float) -> tuple[float, int | None, str]:
    """The scan's combination rule (:func:`bdscan.detect.base.combine`) over detector -> (p-value, class):
    (corrected p-value, the deciding detector's class, status)."""
    ev = [Evidence(d, "backdoor" if p <= alpha else "clean", t, 0.0, alpha, "", p_value=p) for d, (p, t) in evidence.items()]
    cv = combine_detectors(ev, alpha)
    return float(cv.p_value if cv.p_value is not None else 1.0), (cv.decided_by.target if cv.decided_by else None), cv.status


def scan_cli(scan_args: list[str], threads: int) -> tuple[dict, float]:
    """``bdscan scan SCAN_ARGS --json TMP`` in a fresh process with ``threads`` torch threads: its scan document and
    the process's wall time; a RuntimeError with the tail of its output when it fails."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "scan.json"
        cmd = [sys.executable, "-c", "from bdscan.cli import main; main()", "scan", *scan_args, "--json", str(js)]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not js.exists():
            raise RuntimeError(f"{scan_args[0]}: bdscan scan exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}")
        return json.loads(js.read_text()), wall


def versions() -> dict[str, str]:
    """What every scan report records as ``versions`` (software, threads, CPU capability, bf16)."""
    return machine.versions()


def machine_line(**extra: object) -> str:
    """The machine in one line (``bdscan.machine.describe()``), then ``extra`` as ``key value`` items."""
    return ", ".join([machine.describe(), *(f"{k} {v}" for k, v in extra.items())])


# ---------------------------------------------------------------------------------------------- recorded scans


def load_rows(paths: list[Path], sweep: str | None = None) -> list[dict]:
    """The rows with histories of ``detect --histories`` outputs (first recording of a model wins);
    ``sweep``: keep only these CNN patch grids (1-based, in sweep order, e.g. ``'1,3'``)."""
    seen: set[str] = set()
    rows = []
    for p in paths:
        for r in json.loads(p.read_text())["rows"]:
            if "histories" in r and r["model"] not in seen:
                seen.add(r["model"])
                rows.append(r)
    if sweep:
        keep = {int(v) for v in sweep.split(",")}
        for r in rows:
            pp = r["histories"].get("patch", {})
            r["recorded_sweep"] = len(pp)
            if len(pp) > 1:
                names = list(pp)
                r["histories"]["patch"] = {n: pp[n] for i, n in enumerate(names, 1) if i in keep}
    return rows


def recordings(specs: list[str], sweep: str | None = None) -> dict[str, dict[str, dict]]:
    """``NAME=file.json[,more.json]`` specs -> name -> model -> recorded row (see :func:`load_rows`)."""
    out = {}
    for spec in specs:
        name, files = spec.split("=", 1)
        out[name] = {r["model"]: r for r in load_rows([Path(p) for p in files.split(",")], sweep)}
    return out


def at(h: list[float | None], s: int) -> float | None:
    """Best size after step ``s`` (a label that stopped early keeps its last value)."""
    return h[min(s, len(h)) - 1] if h else None


def smin(vals: list[float | None]) -> float | None:
    ok = [v for v in vals if v is not None]
    return min(ok) if ok else None


def is_right(v: Any, row: dict) -> bool:
    """A backdoored model flagged with its true target, or a clean model not flagged."""
    tgt = row["true_target"]
    return v.status == "backdoor" and v.target == tgt if tgt is not None else v.status != "backdoor"


# ---------------------------------------------------------------------------------------------- running and timing


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (wall time, ``time.perf_counter``)."""

    def __enter__(self) -> Stopwatch:
        self.seconds = math.nan
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def best_seconds(fn: Callable[[], object], rounds: int, warmup: int = 1) -> float:
    """Best wall time of ``rounds`` calls of ``fn`` after ``warmup`` untimed ones: this shared machine's speed
    drifts within a minute, and the best run is the one least disturbed."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks NAME ARGS`` in a fresh process (its own threads and peak memory), output captured.

    The working directory is kept (relative model paths stay valid); the repository root goes on the path.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "benchmarks", name, *args], capture_output=True, text=True, check=False,
                          env=os.environ | {"PYTHONPATH": path})


# ---------------------------------------------------------------------------------------------- output


def sha16(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (how results name the exact model file); of a model folder, of
    the digest over its files that the zoo's manifest records (``bdscan.io.base.sha256_file``)."""
    return sha256_file(Path(path))[:16]


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as indented JSON; written beside and renamed, so an interrupted run never leaves half a file
    (several benchmarks resume from their output)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def print_row(row: dict) -> None:
    """One result row as a JSON line, flushed (progress of a long run)."""
    print(json.dumps(row), flush=True)


def table_header(*cols: str) -> None:
    """A Markdown table's header and rule (results tables are pasted into benchmarks/README.md)."""
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")


def cached_reversed_trigger(cache: Path, wrapper: Any, data: Any, budget_name: str, seed: int = 0) -> tuple[Trigger, dict]:
    """The trigger a default-rule scan reverses (``budget_name``, ``seed``): the verdict's level and class, or the
    pixel level's smallest class when the scan flags nothing (what ``--label K`` does), with ``verdict``, ``level``,
    ``label`` and ``scan_seconds``; kept in ``cache`` (an .npz) so that a rerun does not scan again."""
    import numpy as np
    import torch

    if cache.exists():
        with np.load(cache, allow_pickle=False) as d:
            info = {k: d[k].item() for k in ("verdict", "level", "label", "scan_seconds")}
            return Trigger(torch.from_numpy(d["mask"]), torch.from_numpy(d["pattern"]), int(info["label"]), f"reversed-{info['level']}"), info
    with Stopwatch() as sw:
        fd = scan(wrapper, data, scan_config(budget_name, budget_config(budget_name, "", seed=seed)))
    if fd.verdict.status == "backdoor":
        trig = reversed_trigger_from_findings(fd)
    else:
        trig = reversed_trigger_from_findings(fd, "pixel", label=fd.modes["pixel"].anomaly.min_label)
    info = {"verdict": fd.verdict.status, "level": trig.params["mode"], "label": int(trig.target), "scan_seconds": round(sw.seconds, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, mask=trig.mask.numpy(), pattern=trig.pattern.numpy(), **{k: np.asarray(v) for k, v in info.items()})
    return trig, info
