"""The ``cifar10`` dataset: torchvision's CIFAR-10 python files, decoded once into a uint8 cache.

CIFAR-10 (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html): 50,000 training and
10,000 test images of 32 x 32 pixels in 10 classes.

>>> data = load_cifar10("train", data_dir="~/data/cifar10")  # doctest: +SKIP
>>> tuple(data.images.shape), data.num_classes  # doctest: +SKIP
((50000, 32, 32, 3), 10)
"""

from __future__ import annotations

import tarfile
import tempfile
import zlib
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from sslens.checks import boolean
from sslens.data.base import DATASETS, ImageData
from sslens.data.cache import load_cache, save_cache, writable_dir
from sslens.errors import DatasetError
from sslens.hashing import json_sha256

# The usual per-channel statistics of the CIFAR-10 training set (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _missing_message(data_dir: Path, detail: str) -> str:
    return (
        f"CIFAR-10 was not found under {data_dir} ({detail}). Put the extracted folder "
        f"{data_dir / CIFAR10.base_folder} (holding data_batch_1 ... data_batch_5, test_batch and "
        f"batches.meta), or the archive {data_dir / CIFAR10.filename}, there; both come from "
        "https://www.cs.toronto.edu/~kriz/cifar.html (the 'CIFAR-10 python version'). Or, when "
        "this machine is online, pass --download (download=True) to fetch them automatically."
    )


def _source_files(data_dir: Path, split: str) -> list[Path]:
    names = [name for name, _ in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]
    folder = data_dir / CIFAR10.base_folder
    return [folder / name for name in [*names, CIFAR10.meta["filename"]]]


def _extract(archive: Path, data_dir: Path) -> None:
    """Unpack ``archive`` into ``data_dir`` (resolved), refusing any member that is not a plain file or
    folder inside it.

    torchvision's ``extract_archive`` calls ``tarfile.extractall`` without a filter, which on
    Python < 3.14 writes wherever a member's name (``../``, an absolute path) or a link points.
    The archive here is whatever file the user put there, never checked against an MD5 sum.
    It is unpacked into a temporary folder beside the target and its data folder renamed into
    place, so an archive that breaks halfway leaves no partial folder that later runs would read.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            inside = (data_dir / member.name).resolve().is_relative_to(data_dir)
            if not inside or not (member.isfile() or member.isdir()):
                raise DatasetError(
                    f"The archive {archive} holds {member.name!r}, which would be written outside "
                    f"{data_dir} or is a link or device; the CIFAR-10 archive holds only "
                    f"{CIFAR10.base_folder}/ and its files. Replace the archive with the original."
                )
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".sslens-extract-") as scratch:
            tar.extractall(scratch, members=members)
            unpacked = Path(scratch) / CIFAR10.base_folder
            if not unpacked.is_dir():
                raise DatasetError(_missing_message(data_dir, f"the archive {archive} holds no {CIFAR10.base_folder}/"))
            unpacked.rename(data_dir / CIFAR10.base_folder)


def _decode(data_dir: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    folder = data_dir / CIFAR10.base_folder
    archive = data_dir / CIFAR10.filename
    if not folder.is_dir() and archive.is_file() and not download:
        try:
            _extract(archive, data_dir)
        # tarfile raises ReadError (not an OSError) for a file that is no gzip/tar at all, and
        # zlib.error for a corrupt compressed stream.
        except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
            why = f"the archive {archive} could not be extracted ({error}); is it complete, and is there disk space?"
            raise DatasetError(_missing_message(data_dir, why)) from None
    if not folder.is_dir() and not download:
        raise DatasetError(_missing_message(data_dir, f"there is no folder {folder}"))
    try:
        dataset = CIFAR10(root=str(data_dir), train=split == "train", download=download)
    except (OSError, RuntimeError) as error:
        # torchvision raises RuntimeError for missing or corrupt files and OSError (URLError) when
        # the download fails; both are fixed by putting the files in place.
        raise DatasetError(_missing_message(data_dir, str(error))) from None
    images = torch.from_numpy(dataset.data).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images, labels, list(dataset.classes)


@DATASETS.register("cifar10")
def load_cifar10(
    split: str, *, data_dir: str | Path | None = None, download: bool = False
) -> ImageData:
    """CIFAR-10 ``split`` from ``data_dir`` (decoded once into ``data_dir/.sslens-cache``).

    Args:
        split: "train" (50,000 images) or "test" (10,000 images).
        data_dir: folder holding ``cifar-10-batches-py`` (or ``cifar-10-python.tar.gz``).
        download: fetch the files with torchvision when they are missing (needs internet).

    The cache is keyed by the sizes and modification times of the source files; it goes to
    ``~/.cache/sslens/cifar10`` when ``data_dir`` is read-only.
    """
    if data_dir is None:
        raise DatasetError(
            "The cifar10 dataset needs data_dir: the folder that holds (or will hold, with "
            "--download) cifar-10-batches-py. Pass --data-dir PATH (data_dir=PATH)."
        )
    if split not in ("train", "test"):
        raise ValueError(f"cifar10: split must be 'train' or 'test'; got {split!r}.")
    boolean("cifar10: download", download)
    data_dir = Path(data_dir).expanduser().resolve()

    def stat_key() -> str | None:
        files = _source_files(data_dir, split)
        if not all(f.is_file() for f in files):
            return None
        return json_sha256(["cifar10", split, [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]])

    # Only look for (and create) the cache folder once the data is there, so a mistyped data_dir
    # is reported instead of silently created.
    cache_path = lambda: writable_dir(data_dir / ".sslens-cache", "cifar10") / f"cifar10-{split}.pt"  # noqa: E731
    key = stat_key()
    payload = load_cache(cache_path(), key) if key is not None else None
    if payload is None:
        images, labels, class_names = _decode(data_dir, split, download)
        key = stat_key() or json_sha256(["cifar10", split])
        save_cache(cache_path(), key, {"images": images, "labels": labels, "class_names": class_names})
    else:
        images, labels, class_names = payload["images"], payload["labels"], payload["class_names"]
    return ImageData(
        images=images,
        labels=labels,
        class_names=list(class_names),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"cifar10 {split} from {data_dir}",
    )
