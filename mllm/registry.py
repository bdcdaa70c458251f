"""A tiny name → factory registry with a loud error on an unknown key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps exact names to factories. No substring matching, no fallbacks."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

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
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """The registered names (aliases not included)."""
        return sorted(self._items)

    def aliases(self) -> dict[str, str]:
        """alias → registered name."""
        return dict(self._aliases)

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._aliases
