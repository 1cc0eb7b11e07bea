"""Atomic file writes: readers see the old file or the new one, never a part of either.

Every file sslens writes that a later run relies on (checkpoints, caches, reports, JSON) goes
through :func:`atomic_write_bytes`, so a crash, a kill or a full disk mid-write leaves the
previous version intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
