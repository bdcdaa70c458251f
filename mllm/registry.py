"""A tiny name → factory registry with a loud error on an unknown key, and lazy entries for optional dependencies."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Lazy:
    """A registered name whose factory is `module:attr`, imported on first `get` (its module may need extras)."""

    module: str
    attr: str


class Registry(Generic[T]):
    """Maps exact names to factories. No substring matching, no fallbacks."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def register_lazy(self, name: str, target: str) -> None:
        """Register `name` as `target` ("package.module:attr"), imported only when `get(name)` first asks for it.

        For entries whose module needs an optional dependency: the name is known (listed, checked, accepted in
        configs) without the extra installed, and the import error, if any, comes when the entry is used.
        """
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise ValueError(
                f"{self.kind} {name!r}: lazy target must be 'package.module:attr', got {target!r}"
            )
        self.register(name)(_Lazy(module, attr))  # type: ignore[arg-type]

    def alias(self, alias: str, name: str) -> None:
        """Let `alias` (another name users write for the same thing) stand for the registered `name`."""
        if alias in self._items or alias in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is registered twice")
        self.get(name)
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name `name` is or stands for (KeyError naming the known ones otherwise)."""
        name = self._aliases.get(name, name)
        if name not in self._items:
            known = ", ".join(sorted([*self._items, *self._aliases])) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return name

    def get(self, name: str) -> T:
        name = self.canonical(name)
        item = self._items[name]
        if isinstance(item, _Lazy):
            item = self._items[name] = getattr(importlib.import_module(item.module), item.attr)
        return item

    def names(self) -> list[str]:
        """The registered names in registration order (aliases not included)."""
        return list(self._items)

    def aliases(self) -> dict[str, str]:
        """alias → registered name."""
        return dict(self._aliases)

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._aliases
