"""bdscan's benchmark suite: speed and detection quality, measured here and never by timed tests.

Run one with ``python -m benchmarks NAME [ARGS ...]`` from the repository root; ``python -m benchmarks --help``
lists them. Each benchmark is the module ``benchmarks/<NAME with - as _>.py`` and exposes ``parser()`` (its
arguments) and ``run(args)``; what they share (loading models and samples, budget overrides, the machine line,
timing, JSON output) is in :mod:`benchmarks.common`, the suite's one door into bdscan. This module stays free of
torch and bdscan so that listing the suite is instant.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: name -> one line: the registry of the suite, in the order ``--help`` lists it (detection quality, then speed)
BENCHMARKS: dict[str, str] = {
    "detect": "scan the lab zoo with a budget; per-model anomaly indices, verdicts and time (JSON, resumable)",
    "schedule": "replay recorded scans: the verdicts a shorter or two-stage schedule would have given",
    "schedule-more": "more replays: per-level steps, a plateau early stop, two stages with extrapolated sizes",
    "seeds": "one model and level over several seeds and budget variants: how stable is the anomaly index",
    "converged": "how close a recording's trigger sizes come to Neural Cleanse's converged ones",
    "scan-one": "one model, one scan, one line, with fields of the fast budget changed from the command line",
    "speed": "a bdscan scan against Neural Cleanse's original schedule, same model, data and machine",
    "cli": "end-to-end wall time and peak memory of `bdscan scan`, with a ViT throughput probe before and after",
    "throughput": "forward+backward images/s by images per forward (the measurement behind the label chunk)",
    "attention": "a timm ViT's forward+backward with its attention written four other ways (same arithmetic)",
    "floor": "a model's arithmetic against what this CPU does with it: how fast a scan could be",
    "profile-inversion": "torch.profiler around the real batched inversion loop: where its time goes",
    "batched": "batched against label-by-label inversion: the same per-label results, the wall time of each",
    "guard": "the input guard on the zoo's backdoored models: triggered inputs flagged at a false-positive rate, per family",
    "big-inputs": "224×224 end to end: `bdscan scan` of a timm ViT-Tiny/16 folder (10 and 43 classes), wall time and estimate",
    "batch": "the zoo one model after the other against one batch `bdscan scan` on Ray, and on a two-node local cluster",
    "swin-grid": "a small backdoored Hugging Face Swin: the patch level on embedding, merged-stage and window cells",
    "combine-replay": "Neural Cleanse and MM-BD combined by the verdict's rule, replayed from recorded scans (no scanning)",
    "zoo-detect": "the evaluation zoo (one half) scanned as users scan: TPR, FPR, AUC, seed agreement, seconds per family and attack",
    "finetune-probe": "one zoo fine-tune recipe tried on a base: accuracy and ASR curve, full-test figures, drop vs the cell's twins",
    "repair": "the default unlearning on the backdoored sample models, per learning rate and split seed: full-test accuracy and attack success",
    "bench-mmbd": "MM-BD (--detectors mm-bd) over the lab zoo: per-model p-value, suspect, true target, seconds; TPR, FPR, AUC",
    "neuron-noise": "adversarial noise on a zoo model's normalisation layers (BAN-style): where its errors collapse, per class",
}


def module_name(name: str) -> str:
    """The module of the benchmark ``name`` (``schedule-more`` -> ``benchmarks.schedule_more``)."""
    return f"{__name__}.{name.replace('-', '_')}"


def load(name: str) -> ModuleType:
    """The module of a registered benchmark (imported on demand: most import torch and bdscan)."""
    if name not in BENCHMARKS:
        raise KeyError(name)
    return importlib.import_module(module_name(name))
