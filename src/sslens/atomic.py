"""Atomic file writes: readers see the old file or the new one, never a part of either.

Every file sslens writes that a later run relies on (checkpoints, caches, reports, JSON) goes
through :func:`atomic_write_bytes` (JSON through :func:`write_json_atomic`), so a crash, a kill
or a full disk mid-write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sslens.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets ordinary permissions (0o666 less the umask, like ``open``), not the private
    0o600 of temporary files, and the folder entry is flushed so the rename survives a power cut.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temporary file behind.
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries: a rename is durable only once the folder reaches the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(value: Any) -> Any:
    """``value`` as JSON/YAML-safe builtins: tuples → lists, tensors/arrays → lists, paths → str,
    NaN/±inf → None (JSON has no NaN), anything else unknown → ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented UTF-8 JSON (via :func:`jsonable`, so NaN becomes null)."""
    return (json.dumps(jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as :func:`json_bytes`, atomically."""
    atomic_write_bytes(path, json_bytes(obj))


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if needed) for the ``with`` body.

    A second process asking for the same folder gets a :class:`~sslens.errors.UserError` at
    once instead of interleaving its files with the first one's (and deleting its temporary
    files). The lock is the operating system's ``flock`` on the folder itself, so no file is
    left behind and it is released when the process ends, even by ``kill -9``.
    """
    import fcntl

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder} is in use by another sslens process, which is {what} there. Wait for it "
                f"to finish, or choose another --out."
            ) from None
        yield
    finally:
        os.close(fd)
