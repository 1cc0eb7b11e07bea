"""The one image loader: training data and explained images get the same pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from sslens.data import load_dataset, normalize, to_float
from sslens.data.images import load_image_tensor, load_rgb, to_rgb

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _folder_and_file(tmp_path, image: Image.Image):
    (tmp_path / "data" / "a").mkdir(parents=True)
    # PNG holds 8- and 16-bit samples; 32-bit integer and float images need TIFF.
    path = tmp_path / "data" / "a" / ("x.tif" if image.mode in ("I", "F") else "x.png")
    image.save(path)
    return tmp_path / "data", path


@pytest.mark.parametrize(
    "make",
    [
        # A dark 16-bit scan read as 32-bit integers (every value below 256): the folder loader
        # used to read it as 8-bit, 257x too bright, while explain min-max scaled it.
        lambda: Image.fromarray((np.arange(30 * 20).reshape(20, 30) % 200).astype(np.int32), mode="I"),
        lambda: Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 97 % 65536).astype(np.uint16)),
        lambda: Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 97 % 65536).astype(np.int32), mode="I"),
        lambda: Image.fromarray(np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(20, 30), mode="F"),
        lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA"),
    ],
    ids=["16-bit dark", "16-bit", "32-bit int", "float", "rgba"],
)
def test_training_data_and_explained_images_get_the_same_tensor(tmp_path, make):
    """An image folder at image_size 12 and ``sslens explain`` of a model trained on it (12 px,
    crop_pct 1, the training interpolation) prepare the same file to the same tensor."""
    image = make()
    root, path = _folder_and_file(tmp_path, image)
    assert Image.open(path).mode == image.mode
    data = load_dataset("imagefolder", "train", data_dir=root, image_size=12, test_fraction=0.0, mean=MEAN, std=STD)
    trained_on = normalize(to_float(data.images), MEAN, STD)[0]
    explained, record = load_image_tensor(path, (12, 12), MEAN, STD)
    assert record["resample"] == "bilinear"
    torch.testing.assert_close(explained, trained_on, rtol=0, atol=1e-6)


def test_sixteen_bit_values_are_scaled_by_the_format_not_the_image():
    dark = Image.fromarray(np.array([[0, 255], [65535, 32896]], dtype=np.uint16))
    rgb, how = to_rgb(dark)
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 1], [255, 128]] and "255/65535" in how
    floats, _ = to_rgb(Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32), mode="F"))
    assert np.asarray(floats)[..., 0].tolist() == [[0, 128], [255, 255]]


def test_a_trained_model_is_explained_with_the_training_resize(tmp_path, imagenet_style_model):
    from sslens.explain.run import load_encoder
    from sslens.store import load_model, save_model

    imagenet_style_model(tmp_path / "imported")  # records "interpolation": "bicubic"
    _, source = load_encoder(str(tmp_path / "imported"), output="pooled", device=torch.device("cpu"))
    assert source["interpolation"] == "bicubic"
    method, meta = load_model(tmp_path / "imported")
    save_model(tmp_path / "trained", method, {k: v for k, v in meta.items() if k != "interpolation"})
    _, source = load_encoder(str(tmp_path / "trained"), output="pooled", device=torch.device("cpu"))
    assert source["interpolation"] == "bilinear" and source["crop_pct"] == 1.0


def test_an_unreadable_file_is_a_user_error(tmp_path):
    from sslens.errors import UserError

    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="Cannot read .*x.png as an image"):
        load_rgb(tmp_path / "x.png")
