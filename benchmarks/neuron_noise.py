"""Adversarial neuron noise on evaluation-zoo models: a third kind of evidence, measured before it is a detector.

Neural Cleanse asks how small an input trigger sends every image to a class; MM-BD how large a margin an input can
give a class. Both miss the 10-class models' full-image, noise and warp triggers (benchmarks/README.md). BAN (Xu
et al., NeurIPS 2024, github xiaoyunxxy/ban, ``ban_detection.py``) perturbs the network instead: multiplicative
noise on every normalisation layer's gain and shift, ``w' = w * (1 + delta)`` with ``|delta| <= eps``, found by
signed-gradient steps on a few clean images; a backdoor is a pathway the noise can switch on for every input.
BAN's own readout also masks the head's features, which on this zoo sent every model's predictions to one class
whatever its backdoor (RESULTS-LOG, 2026-12-07 (19:00-)); here the noise is read alone, two ways:

* ``--mode untargeted`` (BAN's noise; the ``neuron-noise`` detector's own measurement,
  :func:`bdscan.detect.neuron_noise.measure`): the noise raises the cross-entropy of the optimisation half of the
  bundled images (starting from uniform noise); the readout half's predictions through the noisy model give a
  confusion matrix. A backdoor shows as the errors collapsing onto its target; the detector's test
  (:func:`bdscan.detect.neuron_noise.inflow_test`) names the class and a p-value. One run per ``--seeds`` value and
  ``--eps``, each with its own generator seeded by the seed (as the detector draws; files recorded before the
  detector existed drew a seed's several eps from one generator, in ``--eps`` order).
* ``--mode targeted``: per class t, the noise (starting at zero) lowers the cross-entropy to t of the optimisation
  half's images of the other classes; the readout half's images of the other classes give the flip rate into t
  and the mean cross-entropy to t: K numbers per model, like Neural Cleanse's K trigger sizes, and the same test
  (the smallest mean cross-entropy against the other classes', ``min_size_test``) names a suspect and a p-value.

Each seed draws the half split of the bundled images (``torch.randperm`` with ``torch.Generator(seed)``), then,
untargeted, the starting noise from the same generator. One torch thread, so a run is deterministic on one
machine. Only the calibration half is for choosing a rule (docs/verdict.md).

Example::

    python -m benchmarks neuron-noise --cell cifar10_deit --mode untargeted --eps 0.05,0.1,0.2,0.3 --seeds 0,1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from benchmarks.common import (
    EVAL_ZOO,
    CleanData,
    NeuronNoiseConfig,
    NoiseRun,
    SpreadFloor,
    add_out,
    ascend,
    collapsed_without_noise,
    inflow_test,
    joint_test,
    load_with_samples,
    machine_line,
    min_size_test,
    new_parser,
    noise_run,
    noisy_names,
    noisy_params,
    read_json,
    set_threads,
    split_halves,
    utc_now,
    write_json,
)
from benchmarks.zoo_detect import select

MODES = ("untargeted", "targeted")
#: ``cross_fit_below`` or ``no_split_below`` that applies whatever the number of images
ALWAYS = 1 << 30
#: signed-gradient steps: each moves delta by 2 eps / steps, so the steps can cross the whole box
STEPS = {"untargeted": 20, "targeted": 15}


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--split", choices=("calibration", "evaluation"), default="calibration",
                    help="the zoo's half (default: %(default)s)")
    ap.add_argument("--cell", nargs="*", default=None, help="only these cells (<dataset>_<arch>)")
    ap.add_argument("--only", nargs="*", default=None, help="only these models")
    ap.add_argument("--mode", choices=MODES, default="untargeted")
    ap.add_argument("--eps", default=None, help="noise bounds, comma-separated (default: 0.05,0.1,0.2,0.3 "
                                                "untargeted; 0.05,0.1 targeted)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="signed-gradient steps (default: 20 untargeted, 15 targeted)")
    ap.add_argument("--cross-fit", action="store_true",
                    help="untargeted: the detector's cross-fit (a second noise found on the readout half reads the "
                         "first half; both readouts pooled)")
    ap.add_argument("--no-split", action="store_true",
                    help="untargeted: the noise found on every image and every image read (the detector's "
                         "no_split_below, whatever the number of images)")
    ap.add_argument("--summary", action="store_true", help="measure nothing: print the tables of --out")
    ap.add_argument("--add-clean", action="store_true",
                    help="measure no noise: add each recorded run's readout without noise (a forward pass) to --out")
    add_out(ap, "neuron_noise.json")
    return ap


def measure(wrapper: Any, x: torch.Tensor, y: torch.Tensor, mode: str, eps_list: list[float], seed: int,
            steps: int, cross_fit: bool = False, no_split: bool = False) -> list[dict[str, Any]]:
    """One seed's runs on a model.

    Args:
        wrapper: the model, [0, 1] images in, logits out.
        x: (N, C, H, W) clean images in [0, 1]; y: (N,) their classes.
        mode: "untargeted" or "targeted" (module docstring).
        eps_list: the noise bounds, one run each.
        seed: draws the half split and (untargeted) the starting noise.
        steps: signed-gradient steps.
        cross_fit: untargeted: the detector's cross-fit (:attr:`NeuronNoiseConfig.cross_fit_below`) whatever the
            number of images.
        no_split: untargeted: no halves (:attr:`NeuronNoiseConfig.no_split_below`) whatever the number of images.

    The wrapper is put in eval mode with its parameters frozen (the noise is the only thing optimised).

    Returns:
        Per eps: untargeted ``{"eps", "acc", "conf"}`` (readout confusion matrix, true x predicted); targeted
        ``{"eps", "rate", "ce"}`` (per class: flip rate into it and mean cross-entropy to it).
    """
    if mode == "untargeted":  # the detector's own measurement, one generator per eps
        out = []
        for eps in eps_list:
            cfg = NeuronNoiseConfig(eps=eps, steps=steps, seed=seed, cross_fit_below=ALWAYS if cross_fit else 0,
                                    no_split_below=ALWAYS if no_split else 0)
            run = noise_run(wrapper, CleanData(x, y), cfg)
            out.append({"eps": eps, "acc": run.noisy_accuracy, "conf": run.confusion.tolist(),
                        "clean_acc": run.clean_accuracy, "clean_conf": run.clean_confusion.tolist()})
        return out
    wrapper.eval()
    for p in wrapper.parameters():
        p.requires_grad_(False)
    params = dict(wrapper.named_parameters())
    names = noisy_names(wrapper)
    k = wrapper.num_classes
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    half = len(y) // 2
    xa, ya, xb, yb = x[perm[:half]], y[perm[:half]], x[perm[half:]], y[perm[half:]]
    runs = []
    for eps in eps_list:
        rate, ce = [], []
        for t in range(k):
            xs, xr = xa[ya != t], xb[yb != t]
            deltas = {n: torch.zeros_like(params[n]) for n in names}
            ascend(wrapper, params, deltas, xs, torch.full((len(xs),), t), eps, steps, len(xs), sign=-1.0)
            with torch.no_grad():
                logits = functional_call(wrapper, noisy_params(params, deltas), (xr,))
            rate.append(float((logits.argmax(1) == t).float().mean()))
            ce.append(float(F.cross_entropy(logits, torch.full((len(xr),), t))))
        runs.append({"eps": eps, "rate": rate, "ce": ce})
    return runs


def untargeted_cell(run: dict[str, Any]) -> tuple[int, float, int]:
    """An untargeted run's top class: the class most flips go to, its share of the images not of it, and how many
    other true classes send most of their images to it."""
    conf = torch.tensor(run["conf"])
    off = conf.clone().fill_diagonal_(0)
    not_of = (conf.sum() - conf.sum(1)).clamp(min=1)
    share = off.sum(0) / not_of
    top = int(share.argmax())
    sources = sum(1 for s in range(len(conf)) if s != top and conf[s].sum() and int(conf[s].argmax()) == top)
    return top, float(share[top]), sources


def noise_run_of(run: dict[str, Any]) -> Any:
    """A recorded untargeted run as the detector's :class:`NoiseRun` (its readout without noise when recorded)."""
    conf = np.asarray(run["conf"], dtype=np.int64)
    clean = np.asarray(run["clean_conf"], dtype=np.int64) if run.get("clean_conf") is not None else None
    return NoiseRun(conf, float(run.get("clean_acc", float("nan"))), float(run["acc"]), np.zeros(0), (0, int(conf.sum())), 0, clean)


def detector_test(run: dict[str, Any]) -> Any:
    """An untargeted run's test as the ``neuron-noise`` detector makes it (:func:`inflow_test` on its confusion
    matrix): ``.target`` is the suspect, ``.p_value`` its p-value; None when too few classes."""
    return inflow_test(noise_run_of(run))


def detector_evidence(run: dict[str, Any] | Sequence[dict[str, Any]], rule: str = "larger") -> tuple[float | None, int | None]:
    """What the detector reports for a recorded run, or for the recorded runs of its splits (:func:`split_seeds`, in
    order): (p-value, suspect), or (None, None) when it reports none (a readout already collapsed without noise,
    :func:`collapsed_without_noise`, or too few classes in every split). Several splits are joined as the detector
    joins them (:func:`joint_test`). A run recorded without its readout without noise is judged without that guard.
    ``rule``: the detector's ``p_rule``."""
    runs = [noise_run_of(r) for r in ([run] if isinstance(run, dict) else run)]
    if any(collapsed_without_noise(r) is not None for r in runs):
        return None, None
    joint = joint_test([inflow_test(r, rule) for r in runs])
    return (None, None) if joint is None else (joint[1].p_value, joint[1].target)


def add_clean(path: Any) -> None:
    """``--add-clean``: each recorded untargeted run of ``path`` without its readout without noise gets it
    (``clean_conf``, ``clean_acc``): the same split of the model's bundled images by the run's seed, the readout half
    classified without noise (a forward pass; the noise itself is not run again)."""
    doc = read_json(path, {"rows": []})
    man = {e["name"]: e for e in read_json(EVAL_ZOO, [])}
    for row in doc["rows"]:
        todo = [run for run in row["runs"] if row["mode"] == "untargeted" and run.get("clean_conf") is None]
        if not todo:
            continue
        lm, data = load_with_samples(EVAL_ZOO.parent / man[row["model"]]["file"])
        g = torch.Generator().manual_seed(int(row["seed"]))
        _, read = split_halves(data, NeuronNoiseConfig(seed=int(row["seed"])), g)
        pred = lm.wrapper.predict(read.x)
        k = lm.wrapper.num_classes
        conf = np.zeros((k, k), dtype=np.int64)
        np.add.at(conf, (read.y.numpy(), pred.numpy()), 1)
        for run in todo:
            run["clean_conf"], run["clean_acc"] = conf.tolist(), float((pred == read.y).float().mean())
    write_json(path, doc)


def targeted_test(run: dict[str, Any], floor: float = 0.0) -> Any:
    """A targeted run's suspect and p-value: Neural Cleanse's size test on the per-class mean cross-entropies."""
    return min_size_test(dict(enumerate(run["ce"])), SpreadFloor(log_sd=floor))


def summary(doc: dict[str, Any]) -> None:
    for row in doc["rows"]:
        t = row["target"]
        cells = []
        for run in row["runs"]:
            if row["mode"] == "untargeted":
                top, share, src = untargeted_cell(run)
                mark = "*" if top == t else ""
                st = detector_test(run)
                p = f", p {st.p_value:.2g}" if st is not None else ""
                cells.append(f"eps {run['eps']} s{run['seed']}: {top}{mark} {share:.2f} ({src} src, acc {run['acc']:.2f}{p})")
            else:
                st = targeted_test(run)
                mark = "*" if st.min_label == t else ""
                cells.append(f"eps {run['eps']} s{run['seed']}: {st.min_label}{mark} p {st.p_value:.2g}")
        print(f"| {row['model']} | {t} | " + " | ".join(cells) + " |")


def run(args: argparse.Namespace) -> None:
    if args.add_clean:
        set_threads(1)
        add_clean(args.out)
        return
    doc = read_json(args.out, {"benchmark": "neuron-noise", "rows": []})
    if args.summary:
        summary(doc)
        return
    set_threads(1)
    eps_list = [float(e) for e in (args.eps or ("0.05,0.1,0.2,0.3" if args.mode == "untargeted" else "0.05,0.1")).split(",")]
    steps = args.steps or STEPS[args.mode]
    seeds = [int(s) for s in args.seeds.split(",")]
    for r in select(read_json(EVAL_ZOO, []), args, EVAL_ZOO.parent):  # the models zoo-detect scans
        for seed in seeds:
            key = (r["name"], args.mode, seed, tuple(eps_list), steps, args.cross_fit, args.no_split)
            if any((x["model"], x["mode"], x["seed"], tuple(x["eps"]), x["steps"], x.get("cross_fit", False),
                    x.get("no_split", False)) == key for x in doc["rows"]):
                continue
            lm, data = load_with_samples(EVAL_ZOO.parent / r["file"])
            t0 = time.perf_counter()
            runs = measure(lm.wrapper, data.x, data.y, args.mode, eps_list, seed, steps, args.cross_fit, args.no_split)
            row = {"model": r["name"], "target": r["target"], "attack": r["attack"], "clean_acc": r["clean_acc"],
                   "mode": args.mode, "seed": seed, "eps": eps_list, "steps": steps, "cross_fit": args.cross_fit,
                   "no_split": args.no_split,
                   "runs": [dict(x, seed=seed) for x in runs], "seconds": round(time.perf_counter() - t0, 1),
                   "machine": machine_line(), "when": utc_now()}
            doc = read_json(args.out, {"benchmark": "neuron-noise", "rows": []})  # another run may have written
            doc["rows"].append(row)
            write_json(args.out, doc)
            summary({"rows": [row]})
