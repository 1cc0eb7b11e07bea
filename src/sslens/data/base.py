"""The one data interface: uint8 images (N, H, W, 3), int64 labels and, where known, ground truth."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sslens.checks import suggestion
from sslens.errors import UserError
from sslens.hashing import hash_tensor
from sslens.registry import Registry

DATASETS = Registry(
    "dataset", modules=("sslens.data.synthetic", "sslens.data.cifar10", "sslens.data.imagefolder")
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageData:
    """A dataset that fits in memory (and so on the training device).

    Attributes:
        images: (N, H, W, 3) uint8.
        labels: (N,) int64 class indices into ``class_names``.
        class_names: one name per class.
        masks: (N, H, W) bool object segmentation, or None where unknown.
        depth: (N, H, W) float32 relative inverse depth in [0, 1] (1 = nearest, as MiDaS
            predicts), or None where unknown.
        mean, std: per-channel statistics used to normalise these images for a model.
        source: a short description (dataset name, path, split) recorded in run metadata.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    masks: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"ImageData.images must be uint8 (N, H, W, 3); got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.images) == 0:
            raise ValueError(f"The dataset {self.source or ''} is empty: it holds no images.")
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"ImageData.labels must have shape ({len(self.images)},); got {tuple(self.labels.shape)}"
            )
        for name in ("masks", "depth"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(self.images.shape[:3]):
                raise ValueError(
                    f"ImageData.{name} must have shape {tuple(self.images.shape[:3])}; "
                    f"got {tuple(value.shape)}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with every tensor on ``device`` (a no-op where already there)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageData(
            move(self.images), move(self.labels), self.class_names, move(self.masks),
            move(self.depth), self.mean, self.std, self.source,
            {key: move(value) if torch.is_tensor(value) else value for key, value in self.extras.items()},
        )

    def subset(self, indices: torch.Tensor) -> ImageData:
        pick = lambda t: None if t is None else t[indices.to(t.device)]  # noqa: E731
        # Per-image extras (first dimension N) follow the images; anything else is shared.
        per_image = lambda v: torch.is_tensor(v) and v.ndim > 0 and len(v) == len(self)  # noqa: E731
        return ImageData(
            pick(self.images), pick(self.labels), self.class_names, pick(self.masks),
            pick(self.depth), self.mean, self.std, self.source,
            {key: pick(value) if per_image(value) else value for key, value in self.extras.items()},
        )

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (B, H, W, 3) uint8, labels (B,)) on ``device``.

        The order depends only on (seed, epoch), so an interrupted run resumes with the same
        batches it would have seen. With ``world_size`` > 1 each batch of ``batch_size`` (the
        global batch) is cut into ``world_size`` parts and this yields part ``rank``: together
        the ranks see exactly the batches of one process.
        """
        device = torch.device(device) if device is not None else self.images.device
        # One copy of the order per epoch: a per-batch copy from pageable host memory would make
        # the host wait for the GPU every step, so kernel launches could no longer run ahead.
        order = epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch).to(self.images.device)
        for index in batch_slices(order, batch_size, drop_last, rank=rank, world_size=world_size):
            yield self.images[index].to(device, non_blocking=True), self.labels[index].to(device)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64 CPU: the order of epoch ``epoch``, a function of (seed, epoch) alone."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_slices(
    order: torch.Tensor, batch_size: int, drop_last: bool, *, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """``order`` cut into batches of ``batch_size`` (the last one partial unless ``drop_last``);
    with ``world_size`` > 1, part ``rank`` of each (``tensor_split`` into ``world_size`` parts)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    batches = [order[start : start + batch_size] for start in range(0, stop, batch_size)]
    if world_size == 1:
        return batches
    return [batch.tensor_split(world_size)[rank] for batch in batches]


def data_fingerprint(data: Any) -> str:
    """SHA-256 of what a split holds: its class names, image size, and the bytes of its images,
    labels, masks and depth; a streamed folder (pixels on disk) by its file list instead.

    The study keys its cached results and its reuse of trained models on it: a dataset section
    names a folder, not what it holds, and a folder whose files changed must not reuse either.
    """
    digest = hashlib.sha256(json.dumps(
        {"class_names": list(data.class_names), "image_size": list(data.image_size),
         "root": str(getattr(data, "root", "")), "files": [str(path) for path in getattr(data, "files", [])]},
    ).encode())
    for name in ("images", "labels", "masks", "depth"):
        value = getattr(data, name, None)
        if torch.is_tensor(value):
            digest.update(name.encode())
            hash_tensor(digest, value)
    return digest.hexdigest()


def load_dataset(name: str, split: str, **options) -> ImageData:
    """Load dataset ``name`` ("synthetic", "cifar10", "imagefolder") for ``split`` ("train"/"test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return DATASETS.create(name, split=split, **options)


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """The ``split`` ("train"/"test") of dataset ``name``, as training, evaluation, explanation
    and the study all load it.

    ``data_dir`` and ``image_size`` are passed where the dataset takes them (``options`` wins
    for keys it sets too); a dataset that reads no files refuses a ``data_dir``. In-memory data
    is moved to ``device`` whole, so training draws batches without host-to-device copies.
    Unknown option names and invalid values are :class:`~sslens.errors.UserError`s.

    >>> load_split("synthetic", "test", options={"num_images": 8}).images.shape
    torch.Size([8, 32, 32, 3])
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    try:
        factory = DATASETS.get(name)
    except ValueError as error:
        raise UserError(str(error)) from error
    accepted = [p for p in inspect.signature(factory).parameters if p != "split"]
    merged = dict(options or {})
    unknown = [key for key in merged if key not in accepted]
    if unknown:
        raise UserError(
            f"The {name!r} dataset has no option {unknown[0]!r}.{suggestion(unknown[0], accepted)} "
            f"Its options: {', '.join(accepted)}."
        )
    if data_dir is not None:
        if "data_dir" not in accepted:
            raise UserError(f"The {name!r} dataset reads no files, so it takes no --data-dir.")
        merged.setdefault("data_dir", data_dir)
    if image_size is not None and "image_size" in accepted:
        merged.setdefault("image_size", image_size)
    try:
        data = factory(split=split, **merged)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"Invalid data options for {name!r}: {error}") from error
    # Small datasets live on the device: no loader workers, no host-to-device copies per step.
    return data.to(device) if device is not None and isinstance(data, ImageData) else data


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [0, 1], on the same device."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] → normalised with per-channel ``mean`` and ``std``."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std_t + mean_t
