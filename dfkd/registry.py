"""Name → factory registries, filled by decorators (torchdistill style)."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

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

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name or obj.__name__, *aliases):
                if key in self._items:
                    raise ValueError(f"{self.kind} '{key}' is registered twice")
                self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
