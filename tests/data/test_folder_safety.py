"""Image folders with links and huge requests: read once, never forever (docs/RELIABILITY.md)."""

import os

import numpy as np
import pytest
from PIL import Image

from sslens.data import load_dataset
from sslens.errors import DatasetError


def test_a_link_loop_is_walked_once_and_nothing_is_counted_twice(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")        # a folder inside itself
    os.symlink(tmp_path / "a", tmp_path / "b" / "other-class")  # a class linking to another
    os.symlink(tmp_path / "b" / "0.png", tmp_path / "b" / "again.png")  # one file under two names
    train = load_dataset("imagefolder", "train", data_dir=tmp_path, test_fraction=0.0, num_workers=0)
    assert len(train) == 8 and train.labels.tolist() == [0] * 4 + [1] * 4


def test_a_synthetic_request_larger_than_memory_is_refused_before_rendering():
    with pytest.raises(DatasetError, match="need .* GiB, more than half of this machine's"):
        load_dataset("synthetic", "train", image_size=20000)
