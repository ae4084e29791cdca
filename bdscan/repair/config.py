"""How a model is repaired (:class:`RepairConfig`) and the table of repair methods.

This module imports no torch: the command line reads the configuration's defaults for its help. A repair method
is a function with the :class:`RepairMethod` signature, registered under its name with :func:`register_method`
in its own module (see :mod:`bdscan.repair.unlearn`, :mod:`bdscan.repair.prune`); a built-in one is also named in
:data:`BUILTIN_METHODS`, so that the table imports it the first time it is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bdscan.errors import UsageError
from bdscan.registry import LazyRegistry

if TYPE_CHECKING:
    from bdscan.data import CleanData
    from bdscan.models.wrapper import ModelWrapper
    from bdscan.trigger import Trigger

#: progress(done, total, stats): unlearning reports once per epoch, pruning once per pruning step
RepairProgress = Callable[[int, int, dict[str, float]], None]

OPTIMIZERS = ("adam", "sgd")
#: what unlearning trains towards (see :attr:`RepairConfig.targets`)
TARGETS = ("model", "labels")
#: unlearning's learning rate (Adam) for every model: on the accurate sample models (a CNN, a ResNet-18, a ViT and a
#: CCT) 1e-3 cost the transformers 6-10 points of clean accuracy and wrecked the ResNet-18, 1e-4 left 13-21 % of the
#: original trigger working, 3e-4 removed it and kept accuracy within 2 points (docs/repair.md, "The recipe")
DEFAULT_LR = 3e-4

# ------------------------------------------------------------------------------------------ the method table


class RepairMethod(Protocol):
    """A repair method: repairs a copy of ``model`` using the repair images ``data``.

    Args:
        model: the model to repair; never modified (start from :func:`working_copy`).
        data: the repair part of the clean data.
        trigger: the trigger to remove, checked against the model, its ``target`` set.
        cfg: the configuration.
        progress: optional ``(done, total, stats)`` callback.

    Returns:
        the repaired copy (end with :func:`finish`) and method-specific facts for :attr:`RepairResult.details`.
    """

    def __call__(
        self, model: ModelWrapper, data: CleanData, trigger: Trigger, cfg: RepairConfig, progress: RepairProgress | None = None
    ) -> tuple[ModelWrapper, dict[str, Any]]: ...


#: the built-in methods' modules, in the order ``--method`` lists them; imported (and so registered) the first time
#: the table is read, so that the command line can show the configuration's defaults without importing torch
BUILTIN_METHODS: tuple[str, ...] = ("bdscan.repair.unlearn", "bdscan.repair.prune")
_METHODS: LazyRegistry[RepairMethod] = LazyRegistry(BUILTIN_METHODS, lambda fn: getattr(fn, "__module__", ""))
_F = TypeVar("_F", bound=Callable[..., Any])


def register_method(name: str) -> Callable[[_F], _F]:
    """Function decorator: registers a :class:`RepairMethod` under ``name`` (the value of ``--method``)."""

    def deco(fn: _F) -> _F:
        _METHODS[name] = fn
        return fn

    return deco


def repair_methods() -> dict[str, RepairMethod]:
    """Method name -> implementation: the built-in methods in :data:`BUILTIN_METHODS` order, then the others in
    registration order."""
    return dict(_METHODS)


def get_method(name: str) -> RepairMethod:
    """The method registered under ``name``; raises :class:`UsageError` for an unknown one."""
    if name not in _METHODS:
        raise UsageError(f"unknown repair method {name!r}", f"use one of: {', '.join(repair_methods())}")
    return _METHODS[name]


# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class RepairConfig:
    """How a model is repaired.

    Unlearning follows Neural Cleanse (images stamped with the reversed trigger are trained towards what they
    are, not the target) with two changes for the few hundred clean images a bdscan user has. First, the
    images are trained towards the *input model's own answers on the unstamped image* (``targets="model"``,
    self-distillation) rather than their true labels: fine-tuning on true labels re-fits a weak model to a
    few hundred images and cost the bundled 50 %-accurate demo ViT about 10 points of clean accuracy, while
    matching the model's own answers leaves its clean behaviour where it was and only takes the trigger's
    effect away. Second, half the repair images are stamped in each epoch (``stamp_fraction=0.5``; Neural
    Cleanse: 0.2): with the model's own answers as targets, stamping more removed more of the *original*
    backdoor, of which the reversed trigger is only an approximation. Adam at 3e-4 for 8 epochs (measured:
    docs/repair.md).

    Attributes:
        method: a registered repair method: "unlearn" (fine-tune with the stamped trigger) or "prune" (zero
            penultimate neurons).
        stamp_fraction: share of repair images stamped with the trigger in each epoch (unlearning).
        targets: what unlearning trains every image towards: "model" (the input model's soft answers on the
            unstamped image; labels are not used) or "labels" (the true labels, as Neural Cleanse).
        epochs: passes over the repair images (unlearning).
        lr: learning rate (unlearning); None = bdscan's default, :data:`DEFAULT_LR` (:meth:`resolved`).
        batch_size: images per mini-batch (training and measuring).
        optimizer: "adam" or "sgd" (SGD uses momentum 0.9).
        weight_decay: optimizer weight decay.
        freeze_norm: keep normalisation layers in eval mode while fine-tuning, so BatchNorm running
            statistics are not re-estimated from a few hundred (partly stamped) images; their affine
            parameters are still trained.
        holdout_fraction: share of the clean data held out (stratified by class) to measure before/after.
        seed: seed of the split, the stamping and the mini-batch order.
        max_acc_drop: tolerated drop in held-out clean accuracy (a fraction: 0.03 = 3 points); exceeded only
            when the drop's whole 95 % interval lies above it (see the module docstring).
        max_asr: highest attack success a trigger may keep after the repair (a fraction: 0.1 = 10 %).
        prune_max_fraction: pruning stops after this share of the penultimate neurons.
        prune_step: share of the penultimate neurons added at each pruning step.
        prune_target_asr: pruning stops once the trigger's attack success on the repair images is below this.
        device: "cpu" or "cuda".
    """

    method: str = "unlearn"
    stamp_fraction: float = 0.5
    targets: str = "model"
    epochs: int = 8
    lr: float | None = None
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 0.0
    freeze_norm: bool = True
    holdout_fraction: float = 0.3
    seed: int = 0
    max_acc_drop: float = 0.03
    max_asr: float = 0.10
    prune_max_fraction: float = 0.5
    prune_step: float = 0.02
    prune_target_asr: float = 0.05
    device: str = "cpu"

    def with_(self, **changes: Any) -> RepairConfig:
        return replace(self, **changes)

    def resolved(self, model: ModelWrapper) -> RepairConfig:
        """The configuration with bdscan's learning rate when it was left to bdscan (``model``: the model repaired,
        for defaults that depend on it; none does today)."""
        if self.lr is not None:
            return self
        return replace(self, lr=DEFAULT_LR)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> RepairConfig:
        """Returns self; raises :class:`UsageError` for values that cannot work."""
        get_method(self.method)
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", f"use one of: {', '.join(OPTIMIZERS)}")
        if self.targets not in TARGETS:
            raise UsageError(f"unknown unlearning targets {self.targets!r}", f"use one of: {', '.join(TARGETS)}")
        if not 0 < self.stamp_fraction <= 1:
            raise UsageError(f"stamp fraction {self.stamp_fraction:g} is not in (0, 1]", "Neural Cleanse stamps 0.2")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch size must be positive", "e.g. --epochs 8 --batch-size 32")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate {self.lr:g} is not positive", "e.g. --lr 0.001")
        if not 0 < self.holdout_fraction < 1:
            raise UsageError(f"hold-out fraction {self.holdout_fraction:g} is not in (0, 1)", "e.g. 0.3")
        if not 0 <= self.max_acc_drop <= 1:
            raise UsageError(f"accuracy-drop tolerance {self.max_acc_drop:g} is not in [0, 1]",
                             "give it as a fraction: 0.03 means 3 points of accuracy")
        if not 0 <= self.max_asr <= 1:
            raise UsageError(f"attack-success limit {self.max_asr:g} is not in [0, 1]", "give it as a fraction: 0.1 means 10 %")
        if not 0 < self.prune_max_fraction <= 1 or not 0 < self.prune_step <= 1:
            raise UsageError("pruning fractions must be in (0, 1]", "e.g. prune_max_fraction 0.5, prune_step 0.02")
        if not 0 <= self.prune_target_asr <= 1:
            raise UsageError(f"target attack success {self.prune_target_asr:g} is not in [0, 1]", "e.g. 0.05")
        return self
