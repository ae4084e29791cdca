"""Training the evaluation zoo's clean bases from a :class:`~bdscan.lab.recipes.Recipe`, resumably.

:func:`train_base` trains one base and writes ``<out>/<recipe name>_base.safetensors`` (float16, with bdscan
metadata: clean accuracy on the full test split after the float16 rounding, the recipe, the per-epoch curve,
seconds, the machine). After every epoch it writes a checkpoint (``<name>_base.ckpt.pt``: weights, optimiser,
schedule, curve) atomically, so a run that is stopped (Ctrl-C, CI's time limit, a reboot) and started again
with the same recipe continues after the last finished epoch, and ends with the same weights as a run that
was never stopped: every random draw (shuffling, each image's augmentation, each batch's mixing and
dropout) comes from a generator seeded from (seed, epoch, image or step), not from the history of the process.

Library code: progress goes to :mod:`logging` and to an optional callback, never to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bdscan import machine
from bdscan.atomic import atomic_write_text, atomic_write_with
from bdscan.errors import BdscanError, UsageError
from bdscan.lab.labdata import LabData, extra_train_files, find_data_dir, load_lab_data, split_train_val
from bdscan.lab.recipes import Recipe, augment_batch_u8, auto_augment_policy, batch_mixer
from bdscan.lab.train import LAB_VERSION, build_wrapper, evaluate, is_distilled, make_optimizer, optimizer_step, round_to_half_, warmup_cosine
from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: called after every epoch with that epoch's record (after its checkpoint was written)
EpochCallback = Callable[[dict[str, Any]], None]

#: format of the checkpoint files; a checkpoint of another format is not resumed from
CHECKPOINT_FORMAT = 1

# random streams: one per purpose, so that e.g. the mixing of batch k never depends on how images were drawn
_STREAM_SHUFFLE, _STREAM_AUGMENT, _STREAM_STEP, _STREAM_CROP = 0, 1, 2, 3


def stream_seed(seed: int, epoch: int, stream: int, k: int) -> int:
    """A 63-bit seed for draw ``k`` of ``stream`` in ``epoch`` (numpy's SeedSequence: well mixed, no overlaps)."""
    return int(np.random.SeedSequence([seed, epoch, stream, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def base_name(recipe: Recipe) -> str:
    """File stem of a recipe's base: ``gtsrb_vit_base``."""
    return f"{recipe.name}_base"


@dataclass(frozen=True)
class BaseResult:
    """What :func:`train_base` returns.

    Attributes:
        path: the ``.safetensors`` file.
        wrapper: the model as stored (float16-rounded weights, float32 in memory, eval mode).
        clean_acc: accuracy on the full test split after float16 rounding.
        history: one record per epoch (loss, train accuracy, monitored test accuracy, seconds, images/s, lr).
        seconds: training and evaluation time over all runs (a resumed run adds to the earlier ones').
        skipped: True when the file was already there, trained with the same recipe.
    """

    path: Path
    wrapper: ModelWrapper | None
    clean_acc: float
    history: tuple[dict[str, Any], ...]
    seconds: float
    skipped: bool = False


class _AugmentedBatches(Dataset):
    """One epoch's training batches, item ``b`` augmented with generators seeded from (seed, epoch, b).

    Batches, not images, are the items, so that the auto-augment policy runs on groups of images (see
    :func:`~bdscan.lab.recipes.augment_batch_u8`) and worker processes (on a GPU machine) each build whole batches.
    """

    def __init__(self, x_u8: torch.Tensor, y: torch.Tensor, recipe: Recipe, batches: list[torch.Tensor], epoch: int) -> None:
        self.x, self.y, self.recipe, self.batches, self.epoch = x_u8, y, recipe, batches, epoch
        self.policy = auto_augment_policy(recipe)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = stream_seed(self.recipe.seed, self.epoch, _STREAM_AUGMENT, int(b))
        # torchvision's transforms draw from the global CPU generator: seeding it per batch makes the draw
        # independent of worker processes and of where a resumed run started
        torch.random.default_generator.manual_seed(s)
        g = torch.Generator().manual_seed(stream_seed(self.recipe.seed, self.epoch, _STREAM_CROP, int(b)))
        idx = self.batches[b]
        x = augment_batch_u8(self.x[idx], self.recipe, g, self.policy)
        return x, self.y[idx]


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"`` (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device", "use --device cpu")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware computes it natively (so it is faster, not emulated), else None (float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if machine.cpu_has_native_bf16() else None


def load_base_data(recipe: Recipe, data_dir: Path) -> LabData:
    """The recipe's data set: ``<dataset>_32.npz``, plus the archives that complete its training split
    (CIFAR-10: ``cifar10_train_extra_32.npz``) when ``recipe.use_extra_train``."""
    path = Path(data_dir) / f"{recipe.dataset}_32.npz"
    extra = extra_train_files(path) if recipe.use_extra_train else []
    return load_lab_data(path, extra)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_base_meta(path: Path) -> dict[str, Any] | None:
    from bdscan.io.safetensors_io import read_metadata

    try:
        return read_metadata(path).get("extra") or {}
    except (BdscanError, OSError, ValueError):
        return None


def _load_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # a damaged file: start over
        log.warning("%s: unreadable checkpoint (%s); starting from epoch 0", path, str(e)[:120])
        return None
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("recipe_digest") != recipe.digest():
        raise UsageError(f"{path} was written by another recipe (or an older bdscan)",
                         "delete it, or pass --restart to train from scratch")
    return ck


def train_base(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    data_dir: str | Path,
    device: str = "cpu",
    threads: int | None = 1,
    workers: int = 0,
    teacher: str | Path | None = None,
    restart: bool = False,
    on_epoch: EpochCallback | None = None,
    max_train: int | None = None,
) -> BaseResult:
    """Trains (or resumes, or skips) the clean base of ``recipe``.

    Args:
        recipe: see :mod:`bdscan.lab.recipes`.
        out_dir: where ``<name>_base.safetensors``, its checkpoint and ``<name>_base.history.json`` go.
        data_dir: folder of ``<dataset>_32.npz`` (and ``<dataset>_train_extra_32.npz``).
        device: "cpu", "cuda", "cuda:N" or "auto".
        threads: torch threads while training (None: leave as is).
        workers: data-loading worker processes (0: augment in this process, right for 2 shared cores;
            several on a GPU machine, where per-image augmentation would otherwise be the bottleneck).
        teacher: the teacher's ``.safetensors`` for distilled recipes (default: the base of
            ``recipe.teacher_arch`` in ``out_dir``).
        restart: ignore an existing checkpoint or model file and train from scratch.
        on_epoch: called with each epoch's record after its checkpoint is written (an exception raised
            there stops training; the checkpoint stays, so the run can be resumed).
        max_train: use at most this many training images (quick runs, tests); recorded in the metadata.

    Returns:
        :class:`BaseResult`.
    """
    out = Path(out_dir)
    name = base_name(recipe)
    path, ckpt_path, hist_path = out / f"{name}.safetensors", out / f"{name}.ckpt.pt", out / f"{name}.history.json"
    digest = recipe.digest() + (f"-max{max_train}" if max_train else "")
    if not restart and path.exists():
        meta = _read_base_meta(path)
        if meta and meta.get("recipe_digest") == digest:
            log.info("%s: up to date (recipe %s), skipped", path, digest)
            return BaseResult(path, None, float(meta.get("clean_acc", math.nan)), tuple(meta.get("history", ())),
                              float(meta.get("train_seconds", 0.0)), skipped=True)
        log.info("%s exists but was trained with another recipe: retraining", path)
    dev = resolve_device(device)
    amp = autocast_dtype(dev)
    t_start = time.perf_counter()
    # training reseeds torch's global generators per batch: restore the caller's afterwards
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch_threads(threads), torch.random.fork_rng(devices=rng_devices):
        data = load_base_data(recipe, Path(data_dir))
        tr, _va = split_train_val(data, recipe.val_fraction, recipe.seed)
        if max_train and len(tr) > max_train:
            tr = tr[:max_train]
        wrapper = build_wrapper(recipe.arch, data, recipe.seed, recipe.arch_kwargs)
        teacher_w, teacher_desc = _load_teacher(recipe, wrapper, out, teacher, dev)
        net = wrapper.net
        wrapper.to(dev)
        n = len(tr)
        batch = min(recipe.batch_size, n)
        steps_per_epoch = max(1, n // batch)  # the last partial batch is dropped, as its statistics are noisy
        opt = make_optimizer(net, recipe.optimizer, recipe.lr, recipe.weight_decay)
        sched = warmup_cosine(opt, int(recipe.warmup_epochs * steps_per_epoch), recipe.epochs * steps_per_epoch)
        history: list[dict[str, Any]] = []
        prior_seconds = 0.0  # time spent by the runs that wrote the checkpoint resumed from
        start_epoch = 0
        ck = None if restart else _load_checkpoint(ckpt_path, recipe)
        if ck is not None and ck.get("max_train") == max_train:
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            history = list(ck["history"])
            prior_seconds = float(ck["seconds"])
            start_epoch = int(ck["epoch"])
            log.info("%s: resuming after epoch %d of %d", name, start_epoch, recipe.epochs)
        x_train, y_train = data.x_train[tr], data.y_train[tr]
        mixer = batch_mixer(recipe, data.num_classes)
        x_mon, y_mon = data.test_set(recipe.monitor_test)
        log.info("training %s (%s %s, %d parameters) on %s: %d images, %d epochs x %d steps, device %s, %s",
                 name, recipe.arch, recipe.arch_kwargs, sum(p.numel() for p in net.parameters()), data.name, n, recipe.epochs,
                 steps_per_epoch, dev, f"{amp} autocast" if amp else "float32")
        for epoch in range(start_epoch, recipe.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            stats = _train_epoch(wrapper, x_train, y_train, epoch, recipe, steps_per_epoch, batch, opt, sched, mixer, teacher_w, dev, amp, workers)
            mon_acc, _ = evaluate(wrapper, x_mon, y_mon)
            seconds = time.perf_counter() - t0
            # CPU time too: on a shared host the wall time says more about the neighbours than about the recipe
            rec = {"epoch": epoch + 1, **stats, "monitor_acc": round(mon_acc, 4), "seconds": round(seconds, 1),
                   "cpu_seconds": round(time.process_time() - c0, 1),
                   "images_per_s": round(steps_per_epoch * batch / seconds, 1), "lr": float(f"{sched.get_last_lr()[0]:.3g}")}
            history.append(rec)
            _write_checkpoint(ckpt_path, recipe, net, opt, sched, epoch + 1, history,
                              prior_seconds + time.perf_counter() - t_start, max_train)
            atomic_write_text(hist_path, json.dumps({"name": name, "recipe": recipe.to_dict(), "history": history}, indent=1) + "\n")
            log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, test acc (%d images) %.4f, %.0f s (%.0f images/s, %.0f CPU s)",
                     name, epoch + 1, recipe.epochs, rec["loss"], rec["train_acc"], len(y_mon), mon_acc, seconds, rec["images_per_s"],
                     rec["cpu_seconds"])
            if on_epoch is not None:
                on_epoch(rec)
        # the stored model: float16-rounded on the CPU, measured on the full test split
        wrapper.to("cpu")
        wrapper.eval()
        acc32, _ = evaluate(wrapper, *data.test_set(None))
        round_to_half_(wrapper)
        xt, yt = data.test_set(None)
        clean_acc, _ = evaluate(wrapper, xt, yt)
        machine_desc = machine.describe()  # inside torch_threads: the threads it trained with
    total_seconds = prior_seconds + time.perf_counter() - t_start
    meta = {
        "zoo_name": name,
        "kind": "clean",
        "role": "zoo base",
        "dataset": recipe.dataset,
        "dataset_files": [Path(f).name for f in data.train_files],
        "train_images": n,
        "test_images": len(yt),
        "clean_acc": round(clean_acc, 4),
        "clean_acc_float32": round(acc32, 4),
        "clean_acc_note": "on the full test split, after rounding the weights to float16 (as stored)",
        "epochs": recipe.epochs,
        "seed": recipe.seed,
        "recipe_name": recipe.name,
        "recipe": recipe.to_dict(),
        "recipe_digest": digest,
        "max_train": max_train,
        "teacher": teacher_desc,
        "history": history,
        "train_seconds": round(total_seconds, 1),
        "train_cpu_seconds_epochs": round(sum(h.get("cpu_seconds", 0.0) for h in history), 1),
        "device": str(dev),
        "autocast": str(amp) if amp else None,
        "machine": machine_desc,
        "threads": threads,
        "workers": workers,
        "weights_dtype": "float16",
        "lab_version": LAB_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    wrapper.info = wrapper.info.with_(metadata=meta)
    wrapper.requires_grad_(False)
    _save_half(wrapper, path)
    ckpt_path.unlink(missing_ok=True)  # the model file supersedes it; a rerun now skips
    log.info("%s: test accuracy %.4f (float16, %d images; float32 %.4f) after %.0f s -> %s",
             name, clean_acc, len(yt), acc32, total_seconds, path)
    return BaseResult(path, wrapper, clean_acc, tuple(history), total_seconds)


def _train_epoch(
    wrapper: ModelWrapper,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epoch: int,
    recipe: Recipe,
    steps: int,
    batch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
    teacher: ModelWrapper | None,
    dev: torch.device,
    amp: torch.dtype | None,
    workers: int,
) -> dict[str, Any]:
    net = wrapper.net
    g = torch.Generator().manual_seed(stream_seed(recipe.seed, epoch, _STREAM_SHUFFLE, 0))
    perm = torch.randperm(len(y_train), generator=g)
    batches = [perm[b * batch : (b + 1) * batch] for b in range(steps)]
    ds = _AugmentedBatches(x_train, y_train, recipe, batches, epoch)
    # batch_size=None: the dataset's items are whole batches already
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=dev.type == "cuda")
    distilled = is_distilled(net)
    net.train()
    if distilled:
        net.set_distilled_training(True)
    k = wrapper.num_classes
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (xb, yb) in enumerate(loader):
        # mixing, dropout and stochastic depth draw from the global generators: seed them per step
        torch.manual_seed(stream_seed(recipe.seed, epoch, _STREAM_STEP, step))
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        if mixer is not None and float(torch.rand(())) < recipe.mix_prob:
            xb, soft = mixer(xb, yb)
        else:
            soft = F.one_hot(yb, k).float()
        with _autocast(dev, amp):
            out = net(wrapper.normalise(xb))
            if isinstance(out, (tuple, list)):  # DeiT: class head on the labels, distillation head on the teacher
                cls_out, dist_out = out[0], out[1]
                with torch.no_grad():
                    ty = teacher(xb).argmax(1) if teacher is not None else soft.argmax(1)
                loss = 0.5 * F.cross_entropy(cls_out.float(), soft, label_smoothing=recipe.label_smoothing) \
                    + 0.5 * F.cross_entropy(dist_out.float(), ty)
                logits = (cls_out + dist_out) / 2
            else:
                logits = out
                loss = F.cross_entropy(out.float(), soft, label_smoothing=recipe.label_smoothing)
        loss_v = optimizer_step(loss, net, opt, sched, recipe.grad_clip, f"{recipe.name}, epoch {epoch + 1}",
                                "lower the recipe's learning rate")
        loss_sum += loss_v * len(yb)
        # against the dominant label of a mixed image: a rough curve, not a measurement
        correct += int((logits.argmax(1) == soft.argmax(1)).sum())
        seen += len(yb)
    if distilled:
        net.set_distilled_training(False)
    net.eval()
    return {"loss": round(loss_sum / max(1, seen), 4), "train_acc": round(correct / max(1, seen), 4)}


@contextlib.contextmanager
def _autocast(dev: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield


def _write_checkpoint(path: Path, recipe: Recipe, net: nn.Module, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: Sequence[dict[str, Any]],
                      seconds: float, max_train: int | None) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "recipe_digest": recipe.digest(),
        "recipe": recipe.to_dict(),
        "max_train": max_train,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": _to_cpu(opt.state_dict()),
        "scheduler": sched.state_dict(),
        "history": list(history),
        "seconds": seconds,
    }
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _load_teacher(recipe: Recipe, student: ModelWrapper, out: Path, teacher: str | Path | None,
                  dev: torch.device) -> tuple[ModelWrapper | None, dict[str, Any] | None]:
    if not is_distilled(student.net):
        if teacher is not None:
            log.warning("%s has no distillation token; the teacher is ignored", recipe.arch)
        return None, None
    if teacher is None:
        if not recipe.teacher_arch:
            log.warning("%s: distilled architecture without a teacher: its distillation head learns the labels", recipe.name)
            return None, None
        teacher = out / f"{recipe.dataset}_{recipe.teacher_arch.removeprefix('bdscan_')}_base.safetensors"
    tpath = Path(teacher)
    if not tpath.is_file():
        raise UsageError(f"{recipe.name} distils from {tpath}, which does not exist",
                         f"train the teacher first: python -m bdscan.lab.zoo train-base --dataset {recipe.dataset} "
                         f"--arch {recipe.teacher_arch} --out {out}")
    from bdscan.io import load_model

    tw = load_model(tpath).wrapper
    if tw.num_classes != student.num_classes or tw.input_size != student.input_size:
        raise UsageError(f"teacher {tpath.name} ({tw.num_classes} classes, {tw.input_size}) does not match {recipe.dataset}",
                         "give a teacher trained on the same data set")
    tw.eval().requires_grad_(False).to(dev)
    md = tw.info.metadata
    desc = {"file": tpath.name, "sha256": _sha256(tpath), "arch": tw.info.arch, "clean_acc": md.get("clean_acc"),
            "distillation": "hard-label (DeiT)"}
    return tw, desc


def _save_half(wrapper: ModelWrapper, path: Path) -> None:
    import copy

    from bdscan.io import save_safetensors

    half = ModelWrapper(copy.deepcopy(wrapper.net).half(), wrapper.info)
    save_safetensors(half, path)


# ----------------------------------------------------------------------------------------------- CLI


def train_base_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo train-base --dataset gtsrb --arch bdscan_vit --out DIR``: trains one clean base
    of the evaluation zoo from its registered recipe, resumably (rerun the same command to continue)."""
    from bdscan.lab.base import train_base
    from bdscan.lab.recipes import base_recipe, get_recipe

    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo train-base",
                                 description="Train one clean base of the evaluation zoo (resumable: rerun to continue).")
    ap.add_argument("--dataset", choices=["gtsrb", "cifar10"], help="data set (with --arch picks the recipe <dataset>_<arch>)")
    ap.add_argument("--arch", help="architecture, e.g. bdscan_vit")
    ap.add_argument("--recipe", help="a registered recipe by name instead of --dataset/--arch (see the 'recipes' subcommand)")
    ap.add_argument("--out", required=True, help="output folder (model, checkpoint, per-epoch history)")
    ap.add_argument("--data-dir", default=None, help="folder with <dataset>_32.npz (default: shared/data)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave the other core free)")
    ap.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 0 on CPU, 6 on CUDA)")
    ap.add_argument("--teacher", default=None, help="teacher .safetensors for DeiT (default: the ResNet-18 base in --out)")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (a different recipe digest)")
    ap.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    ap.add_argument("--max-train", type=int, default=None, help="train on at most this many images (smoke tests)")
    ap.add_argument("--restart", action="store_true", help="ignore an existing checkpoint or model and start over")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.recipe:
            recipe = get_recipe(args.recipe)
        elif args.dataset and args.arch:
            recipe = base_recipe(args.dataset, args.arch)
        else:
            raise UsageError("give --dataset and --arch, or --recipe", "e.g. --dataset gtsrb --arch bdscan_vit")
        recipe = recipe.with_overrides(epochs=args.epochs, seed=args.seed)
        workers = args.workers if args.workers is not None else (6 if args.device.startswith("cuda") else 0)
        res = train_base(recipe, args.out, data_dir=find_data_dir(args.data_dir), device=args.device, threads=args.threads,
                         workers=workers, teacher=args.teacher, restart=args.restart, max_train=args.max_train)
    except BdscanError as e:
        log.error("%s", e)
        return 2
    log.info("%s: clean accuracy %.4f%s", res.path, res.clean_acc, " (already trained)" if res.skipped else "")
    return 0


def recipes_main(argv: Sequence[str]) -> int:
    """``python -m bdscan.lab.zoo recipes [--json]``: the registered base recipes."""
    from bdscan.lab.recipes import get_recipe, list_recipes

    ap = argparse.ArgumentParser(prog="python -m bdscan.lab.zoo recipes", description="List the evaluation zoo's base recipes.")
    ap.add_argument("--json", action="store_true", help="full recipes as JSON")
    args = ap.parse_args(argv)
    recs = [get_recipe(n) for n in list_recipes()]
    if args.json:
        sys.stdout.write(json.dumps([r.to_dict() for r in recs], indent=2) + "\n")
    else:
        for r in recs:
            sys.stdout.write(f"{r.name:18s} {r.arch:16s} {r.epochs:3d} epochs  {r.optimizer:5s} lr {r.lr:g}  "
                             f"{r.auto_augment}{' +mix' if r.mix_prob else ''}{' teacher ' + r.teacher_arch if r.teacher_arch else ''}"
                             f"  {r.arch_kwargs or ''}\n")
    return 0
