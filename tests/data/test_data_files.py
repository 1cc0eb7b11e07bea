"""cifar10 and imagefolder: missing files, caches, splits, bad inputs and streaming."""

import io
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

import sslens.data.imagefolder as imagefolder
from sslens.data import ImageData, StreamingImageData, load_dataset
from sslens.errors import DatasetError

# ---------------------------------------------------------------------------------------------
# cifar10


def test_cifar10_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "--download" in message
    assert not (tmp_path / "nowhere").exists()  # a mistyped path is not created


def test_cifar10_requires_data_dir():
    with pytest.raises(DatasetError, match="data_dir"):
        load_dataset("cifar10", "train")


def _write_fake_cifar(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's layout: pickled dicts with 'data' (N, 3072) uint8 CHW rows and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return written


def test_cifar10_decodes_once_into_a_cache(tmp_path, monkeypatch):
    # The fake files cannot match torchvision's MD5 sums.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    written = _write_fake_cifar(tmp_path, np.random.default_rng(0))
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected = expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.class_names[0] == "airplane" and train.mean == (0.4914, 0.4822, 0.4465)
    assert (tmp_path / ".sslens-cache" / "cifar10-train.pt").is_file()

    class NoDecoding(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs):
            raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr("sslens.data.cifar10.CIFAR10", NoDecoding)
    again = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # Touching a source file invalidates the cache.
    os.utime(tmp_path / "cifar-10-batches-py" / "data_batch_1", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar10_archive_is_extracted(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    written = _write_fake_cifar(tmp_path / "src", np.random.default_rng(0))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar10_archive_failing_halfway_leaves_no_partial_folder(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path / "src", np.random.default_rng(0))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    extractall = tarfile.TarFile.extractall

    def disk_full(self, path, members, **kwargs):
        extractall(self, path, members=members[:2], **kwargs)  # the folder and its first file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", disk_full)
    with pytest.raises(DatasetError, match="No space left"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "src"]


def test_cifar10_damaged_archive_is_a_dataset_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a gzip file at all" * 50)
    with pytest.raises(DatasetError, match="could not be extracted"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["../escaped.txt", "cifar-10-batches-py/../../escaped.txt", "absolute"])
def test_cifar10_archive_cannot_write_outside_data_dir(tmp_path, name):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    payload = b"overwritten"
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo(str(tmp_path / "escaped.txt") if name == "absolute" else name)
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(DatasetError, match="outside"):
        load_dataset("cifar10", "train", data_dir=data_dir)
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar10_archive_links_are_refused(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
        tar.addfile(link)
    with pytest.raises(DatasetError, match="link"):
        load_dataset("cifar10", "train", data_dir=data_dir)
    assert not (data_dir / "cifar-10-batches-py").exists()


# ---------------------------------------------------------------------------------------------
# imagefolder helpers


def _image(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _make_folder(root: Path, classes=("cat", "dog"), per_class=5, size=(12, 10)) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(_image(100 * c + i, size), root / name / f"{i}.png")


def _load(split, root, **options):
    options.setdefault("num_workers", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset("imagefolder", split, data_dir=root, **options)
    return data, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# imagefolder: layouts and splits


def test_explicit_train_test_layout_shares_class_indices(tmp_path):
    _make_folder(tmp_path / "train", ("a", "b", "c"), per_class=2)
    _make_folder(tmp_path / "test", ("c",), per_class=3)
    train, _ = _load("train", tmp_path)
    test, messages = _load("test", tmp_path)
    assert train.class_names == test.class_names == ["a", "b", "c"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [2, 2, 2]
    # The pixels are the lossless PNGs we wrote.
    assert torch.equal(train.images[0], torch.from_numpy(np.array(_image(0))))
    assert any("a, b" in m and "no readable test images" in m for m in messages)


def test_unknown_test_class_is_an_error(tmp_path):
    _make_folder(tmp_path / "train", ("a",), per_class=1)
    _make_folder(tmp_path / "test", ("a", "zebra"), per_class=1)
    with pytest.raises(DatasetError, match="zebra"):
        _load("test", tmp_path)


def test_fraction_split_is_deterministic_disjoint_and_complete(tmp_path):
    _make_folder(tmp_path, ("a", "b"), per_class=10)
    train, _ = _load("train", tmp_path, seed=1, test_fraction=0.3)
    test, _ = _load("test", tmp_path, seed=1, test_fraction=0.3)
    again, _ = _load("test", tmp_path, seed=1, test_fraction=0.3, cache_dir=tmp_path / ".other")
    other_seed, _ = _load("test", tmp_path, seed=2, test_fraction=0.3)
    assert len(train) + len(test) == 20 and 2 <= len(test) <= 10  # 6 expected (binomial, sd 2)
    assert torch.equal(again.images, test.images)
    assert not torch.equal(other_seed.images, test.images)
    rows = lambda d: {bytes(x) for x in d.images.flatten(1).numpy()}  # noqa: E731
    assert rows(train).isdisjoint(rows(test)) and len(rows(train) | rows(test)) == 20


def test_adding_files_never_moves_a_file_from_train_to_test(tmp_path):
    """A file's split depends on its own name alone; with a rounded count per class, adding one
    file could move a training image into test, where a model trained on it is evaluated."""
    from sslens.data.imagefolder import _scan

    _make_folder(tmp_path, ("a",), per_class=12)
    before = {split: set(_scan(tmp_path, split, 0.2, 0).files) for split in ("train", "test")}
    for i in range(12, 60):
        _save(_image(i), tmp_path / "a" / f"{i}.png")
        after = {split: set(_scan(tmp_path, split, 0.2, 0).files) for split in ("train", "test")}
        assert before["train"] <= after["train"] and before["test"] <= after["test"]
        before = after
    # The share is test_fraction on average: 60 files, 12 expected (sd 3.1).
    assert 4 <= len(before["test"]) <= 20


def test_missing_dir_and_no_class_folders_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _load("train", tmp_path / "missing")
    _save(_image(0), tmp_path / "loose.png")
    with pytest.raises(DatasetError, match=r"No class folders.*1 file\(s\) \(loose.png\)"):
        _load("train", tmp_path)


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.txt").write_text("hello")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"No readable train image.*broken.jpg"):
        _load("train", tmp_path, test_fraction=0.0)


def test_mixed_native_sizes_ask_for_image_size(tmp_path):
    _save(_image(0, (12, 10)), tmp_path / "a" / "0.png")
    _save(_image(1, (9, 9)), tmp_path / "a" / "1.png")
    with pytest.raises(DatasetError, match="image_size"):
        _load("train", tmp_path, test_fraction=0.0)
    data, _ = _load("train", tmp_path, test_fraction=0.0, image_size=6)
    assert data.images.shape == (2, 6, 6, 3)


# ---------------------------------------------------------------------------------------------
# imagefolder: bad files


def test_truncated_corrupt_and_non_image_files_are_skipped_with_one_warning(tmp_path):
    _make_folder(tmp_path, ("a", "b"), per_class=2)
    buffer = io.BytesIO()
    _image(7, (40, 40)).save(buffer, format="JPEG", quality=95)
    (tmp_path / "a" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "a" / "garbage.png").write_bytes(os.urandom(100))
    (tmp_path / "b" / "README.txt").write_text("notes")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    data, messages = _load("train", tmp_path, test_fraction=0.0)
    assert len(data) == 4
    skipped = [m for m in messages if m.startswith("Skipped")]
    assert len(skipped) == 1
    for name in ("truncated.jpg", "garbage.png", "README.txt", ".DS_Store"):
        assert name in skipped[0]
    assert "Skipped 4 file(s)" in skipped[0]


def test_warning_lists_at_most_ten_files_and_a_count(tmp_path):
    _make_folder(tmp_path, ("a",), per_class=1)
    for i in range(13):
        (tmp_path / "a" / f"note{i:02d}.txt").write_text("x")
    _, messages = _load("train", tmp_path, test_fraction=0.0)
    (skipped,) = [m for m in messages if m.startswith("Skipped")]
    assert "Skipped 13 file(s)" in skipped and "and 3 more" in skipped
    assert "note09.txt" in skipped and "note10.txt" not in skipped


def test_modes_are_converted_to_rgb(tmp_path):
    folder = tmp_path / "a"
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    _save(Image.fromarray(grey, "L"), folder / "0_grey.png")
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :6, 3] = 255  # left half opaque red, right half fully transparent
    _save(Image.fromarray(rgba, "RGBA"), folder / "1_rgba.png")
    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 257 * 2).astype(np.uint16)
    deep_image = Image.fromarray(deep)
    assert deep_image.mode == "I;16"
    _save(deep_image, folder / "2_deep.png")
    palette = Image.fromarray(np.full((10, 12), 3, dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (768 - 12))
    _save(palette, folder / "3_palette.png")
    _save(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), folder / "4_cmyk.jpg", quality=100)
    data, messages = _load("train", tmp_path, test_fraction=0.0)
    assert not [m for m in messages if m.startswith("Skipped")]
    images = data.images
    assert torch.equal(images[0], torch.from_numpy(np.repeat(grey[..., None], 3, axis=2)))
    assert images[1, :, :6].tolist() == [[[200, 0, 0]] * 6] * 10  # opaque: kept
    assert (images[1, :, 6:] == 255).all()  # transparent: white
    expected_deep = np.round(deep / 257).astype(np.uint8)
    assert torch.equal(images[2, ..., 0], torch.from_numpy(expected_deep))
    assert (images[3] == torch.tensor([70, 80, 90], dtype=torch.uint8)).all()
    red = images[4].float().mean((0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_empty_class_keeps_its_index_and_is_named(tmp_path):
    _make_folder(tmp_path, ("a", "c"), per_class=2)
    (tmp_path / "b").mkdir()
    data, messages = _load("train", tmp_path, test_fraction=0.0)
    assert data.class_names == ["a", "b", "c"] and data.labels.tolist() == [0, 0, 2, 2]
    (empty,) = [m for m in messages if "no readable" in m]
    assert ": b." in empty


# ---------------------------------------------------------------------------------------------
# imagefolder: caching and streaming


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    _make_folder(tmp_path, ("a", "b"), per_class=3)
    (tmp_path / "a" / "README.txt").write_text("x")
    first, first_messages = _load("train", tmp_path, test_fraction=0.0, image_size=8)
    assert list((tmp_path / ".sslens-cache").glob("imagefolder-train-memory-*.pt"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder, "decode_image", no_decoding)
    second, second_messages = _load("train", tmp_path, test_fraction=0.0, image_size=8)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first_messages == second_messages  # the skipped file is still reported
    # Another image_size, or a changed file, is decoded afresh.
    with pytest.raises(AssertionError, match="decoded again"):
        _load("train", tmp_path, test_fraction=0.0, image_size=4)
    os.utime(tmp_path / "a" / "0.png", ns=(5, 5))
    with pytest.raises(AssertionError, match="decoded again"):
        _load("train", tmp_path, test_fraction=0.0, image_size=8)


def test_read_only_cache_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    _make_folder(tmp_path / "data", ("a",), per_class=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    (tmp_path / "blocker").write_text("a file, so no folder can be created under it")
    _load("train", tmp_path / "data", test_fraction=0.0, cache_dir=tmp_path / "blocker" / "cache")
    assert list((tmp_path / "home-cache" / "sslens" / "imagefolder").glob("*.pt"))


def test_streaming_yields_the_same_batches_as_memory(tmp_path):
    _make_folder(tmp_path, ("a", "b", "c"), per_class=4)
    for name in ("a", "b", "c"):
        (tmp_path / name / "bad.jpg").write_bytes(b"broken")
    memory, memory_messages = _load("train", tmp_path, test_fraction=0.25, image_size=8)
    stream, messages = _load("train", tmp_path, test_fraction=0.25, image_size=8, max_memory_bytes=10)
    assert isinstance(memory, ImageData) and isinstance(stream, StreamingImageData)
    assert messages == memory_messages and "bad.jpg" in messages[0]
    assert len(stream) == len(memory) == 12 - int(messages[0].split()[1])
    assert stream.image_size == memory.image_size == (8, 8)
    assert stream.class_names == memory.class_names and torch.equal(stream.labels, memory.labels)
    assert stream.masks is None and stream.depth is None
    for options in ({"shuffle": False}, {"shuffle": True, "seed": 3, "epoch": 2, "drop_last": True}):
        got = list(stream.iter_batches(4, **options))
        want = list(memory.iter_batches(4, **options))
        assert len(got) == len(want) == stream.num_batches(4, options.get("drop_last", False))
        for (gi, gl), (wi, wl) in zip(got, want, strict=True):
            assert gi.dtype == torch.uint8 and torch.equal(gi, wi) and torch.equal(gl, wl)
    pick = torch.tensor([5, 0, 2])
    assert torch.equal(stream.subset(pick).images[:], memory.subset(pick).images)
    assert torch.equal(stream.images[4], memory.images[4])


def test_streaming_with_worker_processes(tmp_path):
    _make_folder(tmp_path, ("a", "b"), per_class=3)
    memory, _ = _load("train", tmp_path, test_fraction=0.0)
    stream, _ = _load("train", tmp_path, test_fraction=0.0, max_memory_bytes=0)
    stream.num_workers = 1
    (images, labels), = list(stream.iter_batches(6, shuffle=False))
    assert torch.equal(images, memory.images) and torch.equal(labels, memory.labels)


@pytest.mark.parametrize(
    "options",
    [{"image_size": 0}, {"test_fraction": 1.5}, {"seed": -1}, {"num_workers": "4"}, {"max_memory_bytes": 1.5}],
)
def test_bad_options_are_rejected(tmp_path, options):
    _make_folder(tmp_path, ("a",), per_class=1)
    with pytest.raises(ValueError):
        _load("train", tmp_path, **options)
