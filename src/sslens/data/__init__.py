"""Datasets (synthetic shapes world, CIFAR-10, image folders) behind one interface, the one image
loader, and batched on-device augmentations. ``DATASETS`` imports the built-in datasets on its
first lookup."""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "DATASETS": "sslens.data.base",
    "IMAGENET_MEAN": "sslens.data.base",
    "IMAGENET_STD": "sslens.data.base",
    "ImageData": "sslens.data.base",
    "data_fingerprint": "sslens.data.base",
    "denormalize": "sslens.data.base",
    "load_dataset": "sslens.data.base",
    "load_split": "sslens.data.base",
    "normalize": "sslens.data.base",
    "to_float": "sslens.data.base",
    "StreamingImageData": "sslens.data.imagefolder",
    "load_image_tensor": "sslens.data.images",
    "load_rgb": "sslens.data.images",
    "to_rgb": "sslens.data.images",
    "VIEW_RECIPES": "sslens.data.augment",
    "ViewRecipe": "sslens.data.augment",
    "create_views": "sslens.data.augment",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
