"""Name → factory registries: the one global in sslens.

Backbones, methods, view recipes, datasets, explainers and metrics are each found by name
through a :class:`Registry`, never through ``if name == ...`` chains.

>>> widgets = Registry("widget")
>>> @widgets.register("round")
... def make_round(size=1):
...     return ("round", size)
>>> widgets.create("round", size=2)
('round', 2)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class Registry:
    """A named table of factories, with helpful errors for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names())}."
            )
        return self._entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
