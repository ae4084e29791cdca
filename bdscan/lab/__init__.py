"""The backdoor lab: train clean models, inject backdoors (BadNets, Blended, Trojan), build the sample zoo.

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
from bdscan.lab.train import (
    ARCH_DEFAULTS,
    AugmentConfig,
    LabData,
    TrainConfig,
    TrainResult,
    evaluate,
    load_lab_data,
    train_clean,
)

_ZOO_NAMES = ("ZooEntry", "build_zoo", "default_manifest", "read_manifest")


def __getattr__(name: str) -> object:
    # The zoo is imported lazily so that `python -m bdscan.lab.zoo` does not import it twice.
    if name in _ZOO_NAMES:
        from bdscan.lab import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'bdscan.lab' has no attribute {name!r}")


__all__ = [
    "ARCH_DEFAULTS",
    "ATTACKS",
    "AttackConfig",
    "AugmentConfig",
    "BadNetsParams",
    "BlendedParams",
    "InjectConfig",
    "InjectResult",
    "LabData",
    "TrainConfig",
    "TrainResult",
    "TrojanParams",
    "ZooEntry",
    "attack_params_help",
    "build_zoo",
    "default_manifest",
    "evaluate",
    "inject",
    "load_lab_data",
    "make_trigger",
    "parse_attack_params",
    "read_manifest",
    "register_attack",
    "train_clean",
]
