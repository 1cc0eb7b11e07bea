"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists the public names of its modules; each module is imported the first time one of
its names is read, so ``import sslens`` (and ``sslens --help``) does not pull in torch,
pytorch-grad-cam or matplotlib until they are used, and no package import depends on the order
its modules are loaded in.

>>> __getattr__, __dir__ = lazy_exports("sslens.checks", {"positive_int": "sslens.checks"})
>>> __getattr__("positive_int")("k", 3)
3
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``names`` (public name → module)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
