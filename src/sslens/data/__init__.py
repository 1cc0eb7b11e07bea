"""Datasets (synthetic shapes world, CIFAR-10, image folders) behind one interface, and batched
on-device augmentations."""

# Importing the dataset modules registers them in DATASETS.
from sslens.data import cifar10, imagefolder, synthetic  # noqa: F401
from sslens.data.augment import VIEW_RECIPES, ViewRecipe, create_views
from sslens.data.base import (
    DATASETS,
    ImageData,
    denormalize,
    load_dataset,
    normalize,
    to_float,
)
from sslens.data.imagefolder import StreamingImageData

__all__ = [
    "DATASETS",
    "VIEW_RECIPES",
    "ImageData",
    "ViewRecipe",
    "create_views",
    "StreamingImageData",
    "denormalize",
    "load_dataset",
    "normalize",
    "to_float",
]
