"""Representation quality of a frozen encoder: weighted kNN and linear-probe top-1.

Every accuracy is a fraction in [0, 1] named ``*_top1`` (``knn_top1``, ``linear_top1``); the
training statistic ``positive_pair_top1`` is a different quantity and never appears here.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from sslens.checks import boolean, positive_int, positive_number
from sslens.data.base import data_fingerprint
from sslens.evaluate.features import (
    FeatureCache,
    extract_features,
    feature_cache_key,
    labels_of,
    module_device,
)
from sslens.evaluate.knn import knn_correct
from sslens.evaluate.linear import linear_probe
from sslens.hashing import module_sha256
from sslens.stats import wilson


def _data_identity(data: Any) -> dict:
    """What distinguishes one dataset from another for the feature cache."""
    # Hashing the pixels and labels costs far less than one forward pass over them, and makes a
    # stale hit impossible when a source description is vague or reused; a streamed folder is
    # known by its root and file list.
    return {
        "source": getattr(data, "source", ""),
        "num_images": len(data),
        "mean": list(data.mean),
        "std": list(data.std),
        "data": data_fingerprint(data),
    }


def _num_classes(train_data: Any, train_labels: torch.Tensor, test_labels: torch.Tensor) -> int:
    declared = getattr(train_data, "num_classes", None)
    seen = int(max(train_labels.max(), test_labels.max())) + 1
    if declared is None:
        return seen
    if seen > declared:
        raise ValueError(
            f"Labels go up to {seen - 1} but train_data declares {declared} classes; "
            "the train and test data must share one class list."
        )
    return int(declared)


def evaluate_encoder(
    encoder: nn.Module,
    train_data: Any,
    test_data: Any,
    *,
    k: int = 200,
    temperature: float = 0.1,
    linear: bool = True,
    linear_epochs: int = 100,
    device: torch.device | str | None = None,
    seed: int = 0,
    batch_size: int = 512,
    cache: FeatureCache | None = None,
    cache_key_prefix: str = "",
    keep_correct: bool = False,
) -> dict:
    """kNN (and optionally linear-probe) test accuracy of ``encoder``'s frozen features.

    Features of ``train_data`` and ``test_data`` are extracted once (see
    :func:`extract_features`) and shared by both evaluations. With a ``cache``, they are
    stored under keys built from ``cache_key_prefix``, a fingerprint of the encoder's weights
    and of each dataset's pixels, so a second evaluation of the same model skips the encoder.

    Args:
        encoder: maps (B, 3, H, W) normalised images to (B, D) embeddings, already on ``device``.
        train_data, test_data: :class:`~sslens.data.base.ImageData` (or alike) sharing classes.
        k, temperature: weighted-kNN settings (see :func:`knn_predict`).
        linear: also run :func:`linear_probe`; ``linear_top1`` is None otherwise.
        linear_epochs: epochs of each linear-probe fit.
        device: where to run; defaults to the encoder's device.
        seed: seeds the linear probe's validation split and batch order.
        batch_size: images per forward pass, and features per linear-probe step.
        cache: optional :class:`FeatureCache`.
        cache_key_prefix: extra text mixed into the cache keys (e.g. a run name or output kind).
        keep_correct: also return which test samples each classifier got right (not JSON).

    Returns:
        A dict: ``knn_top1`` (float), ``linear_top1`` (float or None), ``intervals`` (Wilson
        95% intervals of both, :func:`sslens.stats.wilson`), ``details`` (k used, temperature,
        linear-probe weight decay and validation accuracy, sizes, feature dimension, seconds per
        stage) — all JSON-serialisable — and with ``keep_correct`` also ``correct``: {"knn",
        "linear"} → (N_test,) bool arrays of which test samples each classifier got right.
    """
    boolean("linear", linear)
    positive_int("k", k, "200 is the usual choice")
    positive_number("temperature", temperature, "0.1 is usual")
    if not isinstance(cache_key_prefix, str):
        raise TypeError(f"cache_key_prefix must be a string; got {type(cache_key_prefix).__name__}")
    if device is None:
        device = module_device(encoder)
    device = torch.device("cpu") if device is None else torch.device(device)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    features = {}
    encoder_id = module_sha256(encoder) if cache is not None else None
    for role, data in (("train", train_data), ("test", test_data)):
        key = None
        if cache is not None:
            key = feature_cache_key(
                prefix=cache_key_prefix, role=role, encoder=encoder_id, data=_data_identity(data),
                precision="bf16-autocast" if device.type == "cuda" else "fp32",
            )
        features[role] = extract_features(
            encoder, data, batch_size=batch_size, device=device, cache=cache, cache_key=key
        )
    train_labels, test_labels = labels_of(train_data), labels_of(test_data)
    num_classes = _num_classes(train_data, train_labels, test_labels)
    seconds["features"] = time.perf_counter() - started

    train_features, test_features = features["train"].to(device), features["test"].to(device)
    stage = time.perf_counter()
    knn_right = knn_correct(
        train_features, train_labels.to(device), test_features, test_labels.to(device),
        k=k, temperature=temperature, num_classes=num_classes,
    ).cpu()
    knn = int(knn_right.sum()) / len(knn_right)
    seconds["knn"] = time.perf_counter() - stage
    correct = {"knn": knn_right}

    details: dict[str, Any] = {
        "k": min(k, len(train_features)),
        "temperature": float(temperature),
        "num_train": len(train_features),
        "num_test": len(test_features),
        "num_classes": num_classes,
        "feature_dim": int(train_features.shape[1]),
        "seed": seed,
        "device": str(device),
        "train_source": str(getattr(train_data, "source", "")),
        "test_source": str(getattr(test_data, "source", "")),
    }
    linear_top1 = None
    if linear:
        stage = time.perf_counter()
        probe = linear_probe(
            train_features, train_labels, test_features, test_labels,
            num_classes=num_classes, epochs=linear_epochs, batch_size=batch_size, seed=seed,
            device=device,
        )
        seconds["linear"] = time.perf_counter() - stage
        linear_top1 = probe.top1
        correct["linear"] = probe.test_correct
        details["linear"] = {key: value for key, value in probe.to_dict().items() if key != "top1"}
    seconds["total"] = time.perf_counter() - started
    details["seconds"] = seconds
    intervals = {
        f"{name}_top1": wilson(int(right.sum()), len(right), unit="test samples").to_dict()
        for name, right in correct.items()
    }
    result = {"knn_top1": knn, "linear_top1": linear_top1, "intervals": intervals, "details": details}
    if keep_correct:
        # Per test sample, for paired comparisons of models on the same test set.
        result["correct"] = {name: right.numpy().astype(bool) for name, right in correct.items()}
    return result
