"""Name → factory registries for what users extend, and one lookup for internal tables.

Six things are found by name and can be extended by users: methods, backbones, datasets, view
recipes, explainers and study experiments. Each is a :class:`Registry` that fills itself: it
lists the modules holding its built-in entries and imports them on the first lookup, so
``EXPLAINERS.get("relax")`` works in a fresh interpreter whatever was imported before (the
entries register themselves with the decorator when their module runs, as timm's
``@register_model`` does). Smaller internal tables (optimisers, mask samplers, baselines, ...)
are plain dicts read through :func:`lookup`, which words an unknown name the same way.

>>> widgets = Registry("widget")
>>> @widgets.register("round")
... def make_round(size=1):
...     return ("round", size)
>>> widgets.create("round", size=2)
('round', 2)
>>> lookup("colour", {"red": 1, "green": 2}, "gren")
Traceback (most recent call last):
    ...
ValueError: Unknown colour 'gren'. Did you mean 'green'? Known colours: green, red.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from sslens.checks import suggestion

T = TypeVar("T")


def unknown_name(kind: str, name: object, known: Iterable[str]) -> ValueError:
    """The error for a name that is not in a registry or table, with the closest known name."""
    known = sorted(known)
    return ValueError(f"Unknown {kind} {name!r}.{suggestion(name, known)} Known {kind}s: {', '.join(known)}.")


def lookup(kind: str, table: Mapping[str, T], name: str) -> T:
    """``table[name]``, or a ValueError naming the closest entry (see :func:`unknown_name`)."""
    if name not in table:
        raise unknown_name(kind, name, table)
    return table[name]


class Registry:
    """A named table of factories, filled on first use from ``modules``.

    Args:
        kind: what an entry is, for messages ("method", "explainer").
        modules: the modules whose import registers the built-in entries; imported (once) by
            the first :meth:`get`, :meth:`names`, ``in`` or iteration.
    """

    def __init__(self, kind: str, modules: Iterable[str] = ()):
        self.kind = kind
        self._modules = tuple(modules)
        self._entries: dict[str, Callable[..., Any]] = {}
        self._filled = not self._modules

    def _fill(self) -> None:
        if self._filled:
            return
        # Set first: the modules call register() while they are being imported.
        self._filled = True
        for module in self._modules:
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        self._fill()
        return lookup(self.kind, self._entries, name)

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        self._fill()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
