"""Fingerprints: SHA-256 of files, tensors, modules and JSON-like values, one way each.

Caches (decoded datasets, features, study stages) and provenance records key on these, so a
changed input can never reuse a stale result: every digest covers dtypes and shapes as well as
bytes, and JSON values are hashed in one canonical form (sorted keys, no spaces, NaN as null).

>>> json_sha256({"b": 1, "a": [1, 2]}) == json_sha256({"a": (1, 2), "b": 1})
True
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from sslens.atomic import jsonable


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints are hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Add ``tensor``'s dtype, shape and bytes to the hashlib ``digest``."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"expected a torch.Tensor; got {type(tensor).__name__}")
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    # Viewing the bytes as uint8 works for every dtype, bfloat16 included, which numpy lacks.
    raw = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    digest.update(raw.numpy().tobytes())


def module_sha256(module: nn.Module) -> str:
    """Hex SHA-256 over a module's class name and every ``state_dict`` entry (name, dtype,
    shape, bytes): two modules share it when they hold the same weights and buffers."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        hash_tensor(digest, tensor)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """Hex SHA-256 of ``value`` written as canonical JSON (see :func:`sslens.atomic.jsonable`)."""
    text = json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
