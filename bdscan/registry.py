"""A name -> item registry whose built-in entries live in modules imported on the first read.

The detectors (:data:`bdscan.detect.base.DETECTORS`) and the repair methods (:mod:`bdscan.repair.config`) register
themselves when their module is imported (timm's ``@register_model`` pattern). Importing them is what costs: torch,
timm. So the registry names its built-in modules (modelscan names its scanners by module path the same way) and
imports them only when it is first read, which keeps ``bdscan --help`` and the configuration modules free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

T = TypeVar("T")


class LazyRegistry(MutableMapping[str, T], Generic[T]):
    """Name -> item: the built-in items first (in ``builtins`` order, by the module :attr:`module_of` names), then
    the others in the order they registered. Reading it in any way (``reg[name]``, ``in``, iteration, ``len``) or
    registering into it first imports the built-in modules, so they are there, and first, whichever module a caller
    imported before.

    Args:
        builtins: the modules whose import registers the built-in items, in their order.
        module_of: the module an item was defined in (a detector's class's, a function's own).
    """

    def __init__(self, builtins: tuple[str, ...], module_of: Callable[[T], str]) -> None:
        self._items: dict[str, T] = {}
        self._builtins = builtins
        self._module_of = module_of
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: each built-in module's registration comes back here
            for module in self._builtins:
                importlib.import_module(module)

    def _rank(self, name: str) -> int:
        module = self._module_of(self._items[name])
        return self._builtins.index(module) if module in self._builtins else len(self._builtins)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._items[name]

    def __setitem__(self, name: str, item: T) -> None:
        self._load()
        self._items[name] = item

    def __delitem__(self, name: str) -> None:
        self._load()
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items, key=self._rank))  # sorted() is stable: the others keep their order

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"LazyRegistry({list(self)!r})"
