"""Decoded-dataset caches: one ``torch.save`` file per (dataset, split), written atomically.

A cache file holds a dict of tensors, strings and lists, and is read back with
``torch.load(weights_only=True)`` (no arbitrary pickles). It stores the ``key`` it was built for
(a fingerprint of the source files and options); a file whose key differs is rebuilt, never reused.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sslens.atomic import atomic_write_bytes
from sslens.errors import SslensWarning


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sslens`` or ``~/.cache/sslens``: the fallback for read-only data folders."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sslens"


def writable_dir(preferred: Path, fallback_name: str) -> Path:
    """``preferred`` if it can be created and written, else ``user_cache_dir() / fallback_name``.

    Data folders are often read-only (a shared mount); the cache then goes to the user's home.
    """
    for candidate in (preferred, user_cache_dir() / fallback_name):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            continue
        return candidate
    return preferred


def load_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The payload saved at ``path`` for ``key``, or None if absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        warnings.warn(f"Ignoring the unreadable cache {path} ({error}); decoding again.", SslensWarning, stacklevel=3)
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    return payload


def save_cache(path: Path, key: str, payload: dict[str, Any]) -> bool:
    """Write ``payload`` (plus ``key``) to ``path`` atomically; False (with a warning) on failure.

    The file is written under a temporary name in the same folder and renamed into place, so a
    crash or a concurrent reader never sees half a cache.
    """
    buffer = io.BytesIO()
    torch.save({**payload, "key": key}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        warnings.warn(f"Cannot write the cache {path} ({error}); will decode again next time.", SslensWarning, stacklevel=3)
        return False
    return True
