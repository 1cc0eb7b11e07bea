"""Datasets (synthetic shapes world, CIFAR-10, image folders) behind one interface, and batched
on-device augmentations."""

from sslens.data.base import (
    DATASETS,
    ImageData,
    denormalize,
    load_dataset,
    normalize,
    to_float,
)

__all__ = ["DATASETS", "ImageData", "denormalize", "load_dataset", "normalize", "to_float"]
