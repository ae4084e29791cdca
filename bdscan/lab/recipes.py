"""Named training recipes for the evaluation zoo's clean bases (a registry, as timm's is for models).

A :class:`Recipe` says everything that determines a trained base besides the data: the architecture and
its size (``arch_kwargs``, stored in the model file so that it loads at the same size), epochs, optimiser,
schedule, augmentation, mixing, label smoothing, and the teacher a distilled model (DeiT) learns from.
:func:`bdscan.lab.base.train_base` trains one; ``python -m bdscan.lab.zoo train-base`` is its command line.

Recipes are registered under ``<dataset>_<arch>`` names without the ``bdscan_`` prefix
(``gtsrb_vit``, ``cifar10_resnet18``, ...) and are never changed in place once models were trained from
them: a changed recipe gets a new ``version``, which changes its :meth:`Recipe.digest`, so a checkpoint or
a model of the old recipe is never mistaken for one of the new.

Augmentation: random crop with padding and horizontal flips only where the labels allow them (CIFAR-10 yes;
traffic signs no, since a mirrored "turn left" is a "turn right"), then torchvision's (``transforms.v2``)
TrivialAugmentWide or RandAugment, and its MixUp/CutMix on whole batches.

Epochs were sized from training throughput measured on the 2-core AVX2 host (one torch thread, niced, batch
128, float32 as the CPU has no native bf16; augmentation, mixing and DeiT's teacher included), so that a GTSRB
base takes about 45 minutes and a CIFAR-10 base about 2.5 hours there. The host is shared: "contended" is
``bench_recipes`` with both cores busy (three processes on two cores), "in a run" what a training run
logged with the other core busy. Two threads were 2-3x *slower* than one when the other core was busy
(cnn6 60-76 vs 151 images/s, vit 24-28 vs 89), so the zoo trains with one.

==========================  ======  ===========  ========  ===========================
recipe (size)               params  contended    in a run  epochs (GTSRB / CIFAR-10)
==========================  ======  ===========  ========  ===========================
cnn6 (width 32)             0.20 M  140-151/s    190-250/s 35 / 40
resnet18 (width 16)         0.70 M  93/s         ~160/s    25 / 25
vit (96, depth 6)           0.46 M  88-92/s      ~150/s    30 / 25
deit (96, depth 6)          0.46 M  64/s         ~110/s    22 / 20 (+ the teacher's forward pass)
convit (3x32, depth 6)      0.46 M  70/s         ~120/s    22 / 18
cct (128, depth 4)          0.62 M  59/s         ~100/s    20 / 18
==========================  ======  ===========  ========  ===========================

"in a run" is measured for cnn6 and estimated from the contended ratio (about 1.7) for the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torchvision.transforms import v2

from bdscan.errors import UsageError
from bdscan.lab.labdata import AugmentConfig, augment_batch

#: augmentation policies a recipe may name
AUTO_AUGMENT = ("none", "trivialaugment", "randaugment")


@dataclass(frozen=True)
class Recipe:
    """How one clean base is trained (see :mod:`bdscan.lab.recipes`).

    Attributes:
        name: registry name, ``<dataset>_<arch without bdscan_>``.
        arch: timm registry name of the architecture.
        dataset: "gtsrb" or "cifar10" (archive ``<dataset>_32.npz`` in the data folder).
        arch_kwargs: size of the architecture (stored in the model file).
        epochs: passes over the training split.
        batch_size: images per optimisation step.
        optimizer: "adamw", or "sgd" (momentum 0.9, Nesterov).
        lr: peak learning rate, reached after ``warmup_epochs`` of linear warm-up, then cosine decay to 0.
        weight_decay: decoupled (AdamW) or L2 (SGD); never on biases, norms, tokens, position embeddings.
        warmup_epochs: linear warm-up length.
        label_smoothing: of the cross-entropy on the labels (not on the teacher's).
        grad_clip: max gradient norm (None = off).
        crop_pad: random crop after zero-padding by this many pixels (0 = off).
        hflip: random horizontal flips (only where they keep the label).
        auto_augment: "trivialaugment" (TrivialAugmentWide), "randaugment" or "none".
        randaugment_ops, randaugment_magnitude: RandAugment's N and M (of 31 bins).
        aug_group: images that share one draw of the auto-augment policy (see :func:`augment_batch_u8`).
        mixup_alpha, cutmix_alpha: Beta parameters of MixUp and CutMix (0 = off); one of the two is drawn per
            mixed batch.
        mix_prob: share of batches that are mixed.
        teacher_arch: for distilled models (DeiT): the architecture of the teacher, a base of the same data set
            trained first; hard-label distillation as in DeiT (the distillation head learns the teacher's argmax).
        use_extra_train: train on the complete training split (CIFAR-10: ``cifar10_32.npz`` and
            ``cifar10_train_extra_32.npz``, 50,000 images).
        val_fraction: held-out validation share of the training images (0: train on all, the zoo's default,
            as the last epoch's weights are kept whatever the curve).
        monitor_test: the per-epoch curve is measured on this many test images (fixed draw, seed 0); it is
            only reported, never used to pick epochs or weights. The final accuracy is on the full test split.
        seed: initialisation, shuffling, augmentation.
        version: bumped whenever a registered recipe changes.
        notes: why the recipe is as it is.
    """

    name: str
    arch: str
    dataset: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    crop_pad: int = 4
    hflip: bool = False
    auto_augment: str = "randaugment"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    aug_group: int = 8
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 0.0
    teacher_arch: str | None = None
    use_extra_train: bool = True
    val_fraction: float = 0.0
    monitor_test: int = 2000
    seed: int = 0
    version: int = 1
    notes: str = ""

    def __post_init__(self) -> None:
        if self.auto_augment not in AUTO_AUGMENT:
            raise UsageError(f"recipe {self.name}: unknown auto_augment {self.auto_augment!r}", f"use one of {', '.join(AUTO_AUGMENT)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UsageError(f"recipe {self.name}: unknown optimizer {self.optimizer!r}", "use adamw or sgd")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"recipe {self.name}: epochs and batch_size must be >= 1", "fix the recipe")
        if not 0 <= self.mix_prob <= 1 or (self.mix_prob > 0 and self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            raise UsageError(f"recipe {self.name}: mix_prob {self.mix_prob} needs mixup_alpha or cutmix_alpha > 0", "fix the recipe")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what model metadata and checkpoints record)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(**d)

    def digest(self) -> str:
        """Hash of everything that determines the trained weights (``notes`` excluded)."""
        d = self.to_dict()
        d.pop("notes", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (``None`` values are ignored), e.g. fewer epochs for a quick run."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes) if changes else self

    @property
    def short_arch(self) -> str:
        return self.arch.removeprefix("bdscan_")


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Adds ``recipe`` to the registry (a name may be registered once)."""
    if recipe.name in _RECIPES and _RECIPES[recipe.name] != recipe:
        raise UsageError(f"recipe {recipe.name!r} is already registered", "give the new recipe another name or version")
    _RECIPES[recipe.name] = recipe
    return recipe


def list_recipes(dataset: str | None = None) -> list[str]:
    """Registered recipe names, in registration order (optionally of one data set)."""
    return [n for n, r in _RECIPES.items() if dataset is None or r.dataset == dataset]


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``."""
    try:
        return _RECIPES[name]
    except KeyError:
        raise UsageError(f"no training recipe named {name!r}", f"known: {', '.join(_RECIPES)}") from None


def base_recipe(dataset: str, arch: str) -> Recipe:
    """The recipe of the clean base of ``arch`` (``bdscan_vit`` or ``vit``) on ``dataset``."""
    return get_recipe(f"{dataset}_{arch.removeprefix('bdscan_')}")


# ---------------------------------------------------------------------------------------- augmentation


def auto_augment_policy(recipe: Recipe) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's TrivialAugmentWide or RandAugment for the recipe, or None."""
    if recipe.auto_augment == "trivialaugment":
        return v2.TrivialAugmentWide()
    if recipe.auto_augment == "randaugment":
        return v2.RandAugment(num_ops=recipe.randaugment_ops, magnitude=recipe.randaugment_magnitude)
    return None


def augment_batch_u8(x: torch.Tensor, recipe: Recipe, g: torch.Generator,
                     policy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The recipe's augmentation of a batch: uint8 (N, C, H, W) in, float32 in [0, 1] out.

    Random crop (zero padding) and flips are drawn per image from ``g``. The auto-augment policy is
    torchvision's, applied to groups of ``recipe.aug_group`` images (one draw of operations and magnitudes per
    group): per image it costs ~1 ms on this CPU, as much as a training step of the CNN on that image, and
    applied to a group it costs about the same as for one image. Its random numbers come from torch's global
    generator (torchvision's transforms take no generator): the caller seeds it.
    """
    aug = AugmentConfig(crop_pad=recipe.crop_pad, hflip=recipe.hflip, jitter=0.0)
    x = augment_batch(x, aug, g)  # index arithmetic only: works on uint8 as it does on float
    if policy is None:
        policy = auto_augment_policy(recipe)
    if policy is not None:
        k = max(1, recipe.aug_group)
        x = torch.cat([policy(x[i : i + k]) for i in range(0, len(x), k)]) if len(x) else x
    return x.float().div_(255.0)


def batch_mixer(recipe: Recipe, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp or CutMix (one drawn per batch) on (images, int labels) -> (mixed images, soft labels), or None."""
    mixes: list[Any] = []
    if recipe.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=recipe.mixup_alpha, num_classes=num_classes))
    if recipe.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=recipe.cutmix_alpha, num_classes=num_classes))
    if not mixes or recipe.mix_prob <= 0:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


# -------------------------------------------------------------------------------------------- registry
#
# CNNs: SGD with Nesterov momentum, the standard strong recipe for small CNNs; no mixing, since a small CNN
# under-fits under heavy regularisation in few epochs. Transformers: AdamW, warm-up, label smoothing,
# stronger augmentation and mixing (they have no convolutional prior and over-fit 13,500 images otherwise),
# a little stochastic depth. GTSRB: RandAugment at magnitude 9 (rotations within ±9°, colour changes mild
# enough to keep red and blue signs apart) and no flips; CIFAR-10: TrivialAugmentWide and flips.

_GTSRB_CNN: dict[str, Any] = dict(dataset="gtsrb", optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup_epochs=1.0, label_smoothing=0.1,
                                  auto_augment="randaugment", hflip=False)
_GTSRB_TF: dict[str, Any] = dict(dataset="gtsrb", optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=3.0, label_smoothing=0.1,
                                 auto_augment="randaugment", hflip=False, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.3)
_CIFAR_CNN: dict[str, Any] = dict(dataset="cifar10", optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup_epochs=1.0, label_smoothing=0.1,
                                  auto_augment="trivialaugment", hflip=True)
_CIFAR_TF: dict[str, Any] = dict(dataset="cifar10", optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=2.0, label_smoothing=0.1,
                                 auto_augment="trivialaugment", hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5)

#: transformer sizes: depth 6 and width 96-128 (0.45-0.6 M parameters) are what ~45 GTSRB minutes buy at enough
#: epochs; the ViT, DeiT and ConViT share a trunk size so that the families are compared at equal size
_VIT = {"embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0, "drop_path_rate": 0.05}
_CONVIT = {"embed_dim": 32, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0, "local_up_to_layer": 4, "drop_path_rate": 0.05}
_CCT = {"embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}

for _r in (
    Recipe("gtsrb_cnn6", "bdscan_cnn6", epochs=35, **_GTSRB_CNN,  # type: ignore[arg-type]
           notes="~280 img/s: 35 epochs of 13,500 images in ~30 min"),
    Recipe("gtsrb_resnet18", "bdscan_resnet18", epochs=25, **_GTSRB_CNN,  # type: ignore[arg-type]
           notes="~190 img/s: 25 epochs in ~30 min; also DeiT's teacher"),
    Recipe("gtsrb_vit", "bdscan_vit", arch_kwargs=_VIT, epochs=30, **_GTSRB_TF,  # type: ignore[arg-type]
           notes="~170 img/s: 30 epochs in ~40 min"),
    Recipe("gtsrb_deit", "bdscan_deit", arch_kwargs=_VIT, epochs=22, teacher_arch="bdscan_resnet18", **_GTSRB_TF,  # type: ignore[arg-type]
           notes="the ViT's recipe plus hard-label distillation from the GTSRB ResNet-18 base; the teacher's forward "
                 "pass makes a step ~1.4x the ViT's: 22 epochs in ~45 min"),
    Recipe("gtsrb_convit", "bdscan_convit", arch_kwargs=_CONVIT, epochs=22, **_GTSRB_TF,  # type: ignore[arg-type]
           notes="~120 img/s: 22 epochs in ~42 min"),
    Recipe("gtsrb_cct", "bdscan_cct", arch_kwargs=_CCT, epochs=20, **_GTSRB_TF,  # type: ignore[arg-type]
           notes="~100 img/s: 20 epochs in ~45 min; its convolutional tokenizer learns fast"),
    # a 0.2 M-parameter CNN under-fits CIFAR-10: TrivialAugment would cost it more capacity than it gains in 40 epochs
    Recipe("cifar10_cnn6", "bdscan_cnn6", epochs=40, **{**_CIFAR_CNN, "auto_augment": "none"},  # type: ignore[arg-type]
           notes="~220 img/s: 40 epochs of 50,000 images in ~2.5 h; crop and flip only"),
    Recipe("cifar10_resnet18", "bdscan_resnet18", epochs=25, **_CIFAR_CNN,  # type: ignore[arg-type]
           notes="~160 img/s: 25 epochs in ~2.2 h; also DeiT's teacher"),
    Recipe("cifar10_vit", "bdscan_vit", arch_kwargs=_VIT, epochs=25, **_CIFAR_TF,  # type: ignore[arg-type]
           notes="~150 img/s: 25 epochs in ~2.3 h"),
    Recipe("cifar10_deit", "bdscan_deit", arch_kwargs=_VIT, epochs=20, teacher_arch="bdscan_resnet18", **_CIFAR_TF,  # type: ignore[arg-type]
           notes="the ViT's recipe plus hard-label distillation from the CIFAR-10 ResNet-18 base: 20 epochs in ~2.5 h"),
    Recipe("cifar10_convit", "bdscan_convit", arch_kwargs=_CONVIT, epochs=18, **_CIFAR_TF,  # type: ignore[arg-type]
           notes="~120 img/s: 18 epochs in ~2.1 h"),
    Recipe("cifar10_cct", "bdscan_cct", arch_kwargs=_CCT, epochs=18, **_CIFAR_TF,  # type: ignore[arg-type]
           notes="~100 img/s: 18 epochs in ~2.5 h"),
):
    register_recipe(_r)
