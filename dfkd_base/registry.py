"""Name → factory registries, filled by decorators (torchdistill style).

A registry may name the modules that fill it (``locations``, as mmengine's registries do): they
are imported the first time the registry is read, so that a lower layer (config validation, say)
can look up entries that a higher layer registers without importing that layer itself.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from dfkd_base.errors import UnknownNameError

T = TypeVar("T")


def nearest(name: str, candidates, n: int = 3) -> list[str]:
    """Closest spellings of ``name`` among ``candidates`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def unknown_name_message(kind: str, name: str, candidates) -> str:
    candidates = sorted(candidates)
    close = nearest(name, candidates)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
    return f"unknown {kind} '{name}'{hint} (known: {shown})"


class Registry(Generic[T]):
    """A named collection of factories.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("lenet5")
    ... def lenet5(**kw): ...
    """

    def __init__(self, kind: str, locations: tuple[str, ...] = ()):
        self.kind = kind
        self.locations = tuple(locations)
        self._items: dict[str, T] = {}
        self._imported = not self.locations

    def _import_locations(self) -> None:
        if not self._imported:
            self._imported = True  # first: the modules imported here register into this registry
            for module in self.locations:
                importlib.import_module(module)

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name or obj.__name__, *aliases):
                if key in self._items:
                    raise ValueError(f"{self.kind} '{key}' is registered twice")
                self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._import_locations()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        self._import_locations()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._import_locations()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._import_locations()
        return len(self._items)
