"""The table of repair methods: a method is a registered function; :func:`repair` runs the one configured."""

from __future__ import annotations

from typing import Any

import pytest

from bdscan.data import CleanData
from bdscan.errors import UsageError
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair import METHODS, RepairConfig, RepairProgress, config, register_method, repair, repair_methods
from bdscan.repair.core import finish, working_copy
from bdscan.trigger import Trigger


def test_the_built_in_methods_are_registered() -> None:
    assert list(repair_methods()) == list(METHODS) == ["unlearn", "prune"]


def test_an_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown repair method 'retrain'.*unlearn, prune"):
        RepairConfig(method="retrain").validate()


def test_a_new_method_is_one_registered_function(tiny_bd, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(config, "_METHODS", dict(config._METHODS))
    seen: dict[str, Any] = {}

    @register_method("copy")
    def copy_method(model: ModelWrapper, data: CleanData, trigger: Trigger, cfg: RepairConfig,
                    progress: RepairProgress | None = None) -> tuple[ModelWrapper, dict[str, Any]]:
        seen.update(images=len(data), target=trigger.target)
        return finish(working_copy(model, cfg.device)), {"copied": True}

    t = tiny_bd.tiny
    r = repair(t.wrapper, t.data, t.trigger, RepairConfig(method="copy"), original=t.trigger)
    assert r.method == "copy" and r.details == {"copied": True}
    assert seen == {"images": r.repair_images, "target": t.trigger.target}
    assert r.after == r.before and r.acc_drop == 0  # the model was not changed, only copied
