"""The ``imagefolder`` dataset: class-per-folder images, decoded once into a uint8 cache or streamed.

Layouts (class names = sorted folder names of the train side, so train and test share indices):

* ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (ImageNet style): used as they are;
  a test class unknown to train is an error.
* ``data_dir/<class>/*`` (or only ``data_dir/train/<class>/*``): split per class into train and
  test by a seeded hash of each file's relative path: a file is a test file when its hash, read
  as a fraction in [0, 1), is below ``test_fraction``. A file's split depends on its own path
  and the seed alone, so adding or removing files never moves another file between splits (a
  model trained before files were added is never evaluated on its own training images); each
  class's test share is ``test_fraction`` on average rather than exactly, and a small class can
  end up with no test (or no train) image, which the loader reports.

Everything is read and checked when the dataset is loaded, never hours into training:

* files without an image extension (README.txt, .DS_Store) and files PIL cannot decode (truncated,
  corrupt) are skipped, with ONE warning naming them;
* grayscale, palette, CMYK, 16-bit and float images are converted to RGB and transparent ones
  composited on white, by the one policy of :func:`sslens.data.images.to_rgb` (shared with
  ``sslens explain``, so a model is explained on the pixels it was trained on);
* a class folder without readable images keeps its label index (train and test must agree) and is
  named in a warning;
* no readable image at all, a missing ``data_dir`` or no class folders raise
  :class:`~sslens.errors.DatasetError`.

Datasets whose decoded size fits in ``max_memory_bytes`` become an :class:`ImageData` cached as
one uint8 tensor file; bigger ones become a :class:`StreamingImageData` that decodes batches in
DataLoader workers (after one validation pass at load time, whose result is cached too).

>>> data = load_imagefolder("train", data_dir="~/data/cifar10-jpeg")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslens.checks import fraction, is_int
from sslens.data.base import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageData,
    batch_slices,
    epoch_order,
)
from sslens.data.cache import load_cache, save_cache, writable_dir
from sslens.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_image
from sslens.errors import DatasetError, SslensWarning
from sslens.hashing import json_sha256

CACHE_VERSION = 2  # bump when decoding changes, so old caches are rebuilt (2: one to_rgb policy)
_LAYOUT_HELP = (
    "Expected data_dir/train/<class>/<image> and data_dir/test/<class>/<image>, or "
    "data_dir/<class>/<image> (then test_fraction of each class becomes the test split)."
)
_WARN_LIMIT = 10


# ---------------------------------------------------------------------------------------------
# Decoding (module-level functions: they run in worker processes)


@dataclass(frozen=True)
class _Chunk:
    start: int
    paths: tuple[str, ...]
    image_size: int | None
    keep_pixels: bool


def _decode_chunk(chunk: _Chunk) -> list[tuple[int, np.ndarray | tuple[int, int] | str]]:
    """(index, pixels or (H, W) or an error message) for each file of ``chunk``."""
    results: list[tuple[int, np.ndarray | tuple[int, int] | str]] = []
    for offset, path in enumerate(chunk.paths):
        try:
            array = decode_image(path, chunk.image_size)
        except DECODE_ERRORS as error:
            results.append((chunk.start + offset, f"{type(error).__name__}: {error}"))
            continue
        results.append((chunk.start + offset, array if chunk.keep_pixels else array.shape[:2]))
    return results


def _map_chunks(
    fn: Callable[[_Chunk], list], chunks: Sequence[_Chunk], num_workers: int
) -> Iterable[list]:
    if num_workers <= 1 or len(chunks) <= 1:
        return map(fn, chunks)
    # forkserver/spawn rather than fork: forking a process that holds torch's thread pools is
    # unsafe; the workers only need PIL and numpy.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(min(num_workers, len(chunks)), mp_context=multiprocessing.get_context(method))
    with pool:
        return list(pool.map(fn, chunks))


# ---------------------------------------------------------------------------------------------
# Listing the files


@dataclass(frozen=True)
class _Listing:
    root: Path  # data_dir; file names are relative to it
    files: list[str]
    labels: list[int]
    class_names: list[str]
    not_images: list[str]
    split_rule: str  # "folders" or "fraction"


def _class_dirs(root: Path) -> list[str]:
    # Hidden folders (.sslens-cache, .ipynb_checkpoints) are never classes.
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk(folder: Path, seen: set[str]) -> list[Path]:
    """Every file under ``folder``, following links to folders but entering each real folder
    once and listing each real file once (``seen`` holds the real paths listed so far, shared
    by the class folders), so a link loop or a link to another class cannot repeat images."""
    found = []
    visited: set[str] = set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real_parent = os.path.realpath(parent)
        if real_parent in visited:
            dirs[:] = []
            continue
        visited.add(real_parent)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(parent, d)) not in visited)
        for name in sorted(names):
            real = os.path.realpath(os.path.join(parent, name))
            if real not in seen:
                seen.add(real)
                found.append(Path(parent) / name)
    return found


def _hash_fraction(seed: int, name: str) -> float:
    """``name``'s seeded SHA-1 read as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{name}".encode()).digest()) / 2**160


def _scan(data_dir: Path, split: str, test_fraction: float, seed: int) -> _Listing:
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise DatasetError(f"The image folder {data_dir} {what}. {_LAYOUT_HELP}")
    explicit = (data_dir / "train").is_dir() and (data_dir / "test").is_dir()
    class_root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    class_names = _class_dirs(class_root)
    if not class_names:
        files = [p.name for p in class_root.iterdir() if p.is_file()]
        shown = ", ".join(sorted(files)[:_WARN_LIMIT])
        raise DatasetError(
            f"No class folders in {class_root}: found {len(files)} file(s)"
            f"{' (' + shown + ')' if shown else ''} and no sub-folders. {_LAYOUT_HELP}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    side = data_dir / split if explicit else class_root
    if explicit:
        unknown = [name for name in _class_dirs(side) if name not in index]
        if unknown:
            raise DatasetError(
                f"The test classes {', '.join(unknown)} in {side} have no folder in "
                f"{class_root}, so they have no label index. Add them to train (an empty folder "
                f"is enough) or remove them from test. Train classes: {', '.join(class_names)}."
            )
    files, labels, not_images = [], [], []
    seen: set[str] = set()
    for name in class_names:
        folder = side / name
        paths = _walk(folder, seen) if folder.is_dir() else []
        images = []
        for path in paths:
            relative = path.relative_to(data_dir).as_posix()
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(relative)
            else:
                not_images.append(relative)
        if not explicit:
            # Per file, not a rounded count per class: a count would move a boundary file from
            # train to test whenever a new file raised it.
            images = sorted(r for r in images if (_hash_fraction(seed, r) < test_fraction) == (split == "test"))
        files.extend(images)
        labels.extend([index[name]] * len(images))
    return _Listing(data_dir, files, labels, class_names, not_images, "folders" if explicit else "fraction")


def _stat_fingerprint(listing: _Listing, *options: object) -> str:
    stats = []
    for relative in listing.files:
        st = os.stat(listing.root / relative)
        stats.append((relative, st.st_size, st.st_mtime_ns))
    return json_sha256([CACHE_VERSION, str(listing.root), listing.class_names, listing.labels, stats, *options])


# ---------------------------------------------------------------------------------------------
# Streaming


class _FileDataset(torch.utils.data.Dataset):
    """Index → (H, W, 3) uint8 tensor, decoded in a DataLoader worker."""

    def __init__(self, root: Path, files: Sequence[str], image_size: int | None, shape: tuple[int, int]):
        self.root, self.files, self.image_size, self.shape = root, list(files), image_size, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.root / self.files[index]
        try:
            array = decode_image(path, self.image_size)
        except DECODE_ERRORS as error:
            raise DatasetError(
                f"{path} was readable when the dataset was loaded but cannot be decoded now "
                f"({error}). Restore the file, or delete it and load the dataset again."
            ) from None
        if array.shape[:2] != self.shape:
            raise DatasetError(
                f"{path} changed size since the dataset was loaded ({array.shape[:2]} instead of "
                f"{self.shape}). Load the dataset again, or pass image_size to resize every image."
            )
        return torch.from_numpy(array)


def _stack(batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(batch)


class _LazyImages:
    """``data.images[index]`` for streamed data: decodes just the requested images."""

    def __init__(self, data: StreamingImageData):
        self._data = data

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._data), *self._data.image_size, 3)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        positions = torch.arange(len(self._data))[index]
        dataset = self._data._file_dataset()
        if positions.ndim == 0:
            return dataset[int(positions)]
        return _stack([dataset[int(i)] for i in positions]) if len(positions) else torch.empty(
            (0, *self._data.image_size, 3), dtype=torch.uint8
        )


@dataclass
class StreamingImageData:
    """An image folder too big for memory, with the same interface as :class:`ImageData`.

    Batches are decoded by ``num_workers`` DataLoader processes into uint8 (B, H, W, 3) tensors;
    augmentation happens later, on the device. Every file was decoded once when the dataset was
    loaded, so unreadable files are already excluded.
    """

    root: Path
    files: list[str]
    labels: torch.Tensor
    class_names: list[str]
    shape: tuple[int, int]  # (H, W) of every decoded image
    resize_to: int | None  # the image_size option (None = native size)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    num_workers: int = 0
    device: torch.device | None = None
    masks: None = None
    depth: None = None

    def __post_init__(self) -> None:
        if len(self.files) == 0:
            raise ValueError(f"The dataset {self.source} is empty: it holds no images.")
        if self.labels.shape != (len(self.files),):
            raise ValueError(
                f"StreamingImageData.labels must have shape ({len(self.files)},); got {tuple(self.labels.shape)}"
            )
        self.extras: dict = {}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def images(self) -> _LazyImages:
        return _LazyImages(self)

    def to(self, device: torch.device | str) -> StreamingImageData:
        """The same data, with batches delivered on ``device`` (the files stay on disk)."""
        return replace(self, device=torch.device(device))

    def subset(self, indices: torch.Tensor) -> StreamingImageData:
        picked = torch.as_tensor(indices).cpu()
        files = [self.files[int(i)] for i in picked]
        return replace(self, files=files, labels=self.labels[picked])

    def _file_dataset(self) -> _FileDataset:
        return _FileDataset(self.root, self.files, self.resize_to, self.shape)

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
        """Yield (images (B, H, W, 3) uint8, labels (B,)) in the same order as ImageData would
        (``rank``/``world_size``: this rank's part of each global batch, as there)."""
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        order = epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch)
        batches = [
            index.tolist()
            for index in batch_slices(order, batch_size, drop_last, rank=rank, world_size=world_size)
        ]
        loader = torch.utils.data.DataLoader(
            self._file_dataset(),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_stack,
            pin_memory=device.type == "cuda",
        )
        for index, images in zip(batches, loader, strict=True):
            yield images.to(device, non_blocking=True), self.labels[index].to(device)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


# ---------------------------------------------------------------------------------------------
# Loading


def _warn_skipped(root: Path, skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:_WARN_LIMIT])
        more = f"; and {len(skipped) - _WARN_LIMIT} more" if len(skipped) > _WARN_LIMIT else ""
        warnings.warn(
            f"Skipped {len(skipped)} file(s) under {root} that are not readable images: {shown}{more}.", SslensWarning, stacklevel=4,
        )


def _warn_empty(root: Path, split: str, class_names: list[str], labels: torch.Tensor) -> None:
    counts = torch.bincount(labels, minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts.tolist(), strict=True) if count == 0]
    if empty:
        warnings.warn(
            f"Class folder(s) with no readable {split} images under {root}: {', '.join(empty)}. "
            "They keep their label index (so train and test agree) but contribute no images.", SslensWarning, stacklevel=4,
        )


def _decode_all(
    listing: _Listing, image_size: int | None, keep_pixels: bool, num_workers: int
) -> tuple[list[tuple[int, np.ndarray | tuple[int, int]]], list[str]]:
    """Decode every listed file; (index, pixels or shape) of the good ones, and the skipped ones."""
    side = image_size or 256
    per_chunk = int(min(1024, max(16, 2**24 // (side * side * 3))))
    paths = [str(listing.root / f) for f in listing.files]
    chunks = [
        _Chunk(start, tuple(paths[start : start + per_chunk]), image_size, keep_pixels)
        for start in range(0, len(paths), per_chunk)
    ]
    good, skipped = [], [f"{name} (not an image file)" for name in listing.not_images]
    for results in _map_chunks(_decode_chunk, chunks, num_workers):
        for index, result in results:
            if isinstance(result, str):
                skipped.append(f"{listing.files[index]} ({result})")
            else:
                good.append((index, result))
    return good, skipped


def _check_found(listing: _Listing, good: list, skipped: list[str], split: str) -> None:
    if not good:
        shown = "; ".join(skipped[:_WARN_LIMIT]) or "no files"
        raise DatasetError(
            f"No readable {split} image under {listing.root}: {len(listing.class_names)} class "
            f"folder(s) ({', '.join(listing.class_names[:_WARN_LIMIT])}) hold {len(listing.files)} "
            f"image file(s) that decode and {len(skipped)} that do not ({shown}). {_LAYOUT_HELP}"
        )


def _check_one_size(listing: _Listing, shapes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    sizes = Counter(tuple(s) for s in shapes)
    if len(sizes) > 1:
        common = ", ".join(f"{w}x{h} ({n} images)" for (h, w), n in sizes.most_common(5))
        raise DatasetError(
            f"The images under {listing.root} have {len(sizes)} different sizes ({common}). Pass "
            "image_size (e.g. --image-size 64) to resize (shorter side) and centre-crop them all "
            "to one square size."
        )
    return next(iter(sizes))


def _estimate_bytes(listing: _Listing, image_size: int | None) -> int:
    if image_size is not None:
        return len(listing.files) * image_size * image_size * 3
    for relative in listing.files[:64]:
        try:
            with Image.open(listing.root / relative) as img:
                width, height = img.size
        except DECODE_ERRORS:
            continue
        return len(listing.files) * width * height * 3
    return 0


def _check_options(
    image_size: object, test_fraction: object, seed: object, max_memory_bytes: object, num_workers: object
) -> None:
    if image_size is not None and (not is_int(image_size) or image_size < 1):
        raise ValueError(f"imagefolder: image_size must be a positive int or None; got {image_size!r}.")
    fraction("imagefolder: test_fraction", test_fraction)
    for name, value in (("seed", seed), ("max_memory_bytes", max_memory_bytes), ("num_workers", num_workers)):
        if not is_int(value) or value < 0:
            raise ValueError(f"imagefolder: {name} must be a non-negative int; got {value!r}.")


@DATASETS.register("imagefolder")
def load_imagefolder(
    split: str,
    *,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    max_memory_bytes: int = 4 * 2**30,
    num_workers: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> ImageData | StreamingImageData:
    """Images in class folders under ``data_dir`` (see the module docstring for layouts and checks).

    Args:
        split: "train" or "test".
        data_dir: the dataset folder.
        image_size: resize (shorter side) and centre-crop every image to this square size;
            None keeps the native size, which must then be the same for every image.
        test_fraction: share of each class used for test when there are no train/ and test/
            folders.
        seed: seeds that split.
        cache_dir: where decoded caches go (default ``data_dir/.sslens-cache``; if that is not
            writable, ``~/.cache/sslens/imagefolder``).
        max_memory_bytes: above this decoded size the data is streamed from disk.
        num_workers: decoding processes (default: the CPU count, at most 8).
        mean, std: normalisation statistics (default ImageNet's).
    """
    if split not in ("train", "test"):
        raise ValueError(f"imagefolder: split must be 'train' or 'test'; got {split!r}.")
    if data_dir is None:
        raise DatasetError(f"The imagefolder dataset needs data_dir (--data-dir PATH). {_LAYOUT_HELP}")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    _check_options(image_size, test_fraction, seed, max_memory_bytes, num_workers)
    root = Path(data_dir).expanduser().resolve()
    listing = _scan(root, split, float(test_fraction), seed)
    split_options = (float(test_fraction), seed) if listing.split_rule == "fraction" else ()
    key = _stat_fingerprint(listing, split, image_size, *split_options)
    streaming = _estimate_bytes(listing, image_size) > max_memory_bytes
    folder = writable_dir(Path(cache_dir).expanduser() if cache_dir else root / ".sslens-cache", "imagefolder")
    name = json_sha256([str(root), split, image_size, streaming])[:16]
    cache_path = folder / f"imagefolder-{split}-{'stream' if streaming else 'memory'}-{name}.pt"
    source = f"imagefolder {split} from {root}" + (f" at {image_size}px" if image_size else "")

    payload = load_cache(cache_path, key)
    if payload is None:
        good, skipped = _decode_all(listing, image_size, keep_pixels=not streaming, num_workers=num_workers)
        _check_found(listing, good, skipped, split)
        indices = [index for index, _ in good]
        labels = torch.tensor([listing.labels[i] for i in indices], dtype=torch.int64)
        if streaming:
            shape = _check_one_size(listing, (result for _, result in good))
            payload = {"files": [listing.files[i] for i in indices], "shape": list(shape)}
        else:
            _check_one_size(listing, (result.shape[:2] for _, result in good))
            payload = {"images": torch.from_numpy(np.stack([result for _, result in good]))}
        payload.update(labels=labels, class_names=listing.class_names, skipped=skipped)
        save_cache(cache_path, key, payload)

    _warn_skipped(root, payload["skipped"])
    _warn_empty(root, split, payload["class_names"], payload["labels"])
    if streaming:
        return StreamingImageData(
            root=root, files=payload["files"], labels=payload["labels"],
            class_names=payload["class_names"], shape=tuple(payload["shape"]), resize_to=image_size,
            mean=tuple(mean), std=tuple(std), source=source, num_workers=num_workers,
        )
    return ImageData(
        images=payload["images"], labels=payload["labels"], class_names=payload["class_names"],
        mean=tuple(mean), std=tuple(std), source=source,
    )
