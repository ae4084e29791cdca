"""The paper's "pretrained backdoor attack": fine-tune a clean model on partly poisoned training data.

A fixed, seeded share (``poison_rate``, default 10 %) of the training images carries the trigger and the
target label; the rest stay clean. The trigger is stamped after augmentation, so it always sits where the
attack put it. Clean accuracy and attack success rate (ASR, on test images not of the target class) are
measured on the same fixed test subsample as the clean twin.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from bdscan.errors import UsageError
from bdscan.lab.attacks import ATTACKS, AttackConfig, make_trigger
from bdscan.lab.labdata import AugmentConfig, load_lab_data, split_train_val
from bdscan.lab.train import LAB_VERSION, Poison, Progress, arch_defaults, clone_for_training, evaluate, fill_unset, fit
from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InjectConfig:
    """How :func:`inject` fine-tunes. ``None`` fields take the architecture's defaults.

    Attributes:
        poison_rate: share of the fine-tuning images that carry the trigger (relabelled to the target).
        epochs: fine-tuning passes (default per architecture, see :data:`bdscan.lab.train.ARCH_DEFAULTS`).
        lr: peak learning rate (default: the architecture's training lr × ``inject_lr_factor``).
        max_train: fine-tune on at most this many training images (default per architecture).
        optimizer, weight_decay, label_smoothing, warmup_epochs: as in training (defaults per architecture;
            warm-up defaults to 0.2 epochs).
        batch_size: images per step.
        val_fraction: the validation split of training, left out here too (same seed → same split).
        test_subsample: test images for clean accuracy and ASR (fixed draw, same as training).
        augment: see :class:`~bdscan.lab.train.AugmentConfig`.
        grad_clip: max gradient norm.
        seed: poisoned-subset draw, shuffling, augmentation, and the trigger's own randomness.
        threads: ``torch.set_num_threads`` while running; None leaves it alone.
        trigger_images: clean images used to compute model-dependent triggers (trojan).
    """

    poison_rate: float = 0.1
    epochs: int | None = None
    lr: float | None = None
    max_train: int | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    warmup_epochs: float | None = 0.2
    batch_size: int = 128
    val_fraction: float = 0.1
    test_subsample: int | None = 2000
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    grad_clip: float | None = 1.0
    seed: int = 0
    threads: int | None = 1
    trigger_images: int = 512

    def resolved(self, arch: str) -> InjectConfig:
        d = arch_defaults(arch)
        return fill_unset(self, epochs=d.inject_epochs, lr=d.lr * d.inject_lr_factor, max_train=d.inject_max_train,
                          optimizer=d.optimizer, weight_decay=d.weight_decay, label_smoothing=d.label_smoothing,
                          warmup_epochs=d.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["augment"] = asdict(self.augment)
        return out


@dataclass(frozen=True)
class InjectResult:
    """What :func:`inject` returns.

    Attributes:
        wrapper: the poisoned model (eval mode, gradients off); its metadata holds clean accuracy,
            ``attack_success_rate``, the attack and its parameters, and the clean twin's accuracy.
        trigger: the original trigger (save it with ``save_safetensors(..., trigger=result.trigger)``).
        clean_acc: the poisoned model's accuracy on clean test images.
        asr: share of stamped test images not of the target class that go to the target.
        clean_twin_acc: the clean model's accuracy on the same test images.
        seconds: wall time.
        history: per-epoch stats of the fine-tuning.
    """

    wrapper: ModelWrapper
    trigger: Trigger
    clean_acc: float
    asr: float
    clean_twin_acc: float
    seconds: float
    history: tuple[dict[str, Any], ...] = ()


def inject(
    clean: ModelWrapper,
    data_npz: str | Path,
    attack: AttackConfig,
    cfg: InjectConfig | None = None,
    progress: Progress | None = None,
) -> InjectResult:
    """Backdoors a copy of ``clean`` by fine-tuning on poisoned training data (``clean`` is not modified).

    Args:
        clean: the clean model ([0, 1] images in, logits out).
        data_npz: the training archive the clean model was trained on.
        attack: which attack, target and parameters (see :data:`bdscan.lab.attacks.ATTACKS`).
        cfg: fine-tuning recipe.
        progress: called after every step with (done, total, stats) (the trojan trigger's optimisation too).

    Returns:
        :class:`InjectResult`.
    """
    if attack.name not in ATTACKS:
        raise UsageError(f"unknown attack {attack.name!r}", f"use one of: {', '.join(sorted(ATTACKS))}")
    arch = clean.info.arch
    cfg = (cfg or InjectConfig()).resolved(arch)
    if not 0 < cfg.poison_rate < 1:
        raise UsageError(f"poison rate {cfg.poison_rate} is not in (0, 1)", "use e.g. 0.1")
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        data = load_lab_data(data_npz)
        if data.num_classes != clean.num_classes or data.input_size != tuple(clean.input_size):
            raise UsageError(
                f"{Path(data_npz).name} has {data.num_classes} classes of {data.input_size} images but the model takes "
                f"{clean.num_classes} classes of {tuple(clean.input_size)}",
                "inject with the data set the clean model was trained on",
            )
        if not 0 <= attack.target < data.num_classes:
            raise UsageError(f"target {attack.target} is not a class (0..{data.num_classes - 1})", "choose a valid target")
        seed = cfg.seed
        tr, _ = split_train_val(data, cfg.val_fraction, seed)
        if cfg.max_train and len(tr) > cfg.max_train:
            tr = tr[: cfg.max_train]
        x_u8, y = data.x_train[tr], data.y_train[tr]
        g = torch.Generator().manual_seed(seed + 1)
        n_poison = max(1, round(cfg.poison_rate * len(y)))
        flags = torch.zeros(len(y), dtype=torch.bool)
        flags[torch.randperm(len(y), generator=g)[:n_poison]] = True

        trig_x = x_u8[torch.randperm(len(y), generator=g)[: cfg.trigger_images]].float() / 255.0
        trigger = make_trigger(attack, data.input_size, model=clean, x=trig_x, progress=progress)

        xt, yt = data.test_set(cfg.test_subsample)
        twin_acc, twin_asr = evaluate(clean, xt, yt, trigger)
        model = clone_for_training(clean)
        name = clean.info.metadata.get("dataset") or data.name
        log.info("injecting %s (target %d) into %s: %d of %d images poisoned, %d epochs",
                 attack.name, attack.target, arch, n_poison, len(y), cfg.epochs)
        history = fit(
            model,
            x_u8,
            y,
            epochs=int(cfg.epochs),  # type: ignore[arg-type]
            lr=float(cfg.lr),  # type: ignore[arg-type]
            optimizer=str(cfg.optimizer),
            weight_decay=float(cfg.weight_decay),  # type: ignore[arg-type]
            label_smoothing=float(cfg.label_smoothing),  # type: ignore[arg-type]
            warmup_epochs=float(cfg.warmup_epochs),  # type: ignore[arg-type]
            batch_size=cfg.batch_size,
            augment=cfg.augment.resolved(name),
            grad_clip=cfg.grad_clip,
            seed=seed,
            poison=Poison(trigger, flags, int(attack.target)),
            progress=progress,
            label=f"inject {attack.name} into {arch}",
        )
        clean_acc, asr = evaluate(model, xt, yt, trigger)
    asr = float(asr or 0.0)
    seconds = time.perf_counter() - t0
    twin_md = clean.info.metadata
    meta = {
        **{k: twin_md[k] for k in ("dataset", "dataset_file", "test_subsample", "val_split") if k in twin_md},
        "kind": attack.name,
        "clean_acc": round(clean_acc, 4),
        "attack_success_rate": round(asr, 4),
        "target": int(attack.target),
        "target_name": clean.info.class_name(int(attack.target)),
        "attack": {"name": attack.name, "target": int(attack.target), **trigger.params},
        "clean_twin_acc": round(twin_acc, 4),
        "clean_twin_asr": round(float(twin_asr or 0.0), 4),
        "clean_twin": {k: twin_md.get(k) for k in ("zoo_name", "clean_acc", "epochs", "seed")},
        "test_images": len(yt),
        "poison_rate": cfg.poison_rate,
        "poisoned_images": n_poison,
        "finetune_images": len(y),
        "epochs": cfg.epochs,
        "seed": seed,
        "inject_config": cfg.to_dict(),
        "train_config": twin_md.get("train_config"),
        "inject_seconds": round(seconds, 1),
        "lab_version": LAB_VERSION,
    }
    model.info = model.info.with_(metadata=meta)
    model.requires_grad_(False)
    model.eval()
    log.info("%s into %s: clean accuracy %.4f (twin %.4f), ASR %.4f in %.0f s", attack.name, arch, clean_acc, twin_acc, asr, seconds)
    return InjectResult(model, trigger, clean_acc, asr, twin_acc, seconds, tuple(history))
