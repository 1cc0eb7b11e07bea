"""Frozen-encoder features for downstream evaluation, with an optional on-disk cache.

>>> import torch
>>> from torch import nn
>>> from sslens.data.base import ImageData
>>> data = ImageData(torch.zeros(5, 8, 8, 3, dtype=torch.uint8), torch.zeros(5, dtype=torch.long), ["a"])
>>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
>>> extract_features(encoder, data, batch_size=2).shape
torch.Size([5, 4])
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from sslens.atomic import atomic_write_bytes
from sslens.checks import positive_int
from sslens.data.base import normalize, to_float
from sslens.errors import SslensWarning
from sslens.hashing import json_sha256
from sslens.models.health import eval_mode

_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def feature_cache_key(**parts: Any) -> str:
    """A file-name-safe key (64 hex digits) that changes whenever any of ``parts`` changes.

    ``parts`` are hashed as canonical JSON (:func:`sslens.hashing.json_sha256`), so the order of
    the keyword arguments does not matter.

    >>> feature_cache_key(weights="ab12", split="train") == feature_cache_key(split="train", weights="ab12")
    True
    """
    if not parts:
        raise ValueError(
            "feature_cache_key needs at least one part, e.g. feature_cache_key(weights=..., split='train')"
        )
    return json_sha256(parts)


class FeatureCache:
    """Feature tensors stored as ``<directory>/<key>.safetensors``.

    Writes are atomic (a temporary file in the same directory, then ``os.replace``), so an
    interrupted run never leaves a half-written file under a valid key.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"FeatureCache directory {str(self.directory)!r} is a file; pass a directory path."
            )
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(
                f"Cache key {key!r} is not a safe file name; build it with feature_cache_key(...)."
            )
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under ``key``, or None when there is none."""
        path = self.path(key)
        if not path.exists():
            return None
        return load_file(path)["features"]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (moved to the CPU) under ``key``, replacing any earlier one."""
        if not torch.is_tensor(tensor):
            raise TypeError(f"FeatureCache.put needs a torch.Tensor; got {type(tensor).__name__}")
        atomic_write_bytes(self.path(key), save({"features": tensor.detach().cpu().contiguous()}))

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()


def module_device(module: nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer; None for a stateless module."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def _check_data(data: Any) -> None:
    missing = [name for name in ("iter_batches", "mean", "std", "__len__") if not hasattr(data, name)]
    if missing:
        raise TypeError(
            f"data must be an ImageData (or have iter_batches, mean, std and __len__); "
            f"{type(data).__name__} lacks {', '.join(missing)}"
        )


def extract_features(
    encoder: nn.Module,
    data: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    cache: FeatureCache | None = None,
    cache_key: str | None = None,
) -> torch.Tensor:
    """Embed every image of ``data`` with the frozen ``encoder``, in dataset order.

    Images (uint8 NHWC) are scaled to [0, 1] and normalised with ``data.mean``/``data.std``.
    The encoder runs in eval mode under ``torch.inference_mode``; the mode of each of its
    submodules is restored afterwards, also when the encoder raises. On CUDA the batches are
    channels_last and the forward pass runs under bf16 autocast; on the CPU it is fp32.

    Args:
        encoder: maps (B, 3, H, W) normalised images to (B, D) embeddings. It is not moved:
            it must already be on ``device``.
        data: an :class:`~sslens.data.base.ImageData` or anything with the same
            ``iter_batches``, ``mean``, ``std`` and ``__len__``.
        batch_size: images per forward pass; the features do not depend on it.
        device: where the encoder runs; defaults to the encoder's own device.
        cache: where features are looked up under ``cache_key`` before running the encoder,
            and stored after.
        cache_key: identifies the encoder weights, data and output kind; build it with
            :func:`feature_cache_key`. Required when ``cache`` is given.

    Returns:
        (N, D) float32 features on the CPU, row i for image i.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    _check_data(data)
    positive_int("batch_size", batch_size)
    if (cache is None) != (cache_key is None):
        raise ValueError(
            "Pass cache and cache_key together (cache_key=feature_cache_key(...)), or neither."
        )
    if cache is not None:
        cached = cache.get(cache_key)
        if cached is not None:
            if cached.ndim != 2 or len(cached) != len(data):
                raise ValueError(
                    f"Cached features under key {cache_key!r} have shape {tuple(cached.shape)}, "
                    f"not ({len(data)}, D) for this data: the key does not identify the data. "
                    f"Include the dataset and split in feature_cache_key(...), or delete "
                    f"{cache.path(cache_key)}."
                )
            return cached.float()

    encoder_device = module_device(encoder)
    if device is None:
        device = encoder_device if encoder_device is not None else torch.device("cpu")
    device = torch.device(device)
    if encoder_device is not None and (
        encoder_device.type != device.type
        or device.index not in (None, encoder_device.index)
    ):
        raise ValueError(
            f"The encoder is on {encoder_device} but features were asked for on {device}; "
            f"move it first with encoder.to({str(device)!r}) or pass device={str(encoder_device)!r}."
        )
    on_cuda = device.type == "cuda"
    chunks = []
    with eval_mode(encoder), torch.inference_mode():
        for images, _ in data.iter_batches(batch_size, shuffle=False, device=device):
            x = normalize(to_float(images), data.mean, data.std)
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            # bf16 halves memory traffic on tensor-core GPUs; the CPU keeps fp32 for exactness.
            with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
                embeddings = encoder(x)
            if not torch.is_tensor(embeddings) or embeddings.ndim != 2 or len(embeddings) != len(x):
                shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
                raise ValueError(
                    f"The encoder must map (B, 3, H, W) images to (B, D) embeddings; for B={len(x)} "
                    f"it returned {shape}. Pass a pooled encoder (e.g. method.encoder('pooled'))."
                )
            chunks.append(embeddings.float())
    # One transfer at the end: a .cpu() per batch would make the host wait on the GPU each time.
    features = torch.cat(chunks).cpu()
    if len(features) != len(data):
        raise ValueError(
            f"data.iter_batches yielded {len(features)} images but len(data) is {len(data)}."
        )
    if cache is not None:
        try:
            cache.put(cache_key, features)
        except OSError as error:
            # A cache saves time, never results: a full or read-only disk must not lose them.
            warnings.warn(f"Could not cache the features in {cache.directory} ({error.strerror or error}).", SslensWarning, stacklevel=2)
    return features


def labels_of(data: Any) -> torch.Tensor:
    """(N,) int64 labels of ``data`` on the CPU, in dataset order."""
    labels = getattr(data, "labels", None)
    if labels is None:
        _check_data(data)
        batches = data.iter_batches(4096, shuffle=False, device="cpu")
        labels = torch.cat([batch_labels for _, batch_labels in batches])
    return labels.detach().cpu().long()
