"""224×224 end to end: ``bdscan scan`` of a timm ViT-Tiny/16 folder (random weights, built here: no download).

For each class count, ``vit_tiny_patch16_224`` is built with random weights and written as a timm hub folder
(config.json + model.safetensors, as timm's ``save_for_hf`` writes it); clean images are the suite's synthetic
colour classes at 32×32, which bdscan resizes to the model's 224×224. Then ``bdscan scan FOLDER --budget B -q
--json F`` runs in a fresh process (the CLI's threads, ``nice -n 10``) and its wall time, the detection time, the
patch level's grid and the console's own estimate (printed before the scan when it is long) are recorded. Random
weights are a timing model only: the verdict means nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Stopwatch, add_budget, add_out, machine_line, new_parser, utc_now, write_json

ARCH = "vit_tiny_patch16_224"


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--classes", default="10,43", help="class counts (default: %(default)s)")
    ap.add_argument("--per-class", type=int, default=8, help="clean images per class (default: %(default)s)")
    add_budget(ap, "smoke")
    ap.add_argument("--scan-args", default="", help="further `bdscan scan` arguments, e.g. '--levels patch --steps 2'")
    add_out(ap, "big_inputs.json")
    return ap


def _folder(classes: int, where: Path) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    net = timm.create_model(ARCH, pretrained=False, num_classes=classes)
    out = where / f"vit_tiny_{classes}"
    save_for_hf(net, str(out), safe_serialization=True)
    return out


def _data(classes: int, per_class: int, where: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    hue = 2 * np.pi * y / classes
    base = 0.5 + 0.35 * np.stack([np.cos(hue), np.cos(hue - 2.094), np.cos(hue + 2.094)], 1)
    x = np.clip(base[:, None, None, :] + 0.12 * rng.standard_normal((len(y), 32, 32, 3)), 0, 1)
    p = where / f"clean_{classes}.npz"
    np.savez(p, x=(x * 255).round().astype(np.uint8), y=y)
    return p


def run(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for k in (int(c) for c in args.classes.split(",")):
            folder, data, js = _folder(k, t), _data(k, args.per_class, t), t / f"scan_{k}.json"
            cmd = ["nice", "-n", "10", sys.executable, "-m", "bdscan.cli", "scan", str(folder), "--data", str(data),
                   "--budget", args.budget, "--json", str(js), "--fail-on", "never", "--no-activations",
                   *shlex.split(args.scan_args)]
            with Stopwatch() as sw:
                p = subprocess.run(cmd, capture_output=True, text=True)
            doc = json.loads(js.read_text()) if js.exists() else {}
            estimate = next((ln.strip() for ln in p.stderr.splitlines() if "should take" in ln), None)
            row = {"classes": k, "budget": args.budget, "scan_args": args.scan_args, "rc": p.returncode, "wall_s": round(sw.seconds, 1),
                   "timings": doc.get("timings"), "token_grid": (doc.get("model") or {}).get("token_grid"),
                   "estimate_line": estimate, "stderr_tail": p.stderr[-400:] if p.returncode not in (0, 1) else ""}
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_json(Path(args.out), {"benchmark": "big-inputs", "date": utc_now(), "machine": machine_line(), "arch": ARCH, "rows": rows})
