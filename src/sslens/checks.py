"""Argument checks shared by every constructor: one wording for each kind of mistake.

Python's ``bool`` is an ``int``, so ``True`` would pass a plain ``isinstance(value, int)`` and
train with a batch size of 1; every integer check here refuses it. Each check returns the value
(converted where that loses nothing), so a constructor reads ``self.k = positive_int("k", k)``.

>>> positive_int("num_masks", 500)
500
>>> positive_int("num_masks", True)
Traceback (most recent call last):
    ...
ValueError: num_masks must be a positive integer; got True
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def is_int(value: object) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def integer(name: str, value: object) -> int:
    """``value`` if it is an int (not a bool), else a TypeError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int; got {value!r}")
    return value


def positive_int(name: str, value: object, hint: str = "") -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else a ValueError naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer{_hint(hint)}; got {value!r}")
    return value


def non_negative_int(name: str, value: object, hint: str = "") -> int:
    """``value`` if it is an int ≥ 0 (not a bool), else a ValueError naming ``name``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer{_hint(hint)}; got {value!r}")
    return value


def positive_number(name: str, value: object, hint: str = "") -> float:
    """``float(value)`` if it is a number > 0 (not a bool, not NaN), else a ValueError."""
    if not is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number{_hint(hint)}; got {value!r}")
    return float(value)


def fraction(name: str, value: object, hint: str = "") -> float:
    """``float(value)`` if it is a number in [0, 1] (not a bool), else a ValueError."""
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]{_hint(hint)}; got {value!r}")
    return float(value)


def boolean(name: str, value: object) -> bool:
    """``value`` if it is True or False, else a TypeError (``1`` and ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def suggestion(name: object, choices: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``choices`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def listing(items: Iterable[object], limit: int = 8, separator: str = ", ") -> str:
    """The first ``limit`` of ``items`` and how many there are in all, for messages: a few names
    say what is wrong, thousands would bury it."""
    items = [str(item) for item in items]
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... ({len(items)} in all)" if len(items) > limit else "")
