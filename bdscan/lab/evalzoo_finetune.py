"""Fine-tuning a clean base on (partly poisoned) training data: the evaluation zoo's backdoored models and
clean twins (the paper's "pretrained" attack: the attacker fine-tunes a model that already works).

The same loop makes both: a backdoored model fine-tunes on data where a fixed, seeded share of the images
(``poison_rate``) carries the trigger and the target label; its clean twins fine-tune the same way with no
poisoned images and another seed, so that a clean model of the zoo is not simply the base.

Deterministic: every random draw (which images are poisoned, shuffling, each batch's crop and flip, dropout,
WaNet's noise) comes from a generator seeded from (seed, purpose, step), never from the history of the process,
so two runs with the same seed, device and thread count give bit-identical weights. Augmentation is the base
recipe's crop and flip only (no auto-augment, no mixing: a few hundred steps at a low learning rate do not
over-fit, and the trigger, stamped *after* augmentation, must stay where it is); DeiT trains both heads on the
(poisoned) labels, without its teacher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bdscan.errors import UsageError
from bdscan.lab.attacks_transform import TransformTrigger
from bdscan.lab.labdata import AugmentConfig, LabData, augment_batch
from bdscan.lab.train import evaluate, is_distilled, make_optimizer, optimizer_step, warmup_cosine
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

#: (done, total, stats) after every step
Progress = Callable[[int, int, dict[str, Any]], None]

# independent random streams (see bdscan.lab.base.stream_seed)
_STREAM_FLAGS, _STREAM_SHUFFLE, _STREAM_AUG, _STREAM_STEP, _STREAM_NOISE = 10, 11, 12, 13, 14


def _seed(seed: int, stream: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class FinetuneRecipe:
    """How a base is fine-tuned (one per model, recorded in full in its manifest row and file).

    Attributes:
        steps: optimisation steps (batches), whatever the data set's size.
        batch_size: images per step.
        optimizer: "sgd" (Nesterov momentum 0.9) or "adamw", as the base was trained.
        lr: peak learning rate; linear warm-up over ``warmup_steps``, cosine decay to 0.
        weight_decay: as in :func:`bdscan.lab.train.make_optimizer` (no decay on norms, biases, tokens).
        warmup_steps: linear warm-up length.
        label_smoothing: of the cross-entropy.
        grad_clip: max gradient norm (None: off).
        crop_pad: random crop after zero padding (0: off).
        hflip: random horizontal flips (only where they keep the label: CIFAR-10, not traffic signs).
        poison_rate: share of the training images that carry the trigger and the target label (0: a clean twin).
        cross_ratio: WaNet's noise mode: this many noise-warped images (true labels) per poisoned image.
        version: bumped when the loop changes in a way that changes the weights.
    """

    steps: int = 400
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 5e-4
    warmup_steps: int = 20
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    crop_pad: int = 4
    hflip: bool = False
    poison_rate: float = 0.0
    cross_ratio: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UsageError("fine-tune recipe: steps and batch_size must be >= 1", "fix the manifest row's finetune")
        if not 0 <= self.poison_rate < 1 or self.cross_ratio < 0 or self.poison_rate * (1 + self.cross_ratio) >= 1:
            raise UsageError(f"fine-tune recipe: poison_rate {self.poison_rate} / cross_ratio {self.cross_ratio} out of range",
                             "use 0 <= poison_rate and poison_rate * (1 + cross_ratio) < 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise UsageError(f"fine-tune recipe: unknown optimizer {self.optimizer!r}", "use sgd or adamw")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneRecipe:
        return cls(**d)


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        wrapper: the fine-tuned model (float32, eval mode, gradients off; not yet rounded to float16).
        poisoned: training images that carried the trigger.
        noise_images: training images in WaNet's noise mode.
        history: loss and accuracy on the training batches, every 50 steps and at the end.
        seconds: wall time of the loop.
    """

    wrapper: ModelWrapper
    poisoned: int
    noise_images: int
    history: tuple[dict[str, Any], ...]
    seconds: float


def poison_flags(n: int, recipe: FinetuneRecipe, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(poisoned, noise-mode) boolean flags over ``n`` training images: disjoint, fixed by ``seed``."""
    g = torch.Generator().manual_seed(_seed(seed, _STREAM_FLAGS, 0))
    perm = torch.randperm(n, generator=g)
    n_p = round(recipe.poison_rate * n) if recipe.poison_rate > 0 else 0
    if recipe.poison_rate > 0:
        n_p = max(1, n_p)
    n_x = round(recipe.cross_ratio * n_p)
    poisoned = torch.zeros(n, dtype=torch.bool)
    noise = torch.zeros(n, dtype=torch.bool)
    poisoned[perm[:n_p]] = True
    noise[perm[n_p : n_p + n_x]] = True
    return poisoned, noise


def finetune(
    base: ModelWrapper,
    data: LabData,
    recipe: FinetuneRecipe,
    seed: int,
    trigger: Trigger | None = None,
    target: int | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    probe: Callable[[int, ModelWrapper], dict[str, Any]] | None = None,
    probe_every: int = 100,
) -> FinetuneResult:
    """Fine-tunes a copy of ``base`` (which is left untouched) on ``data``'s training split.

    Args:
        base: the clean base ([0, 1] images in, logits out).
        data: its data set (the whole training split is used).
        recipe: see :class:`FinetuneRecipe`; ``poison_rate > 0`` needs ``trigger`` and ``target``.
        seed: every random draw of the run.
        trigger: stamped (or applied, for transform triggers) on the poisoned images after augmentation.
        target: the label poisoned images get.
        device: where to train.
        progress: called after every step.
        probe: called every ``probe_every`` steps with (step, model in eval mode), e.g. to measure a learning
            curve; what it returns goes into that step's history record. It must not draw random numbers from
            torch's global generator (the next step reseeds it anyway) nor change the model.

    Returns:
        :class:`FinetuneResult`.
    """
    if recipe.poison_rate > 0 and (trigger is None or target is None):
        raise UsageError("a poisoned fine-tune needs a trigger and a target", "give both, or poison_rate 0 for a clean twin")
    import copy

    dev = torch.device(device)
    t0 = time.perf_counter()
    wrapper = copy.deepcopy(base)
    wrapper.requires_grad_(True)
    wrapper.to(dev)
    net = wrapper.net
    x_all, y_all = data.x_train, data.y_train
    n = len(y_all)
    batch = min(recipe.batch_size, n)
    per_epoch = max(1, n // batch)
    poisoned, noise = poison_flags(n, recipe, seed)
    opt = make_optimizer(net, recipe.optimizer, recipe.lr, recipe.weight_decay)
    sched = warmup_cosine(opt, recipe.warmup_steps, recipe.steps)
    aug = AugmentConfig(crop_pad=recipe.crop_pad, hflip=recipe.hflip, jitter=0.0)
    distilled = is_distilled(net)
    noise_fn = trigger.noise if isinstance(trigger, TransformTrigger) and trigger.noise_fn is not None else None
    history: list[dict[str, Any]] = []
    loss_sum, correct, seen = 0.0, 0, 0
    perm = torch.empty(0, dtype=torch.long)
    net.train()
    if distilled:
        net.set_distilled_training(True)
    try:
        for step in range(recipe.steps):
            epoch, b = divmod(step, per_epoch)
            if b == 0:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, _STREAM_SHUFFLE, epoch)))
            idx = perm[b * batch : (b + 1) * batch]
            g = torch.Generator().manual_seed(_seed(seed, _STREAM_AUG, step))
            xb = augment_batch(x_all[idx].float().div_(255.0), aug, g)
            yb = y_all[idx].clone()
            p_b, n_b = poisoned[idx], noise[idx]
            if p_b.any():
                xb[p_b] = trigger.stamp(xb[p_b])  # type: ignore[union-attr]
                yb[p_b] = int(target)  # type: ignore[arg-type]
            if noise_fn is not None and n_b.any():
                xb[n_b] = noise_fn(xb[n_b], torch.Generator().manual_seed(_seed(seed, _STREAM_NOISE, step)))
            # dropout and stochastic depth draw from the global generators: seed them per step
            torch.manual_seed(_seed(seed, _STREAM_STEP, step))
            xb, yb = xb.to(dev), yb.to(dev)
            out = net(wrapper.normalise(xb))
            if isinstance(out, (tuple, list)):  # DeiT: both heads learn the (poisoned) labels
                loss = 0.5 * (F.cross_entropy(out[0], yb, label_smoothing=recipe.label_smoothing)
                              + F.cross_entropy(out[1], yb, label_smoothing=recipe.label_smoothing))
                logits = (out[0] + out[1]) / 2
            else:
                loss = F.cross_entropy(out, yb, label_smoothing=recipe.label_smoothing)
                logits = out
            loss_v = optimizer_step(loss, net, opt, sched, recipe.grad_clip, f"fine-tuning, step {step + 1}",
                                    "lower the recipe's learning rate")
            loss_sum += loss_v * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
                history.append({"step": step + 1, "loss": round(loss_sum / seen, 4), "train_acc": round(correct / seen, 4)})
                if probe is not None and (step + 1) % probe_every == 0:
                    history[-1].update(_probe(wrapper, step + 1, probe, distilled))
                log.info("fine-tune step %d/%d: loss %.4f, train acc %.4f", step + 1, recipe.steps, loss_sum / seen, correct / seen)
                loss_sum, correct, seen = 0.0, 0, 0
            if progress is not None:
                progress(step + 1, recipe.steps, {"phase": "fine-tune", "loss": loss_v})
    finally:
        if distilled:
            net.set_distilled_training(False)
        net.eval()
    wrapper.to("cpu")
    wrapper.requires_grad_(False)
    return FinetuneResult(wrapper, int(poisoned.sum()), int(noise.sum()), tuple(history), time.perf_counter() - t0)


def _probe(wrapper: ModelWrapper, step: int, probe: Callable[[int, ModelWrapper], dict[str, Any]], distilled: bool) -> dict[str, Any]:
    net = wrapper.net
    net.eval()
    if distilled:
        net.set_distilled_training(False)
    try:
        with torch.no_grad():
            return probe(step, wrapper)
    finally:
        if distilled:
            net.set_distilled_training(True)
        net.train()


def measure(wrapper: ModelWrapper, data: LabData, trigger: Trigger | None, device: str | torch.device = "cpu",
            test_images: int | None = None) -> tuple[float, float | None]:
    """(clean accuracy, ASR) on the test split (all of it unless ``test_images``): the ASR is the share of
    triggered test images *not* of the target class that the model sends to the target."""
    xt, yt = data.test_set(test_images)
    dev = torch.device(device)
    wrapper.to(dev)
    try:
        return evaluate(wrapper, xt, yt, trigger)
    finally:
        wrapper.to("cpu")
