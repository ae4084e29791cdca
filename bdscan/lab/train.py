"""Training clean models from scratch on a 32×32 ``.npz`` data set, on CPU, one thread by default.

The data sets are ``.npz`` archives with uint8 NHWC ``x_train``/``y_train``/``x_test``/``y_test`` and
``class_names`` (optionally ``track_train`` for grouped validation splits, as in GTSRB). Everything
here is library code: no printing; progress goes to an optional callback and to :mod:`logging`.

Per-architecture defaults (:data:`ARCH_DEFAULTS`) are chosen so that each model of bdscan's zoo trains
in a few minutes on one CPU core; the accuracies are therefore below the paper's (which fine-tuned
ImageNet-pretrained transformers), and every model's metadata says exactly how it was trained.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

import bdscan.models  # noqa: F401  (registers bdscan architectures with timm)
from bdscan.errors import DataLoadError, NumericalError, UsageError
from bdscan.lab.labdata import TEST_SUBSAMPLE_SEED, AugmentConfig, LabData, augment_batch, load_lab_data, split_train_val
from bdscan.machine import torch_threads
from bdscan.models.grid import find_token_grid
from bdscan.models.wrapper import ModelInfo, ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

#: (done, total, stats): called after every optimisation step
Progress = Callable[[int, int, dict[str, Any]], None]

#: version of the lab's training recipe; part of the zoo's configuration hash
LAB_VERSION = 1



@dataclass(frozen=True)
class ArchDefaults:
    """Training recipe of one architecture (see :data:`ARCH_DEFAULTS`)."""

    epochs: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.5
    #: fine-tuning (injection) recipe: epochs over at most ``inject_max_train`` images, lr factor
    inject_epochs: int = 3
    inject_max_train: int = 8000
    inject_lr_factor: float = 0.5


#: per-architecture defaults, measured on one thread of the 2-core CPU (about 30 s per GTSRB epoch for
#: cnn6/vit/deit, 40 s for resnet18, 50 s for convit, 67 s for cct, with 12 k training images; more when the
#: other core is busy)
ARCH_DEFAULTS: dict[str, ArchDefaults] = {
    "bdscan_cnn6": ArchDefaults(epochs=8, lr=2e-3, weight_decay=5e-4, inject_epochs=4),
    "bdscan_resnet18": ArchDefaults(epochs=6, lr=2e-3, weight_decay=5e-4, inject_epochs=3),
    # transformers from scratch are far from converged after a few epochs: a higher peak lr helps, and
    # injection needs about the training lr (at half of it a ViT learnt a BadNets patch to only 12 % ASR)
    "bdscan_vit": ArchDefaults(epochs=9, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, warmup_epochs=1.0,
                               inject_epochs=4, inject_lr_factor=1.0),
    "bdscan_deit": ArchDefaults(epochs=8, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, warmup_epochs=1.0,
                                inject_epochs=4, inject_lr_factor=1.0),
    # ConViT learns slowest of all: 5 epochs gave 31 % on GTSRB (train accuracy 38 %), so it gets 10 (~9 min)
    "bdscan_convit": ArchDefaults(epochs=10, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, warmup_epochs=1.0,
                                  inject_epochs=3, inject_max_train=6000, inject_lr_factor=1.0),
    "bdscan_cct": ArchDefaults(epochs=4, lr=1.5e-3, weight_decay=0.05, label_smoothing=0.1, warmup_epochs=0.5,
                               inject_epochs=3, inject_max_train=5000, inject_lr_factor=1.0),
}
GENERIC_DEFAULTS = ArchDefaults(epochs=5, lr=1e-3, weight_decay=0.05)


_Config = TypeVar("_Config")


def fill_unset(cfg: _Config, **defaults: Any) -> _Config:
    """A copy of the dataclass ``cfg`` in which every field named in ``defaults`` that is unset (None, or an empty
    name such as ``optimizer=""``) takes its default; a zero stays a zero."""
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) in (None, "")})  # type: ignore[type-var]


def arch_defaults(arch: str) -> ArchDefaults:
    return ARCH_DEFAULTS.get(arch, GENERIC_DEFAULTS)


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_clean` trains. ``None`` fields take the architecture's default (:data:`ARCH_DEFAULTS`).

    Attributes:
        epochs: passes over the training split.
        lr: peak learning rate (linear warm-up, then cosine decay to 0).
        optimizer: "adamw" or "sgd" (momentum 0.9, Nesterov).
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        label_smoothing: for the cross-entropy (transformers use 0.1).
        warmup_epochs: linear warm-up length.
        batch_size: images per step.
        val_fraction: held-out validation share of the training images (grouped by ``track_train`` if present).
        test_subsample: evaluate on this many test images drawn with a fixed seed (None or 0 = all).
        max_train: use at most this many training images (None = all), for quick runs and tests.
        augment: see :class:`AugmentConfig`.
        grad_clip: max gradient norm (None = off).
        seed: seeds initialisation, split, shuffling and augmentation.
        threads: ``torch.set_num_threads`` while training (restored after); None leaves it alone.
        teacher: DeiT's CNN teacher for hard-label distillation (only used for distilled architectures).
        dataset: data set name for metadata (None = the file's stem without ``_32``).
    """

    epochs: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    warmup_epochs: float | None = None
    batch_size: int = 128
    val_fraction: float = 0.1
    test_subsample: int | None = 2000
    max_train: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    grad_clip: float | None = 1.0
    seed: int = 0
    threads: int | None = 1
    teacher: ModelWrapper | None = field(default=None, compare=False, repr=False)
    dataset: str | None = None

    def resolved(self, arch: str) -> TrainConfig:
        """A copy with every ``None`` recipe field filled from the architecture's defaults."""
        d = arch_defaults(arch)
        return fill_unset(self, epochs=d.epochs, lr=d.lr, optimizer=d.optimizer, weight_decay=d.weight_decay,
                          label_smoothing=d.label_smoothing, warmup_epochs=d.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without the teacher module)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "teacher"}
        out["augment"] = asdict(self.augment)
        return out


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_clean` returns.

    Attributes:
        wrapper: the trained model (eval mode, gradients off); ``wrapper.info.metadata`` holds the dataset,
            accuracies, epochs, seed and the resolved configuration.
        clean_acc: accuracy on the (subsampled) test set.
        val_acc: accuracy on the held-out validation split (None when ``val_fraction`` is 0).
        seconds: wall time of training plus evaluation.
        history: one dict per epoch (loss, train accuracy, validation accuracy, seconds).
    """

    wrapper: ModelWrapper
    clean_acc: float
    val_acc: float | None
    seconds: float
    history: tuple[dict[str, Any], ...] = ()


# ------------------------------------------------------------------------------------------- training


def optimizer_step(loss: torch.Tensor, net: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, grad_clip: float | None, where: str,
                   hint: str = "lower the learning rate") -> float:
    """One training step from ``loss``: backward, optional gradient clipping, the optimiser's and the schedule's
    step. Returns the loss as a float; raises :class:`NumericalError` (naming ``where``) once it is not finite, so a
    diverging run stops instead of writing a model of NaNs."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    sched.step()
    loss_v = float(loss.detach())
    if not math.isfinite(loss_v):
        raise NumericalError(f"{where}: the loss became {loss_v}", hint)
    return loss_v


def classifier_of(net: nn.Module) -> nn.Module:
    """The final classification layer (timm's ``get_classifier()``, else ``head``/``fc``)."""
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, (tuple, list)):
            head = head[0]
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    for name in ("head", "fc", "classifier"):
        m = getattr(net, name, None)
        if isinstance(m, nn.Module):
            return m
    raise UsageError(f"cannot find the classification layer of {type(net).__name__}", "use a timm or bdscan architecture")


def is_distilled(net: nn.Module) -> bool:
    return hasattr(net, "set_distilled_training") and hasattr(net, "head_dist")


def make_optimizer(net: nn.Module, name: str, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW (no decay on biases, norms, tokens, position embeddings) or SGD with Nesterov momentum."""
    decay, no_decay = [], []
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token", "dist_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise UsageError(f"unknown optimizer {name!r}", "use adamw or sgd")


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@dataclass(frozen=True)
class Poison:
    """Which training images carry a trigger during a training loop (data poisoning).

    Attributes:
        trigger: stamped after augmentation, so it stays at its position.
        flags: (N,) bool over the loop's training images: True = stamp and relabel.
        target: the label poisoned images get.
    """

    trigger: Trigger
    flags: torch.Tensor
    target: int


def fit(
    wrapper: ModelWrapper,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    label_smoothing: float,
    warmup_epochs: float,
    batch_size: int,
    augment: AugmentConfig,
    grad_clip: float | None,
    seed: int,
    teacher: ModelWrapper | None = None,
    poison: Poison | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Progress | None = None,
    label: str = "train",
) -> list[dict[str, Any]]:
    """The lab's training loop (used for clean training and for injection); returns per-epoch stats.

    ``x_u8`` is (N, C, H, W) uint8; images are scaled to [0, 1], augmented, optionally stamped
    (``poison``), then normalised by the wrapper. Distilled models (DeiT) train both heads: the class
    head on the labels, the distillation head on the teacher's hard predictions (or on the labels
    without a teacher, and always on the poisoned labels for stamped images).
    """
    net = wrapper.net
    n = len(y)
    if n < batch_size:
        batch_size = max(1, n)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    opt = make_optimizer(net, optimizer, lr, weight_decay)
    sched = warmup_cosine(opt, int(warmup_epochs * steps_per_epoch), total)
    g = torch.Generator().manual_seed(seed)
    distilled = is_distilled(net)
    if teacher is not None:
        teacher.eval()
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        net.train()
        if distilled:
            net.set_distilled_training(True)
        perm = torch.randperm(n, generator=g)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb = augment_batch(x_u8[idx].float().div_(255.0), augment, g)
            yb = y[idx].clone()
            stamped = None
            if poison is not None:
                stamped = poison.flags[idx]
                if stamped.any():
                    xb[stamped] = poison.trigger.stamp(xb[stamped])
                    yb[stamped] = poison.target
            out = net(wrapper.normalise(xb))
            if isinstance(out, (tuple, list)):
                cls_out, dist_out = out[0], out[1]
                if teacher is not None:
                    with torch.no_grad():
                        ty = teacher(xb).argmax(1)
                    if stamped is not None:
                        ty = torch.where(stamped, yb, ty)
                else:
                    ty = yb
                loss = 0.5 * F.cross_entropy(cls_out, yb, label_smoothing=label_smoothing) + 0.5 * F.cross_entropy(dist_out, ty)
                logits = (cls_out + dist_out) / 2
            else:
                logits = out
                loss = F.cross_entropy(out, yb, label_smoothing=label_smoothing)
            loss_v = optimizer_step(loss, net, opt, sched, grad_clip, f"{label}, step {step + 1}")
            step += 1
            loss_sum += loss_v * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if progress is not None:
                progress(step, total, {"phase": label, "epoch": epoch + 1, "epochs": epochs, "loss": loss_sum / seen,
                                       "train_acc": correct / seen})
        if distilled:
            net.set_distilled_training(False)
        net.eval()
        stats: dict[str, Any] = {"epoch": epoch + 1, "loss": round(loss_sum / max(1, seen), 4),
                                 "train_acc": round(correct / max(1, seen), 4)}
        if val is not None and len(val[1]):
            stats["val_acc"] = round(evaluate(wrapper, val[0], val[1])[0], 4)
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(stats)
        log.info("%s epoch %d/%d: %s", label, epoch + 1, epochs, stats)
    net.eval()
    return history


@torch.no_grad()
def evaluate(
    wrapper: ModelWrapper,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    trigger: Trigger | None = None,
    batch_size: int = 500,
) -> tuple[float, float | None]:
    """Clean accuracy and attack success rate.

    Args:
        wrapper: the model.
        x: images, float (N, C, H, W) in [0, 1], or uint8 (N, H, W, C) / (N, C, H, W).
        y: labels (N,).
        trigger: when given, the ASR is the share of images *not* of ``trigger.target`` that the stamped
            image sends to the target (all images if the target is None: share whose label changes).

    Returns:
        (clean accuracy, ASR or None when no trigger was given).
    """
    x = _as_float_nchw(x, wrapper.input_size[0])
    y = torch.as_tensor(y).long()
    if len(y) == 0:
        raise DataLoadError("no images to evaluate on", "give a non-empty test set")
    was_training = wrapper.training
    wrapper.eval()
    dev = next(wrapper.parameters(), torch.empty(0)).device
    correct, hit, n_other = 0, 0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        correct += int((wrapper(xb).argmax(1) == yb).sum())
        if trigger is not None:
            keep = yb != trigger.target if trigger.target is not None else torch.ones_like(yb, dtype=torch.bool)
            if keep.any():
                pred = wrapper(trigger.stamp(xb[keep])).argmax(1)
                hit += int((pred == trigger.target).sum()) if trigger.target is not None else int((pred != yb[keep]).sum())
                n_other += int(keep.sum())
    wrapper.train(was_training)
    asr = (hit / n_other if n_other else 0.0) if trigger is not None else None
    return correct / len(y), asr


def _as_float_nchw(x: torch.Tensor | np.ndarray, channels: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        if t.dim() == 4 and t.shape[1] != channels and t.shape[-1] == channels:
            t = t.permute(0, 3, 1, 2)
        return t.float() / 255.0
    return t.float()


# ------------------------------------------------------------------------------------------ the API


def build_wrapper(arch: str, data: LabData, seed: int, arch_kwargs: dict[str, Any] | None = None) -> ModelWrapper:
    """A freshly initialised model for ``data`` (seeded), wrapped with the data set's normalisation.

    ``arch_kwargs`` (e.g. ``{"embed_dim": 128, "depth": 6}``) go to the architecture and into the model's
    :class:`ModelInfo`, so that a saved file is rebuilt at the same size when loaded.
    """
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": data.input_size[0]}
    if arch.startswith("bdscan_") or any(k in arch for k in ("vit", "deit", "convit")):
        kwargs["img_size"] = data.input_size[1]
    if not timm.is_model(arch):
        raise UsageError(f"unknown architecture {arch!r}", "use one of bdscan's (bdscan_cnn6, bdscan_vit, ...) or a timm name")
    try:
        net = timm.create_model(arch, pretrained=False, **kwargs, **(arch_kwargs or {}))
    except TypeError as e:
        raise UsageError(f"{arch} does not take the arguments {arch_kwargs}: {e}", "fix the recipe's arch_kwargs") from e
    mean, std = data.mean_std
    info = ModelInfo(
        arch=arch,
        num_classes=data.num_classes,
        input_size=data.input_size,
        mean=mean,
        std=std,
        class_names=data.class_names,
        token_grid=find_token_grid(net, data.input_size),
        arch_kwargs=dict(arch_kwargs or {}),
    )
    return ModelWrapper(net, info)


def train_clean(
    arch: str,
    data_npz: str | Path,
    cfg: TrainConfig | None = None,
    progress: Progress | None = None,
    teacher: ModelWrapper | None = None,
) -> TrainResult:
    """Trains a clean model from scratch.

    Args:
        arch: timm registry name (``bdscan_cnn6``, ``bdscan_vit``, ...; see :data:`ARCH_DEFAULTS`).
        data_npz: training archive (uint8 NHWC ``x_train``/``y_train``/``x_test``/``y_test``, ``class_names``,
            optional ``track_train``).
        cfg: the recipe; ``None`` fields take the architecture's defaults.
        progress: called after every step with (done, total, stats).
        teacher: DeiT's CNN teacher for hard-label distillation (overrides ``cfg.teacher``).

    Returns:
        :class:`TrainResult`; the wrapper's metadata records dataset, accuracies, epochs, seed and recipe.
    """
    cfg = (cfg or TrainConfig()).resolved(arch)
    teacher = teacher if teacher is not None else cfg.teacher
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        data = load_lab_data(data_npz)
        name = cfg.dataset or data.name
        tr, va = split_train_val(data, cfg.val_fraction, cfg.seed)
        if cfg.max_train and len(tr) > cfg.max_train:
            tr = tr[: cfg.max_train]
        wrapper = build_wrapper(arch, data, cfg.seed)
        use_teacher = teacher if is_distilled(wrapper.net) else None
        if teacher is not None and use_teacher is None:
            log.warning("%s has no distillation token; the teacher is ignored", arch)
        aug = cfg.augment.resolved(name)
        log.info("training %s on %s: %d train / %d val images, %d epochs", arch, name, len(tr), len(va), cfg.epochs)
        history = fit(
            wrapper,
            data.x_train[tr],
            data.y_train[tr],
            epochs=int(cfg.epochs),  # type: ignore[arg-type]
            lr=float(cfg.lr),  # type: ignore[arg-type]
            optimizer=str(cfg.optimizer),
            weight_decay=float(cfg.weight_decay),  # type: ignore[arg-type]
            label_smoothing=float(cfg.label_smoothing),  # type: ignore[arg-type]
            warmup_epochs=float(cfg.warmup_epochs),  # type: ignore[arg-type]
            batch_size=cfg.batch_size,
            augment=aug,
            grad_clip=cfg.grad_clip,
            seed=cfg.seed,
            teacher=use_teacher,
            val=(data.x_train[va].float() / 255.0, data.y_train[va]) if len(va) else None,
            progress=progress,
            label=f"train {arch}",
        )
        xt, yt = data.test_set(cfg.test_subsample)
        clean_acc, _ = evaluate(wrapper, xt, yt)
    val_acc = history[-1].get("val_acc") if history else None
    seconds = time.perf_counter() - t0
    meta = {
        "dataset": name,
        "dataset_file": Path(data.path).name,
        "kind": "clean",
        "clean_acc": round(clean_acc, 4),
        "val_acc": val_acc,
        "test_images": len(yt),
        "test_subsample": f"{len(yt)} of {len(data.y_test)} test images (torch.randperm, seed {TEST_SUBSAMPLE_SEED})",
        "train_images": len(tr),
        "val_images": len(va),
        "val_split": "grouped by track_train" if data.groups is not None else "random",
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train_config": {**cfg.to_dict(), "augment": asdict(aug)},
        "teacher": _teacher_desc(use_teacher),
        "train_seconds": round(seconds, 1),
        "lab_version": LAB_VERSION,
    }
    wrapper.info = wrapper.info.with_(metadata=meta)
    wrapper.requires_grad_(False)
    log.info("trained %s on %s: test accuracy %.4f (val %s) in %.0f s", arch, name, clean_acc, val_acc, seconds)
    return TrainResult(wrapper, clean_acc, val_acc, seconds, tuple(history))


def _teacher_desc(teacher: ModelWrapper | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    md = teacher.info.metadata
    return {"arch": teacher.info.arch, "clean_acc": md.get("clean_acc"), "name": md.get("zoo_name"),
            "distillation": "hard-label (DeiT)"}


def clone_for_training(wrapper: ModelWrapper) -> ModelWrapper:
    """A deep copy with gradients enabled (loaded models have them switched off)."""
    w = copy.deepcopy(wrapper)
    w.requires_grad_(True)
    return w


def round_to_half_(wrapper: ModelWrapper) -> None:
    """Rounds the floating-point weights and buffers to float16 precision in place (what a float16 file holds),
    so that accuracies measured afterwards are exactly those of the stored model."""
    with torch.no_grad():
        for t in list(wrapper.net.parameters()) + list(wrapper.net.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
