"""The backdoor lab: train clean models, inject backdoors (BadNets, Blended, Trojan), build the lab zoo,
and train the evaluation zoo's accurate bases from named recipes (:mod:`bdscan.lab.recipes`, :mod:`bdscan.lab.base`).

Library only (the CLI lives in :mod:`bdscan.cli`); functions never print, they log and report progress
through an optional ``progress(done, total, stats)`` callback.

>>> from bdscan.lab import TrainConfig, train_clean, AttackConfig, InjectConfig, inject
>>> clean = train_clean("bdscan_cnn6", "shared/data/gtsrb_32.npz", TrainConfig())          # doctest: +SKIP
>>> bad = inject(clean.wrapper, "shared/data/gtsrb_32.npz", AttackConfig("badnets", 33), InjectConfig())  # doctest: +SKIP
>>> save_safetensors(bad.wrapper, "bad.safetensors", trigger=bad.trigger)                  # doctest: +SKIP
"""

from bdscan.lab.attacks import (
    ATTACKS,
    AttackConfig,
    BadNetsParams,
    BlendedParams,
    TrojanParams,
    attack_params_help,
    make_trigger,
    parse_attack_params,
    register_attack,
)
from bdscan.lab.inject import InjectConfig, InjectResult, inject
from bdscan.lab.labdata import AugmentConfig, LabData, load_lab_data
from bdscan.lab.train import ARCH_DEFAULTS, TrainConfig, TrainResult, evaluate, train_clean

_ZOO_NAMES = ("ZooEntry", "build_zoo", "default_manifest", "read_manifest")
_RECIPE_NAMES = ("Recipe", "base_recipe", "get_recipe", "list_recipes", "register_recipe")
_BASE_NAMES = ("BaseResult", "train_base")


def __getattr__(name: str) -> object:
    # The zoo is imported lazily so that `python -m bdscan.lab.zoo` does not import it twice; recipes and
    # base training lazily as they import torchvision's transforms, which nothing else here needs.
    if name in _ZOO_NAMES:
        from bdscan.lab import zoo

        return getattr(zoo, name)
    if name in _RECIPE_NAMES:
        from bdscan.lab import recipes

        return getattr(recipes, name)
    if name in _BASE_NAMES:
        from bdscan.lab import base

        return getattr(base, name)
    raise AttributeError(f"module 'bdscan.lab' has no attribute {name!r}")


__all__ = [
    "ARCH_DEFAULTS",
    "ATTACKS",
    "AttackConfig",
    "AugmentConfig",
    "BadNetsParams",
    "BaseResult",
    "BlendedParams",
    "InjectConfig",
    "InjectResult",
    "LabData",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "TrojanParams",
    "ZooEntry",
    "attack_params_help",
    "base_recipe",
    "build_zoo",
    "default_manifest",
    "evaluate",
    "get_recipe",
    "inject",
    "list_recipes",
    "load_lab_data",
    "make_trigger",
    "parse_attack_params",
    "read_manifest",
    "register_attack",
    "register_recipe",
    "train_base",
    "train_clean",
]
