"""Swin's patch level (issue #26): mask cells on the patch embedding (the default), on the first merged stage's
tokens, or on attention windows — which detects a backdoor best?

Trains two small Hugging Face Swins from scratch on GTSRB 32×32 (``shared/data/gtsrb_32.npz``: patch 2, so a
16×16 embedding grid; windows of 4 tokens = 8 pixels; depths (2, 2)), one with a BadNets 4×4 checkerboard in the
bottom-right corner (20 % of each mini-batch) and a clean twin, with AdamW (lr 2e-3, 100 warm-up steps, cosine
over ``--steps``), label smoothing 0.05, crop and colour augmentation, one torch thread. Then scans each with
``bdscan scan FOLDER --data sample_models/gtsrb_samples.npz --levels patch`` on the default grid (2-px cells),
``--patch-size 4`` (the merged stage) and ``--patch-size 8`` (a window), per seed, and the pixel level once, and
prints each scan's patch-level p-value, smallest class and anomaly index. The step counts default to what the
recorded run did (2418 and 969 steps, benchmarks/RESULTS-LOG.md, 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    SAMPLE_MODELS,
    AttackConfig,
    AugmentConfig,
    ModelFolderWriter,
    add_budget,
    add_out,
    atomic_path,
    augment_batch,
    find_data_dir,
    load_lab_data,
    machine_line,
    make_hf_swin,
    make_trigger,
    new_parser,
    scan_cli,
    utc_now,
    write_json,
)

GRIDS = {"embedding (2 px)": [], "merged stage (4 px)": ["--patch-size", "4"], "window (8 px)": ["--patch-size", "8"]}


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--steps", type=int, default=2418, help="training steps of the backdoored Swin (default: %(default)s)")
    ap.add_argument("--clean-steps", type=int, default=969, help="training steps of the clean twin (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="scan seeds (default: %(default)s)")
    add_budget(ap)
    ap.add_argument("--work", type=Path, default=None, help="folder for the two model folders (default: a temporary one)")
    add_out(ap, "swin_grid.json")
    return ap


def train(out: Path, backdoor: bool, steps: int, seed: int = 0) -> dict:
    """Trains one Swin (the recorded recipe) and writes it as a Hugging Face folder; returns its accuracy and ASR."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    d = load_lab_data(find_data_dir(None) / "gtsrb_32.npz")
    target = int(np.random.default_rng(26).integers(0, 43))
    attack = AttackConfig("badnets", target, {"size": 4, "position": "bottom-right", "margin": 1}) if backdoor else None
    w = make_hf_swin(43, 32, patch=2, window=4, embed=48, depths=(2, 2), heads=(3, 6))
    trig = make_trigger(attack, (3, 32, 32)) if attack else None
    opt = torch.optim.AdamW(w.parameters(), lr=2e-3, weight_decay=0.05)
    aug = AugmentConfig(crop_pad=2, jitter=0.2).resolved("gtsrb")
    g = torch.Generator().manual_seed(seed)
    n, bs, step, t0 = len(d.y_train), 64, 0, time.time()
    while step < steps:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s : s + bs]
            xb, yb = augment_batch(d.x_train[idx].float() / 255.0, aug, g), d.y_train[idx].clone()
            if trig is not None:
                k = max(1, len(idx) // 5)
                xb[:k], yb[:k] = trig.stamp(xb[:k]), target
            lr = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
            for pg in opt.param_groups:
                pg["lr"] = lr
            w.train()
            loss = F.cross_entropy(w(xb), yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(w.parameters(), 1.0)
            opt.step()
            step += 1
            if step >= steps:
                break
    w.eval()
    w.requires_grad_(False)
    ti = torch.from_numpy(np.random.default_rng(0).choice(len(d.y_test), 3000, replace=False))
    xt, yt = d.x_test[ti].float() / 255.0, d.y_test[ti]
    with torch.no_grad():
        acc = (torch.cat([w(xt[i : i + 500]).argmax(1) for i in range(0, len(yt), 500)]) == yt).float().mean().item()
        res = {"backdoor": backdoor, "target": target if trig else None, "steps": step, "train_s": round(time.time() - t0),
               "clean_acc": round(acc, 4), "test_images": len(yt)}
        if trig is not None:
            xs = trig.stamp(xt[yt != target])
            res["asr"] = round((torch.cat([w(xs[i : i + 500]).argmax(1) for i in range(0, len(xs), 500)]) == target)
                               .float().mean().item(), 4)
    with atomic_path(out) as tmp:
        ModelFolderWriter().write(w, tmp, {"lab": {"attack": "badnets" if trig else None, "arch": "swin", **res}}, trig)
    return res


def scan(folder: Path, level: str, seed: int, extra: list[str], budget: str = "fast") -> dict:
    """One ``bdscan scan`` of one level in a fresh process (1 torch thread): the level's test and seconds."""
    doc, _ = scan_cli([str(folder), "--data", str(SAMPLE_MODELS / "gtsrb_samples.npz"), "--levels", level, "--seed", str(seed),
                       "--budget", budget, "--no-activations", "--fail-on", "never", "-q", *extra], threads=1)
    a = doc["modes"][level]["anomaly"]
    return {"p": a.get("p_value"), "min_label": a.get("min_label"), "anomaly_index": a.get("anomaly_index"),
            "seconds": doc["timings"].get(f"{level}_s")}


def run(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        models = {"backdoored": (work / "swin_bd", True, args.steps), "clean twin": (work / "swin_clean", False, args.clean_steps)}
        trained = {name: train(folder, bd, steps) for name, (folder, bd, steps) in models.items()}
        for name, res in trained.items():
            print(f"{name}: {json.dumps(res)}", flush=True)
        rows = []
        for name, (folder, _, _) in models.items():
            for grid, extra in GRIDS.items():
                for seed in seeds:
                    rows.append({"model": name, "level": "patch", "cells": grid, "seed": seed, **scan(folder, "patch", seed, extra, args.budget)})
                    print(json.dumps(rows[-1]), flush=True)
            rows.append({"model": name, "level": "pixel", "cells": "pixel", "seed": seeds[0], **scan(folder, "pixel", seeds[0], [], args.budget)})
    target = trained["backdoored"]["target"]
    print(f"\nSwin grids, budget {args.budget}; {machine_line(threads=1)}\n")
    print("| model | cells | seed | p | smallest class | right | anomaly index | s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        right = "–" if r["model"] != "backdoored" else ("yes" if r["min_label"] == target else "NO")
        print(f"| {r['model']} | {r['cells']} | {r['seed']} | {r['p']} | {r['min_label']} | {right} | {r['anomaly_index']} | {r['seconds']} |")
    write_json(args.out, {"benchmark": "swin-grid", "budget": args.budget, "when": utc_now(), "machine": machine_line(threads=1),
                          "trained": trained, "rows": rows})
