"""Display helpers: exact normalisation edge cases, overlays and the saved figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslens.data.base import normalize
from sslens.explain.display import normalize_map, overlay, save_explanation_png, to_display_image


def test_minmax_exact_and_per_map():
    maps = np.array([[[1.0, 3.0], [5.0, 9.0]], [[-2.0, -2.0], [0.0, 2.0]]])
    expected = np.array([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.5, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(normalize_map(maps, "minmax"), expected)
    np.testing.assert_array_equal(normalize_map(torch.from_numpy(maps), "minmax"), expected)


@pytest.mark.parametrize("mode", ["minmax", "percentile", "zscore"])
def test_flat_map_becomes_zeros(mode):
    with np.errstate(all="raise"):  # a hidden 0/0 would raise here
        result = normalize_map(np.full((2, 4, 4), 3.5), mode)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, np.zeros((2, 4, 4), dtype=np.float32))


def test_percentile_clips_outliers():
    values = np.arange(100, dtype=np.float64).reshape(10, 10)
    values[0, 0] = -1e6
    values[9, 9] = 1e6
    result = normalize_map(values, "percentile", percentiles=(1.0, 99.0))
    low, high = np.percentile(values, [1.0, 99.0])
    assert result[0, 0] == 0.0 and result[9, 9] == 1.0
    assert result[5, 0] == pytest.approx((50 - low) / (high - low), abs=1e-6)


def test_zscore_exact():
    result = normalize_map(np.array([[1.0, 3.0]]), "zscore")
    np.testing.assert_array_equal(result, np.array([[-1.0, 1.0]], dtype=np.float32))


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="Choose one of"):
        normalize_map(np.zeros((2, 2)), "max")
    with pytest.raises(ValueError, match="NaN"):
        normalize_map(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="low < high"):
        normalize_map(np.zeros((2, 2)), "percentile", percentiles=(50, 50))


def test_to_display_image_inverts_normalisation():
    pixels = torch.randint(0, 256, (2, 3, 5, 4), generator=torch.Generator().manual_seed(0))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    result = to_display_image(normalize(pixels.float() / 255, mean, std), mean, std)
    assert result.dtype == np.uint8 and result.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(result, pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8))


def test_overlay_blends_and_alpha_zero_keeps_image():
    image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 42).reshape(6, 7)
    unchanged = overlay(image, heat, alpha=0.0)
    assert unchanged.dtype == np.uint8 and unchanged.shape == (6, 7, 3)
    np.testing.assert_array_equal(unchanged, image)
    # With alpha 1 and the grey colour map, heat 0 is black and heat 1 is white.
    full = overlay(image, heat, cmap="gray", alpha=1.0)
    assert full[0, 0].tolist() == [0, 0, 0] and full[-1, -1].tolist() == [255, 255, 255]
    half = overlay(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1)), cmap="gray", alpha=0.5)
    assert half[0, 0].tolist() == [128, 128, 128]


def test_overlay_rejects_unnormalised_heat():
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="normalize_map"):
        overlay(image, np.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="heat must be"):
        overlay(image, np.zeros((3, 2)))


def test_save_explanation_png_writes_a_decodable_figure(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    maps = {"importance": np.random.default_rng(2).random((16, 16)) * 0.01, "uncertainty": np.zeros((16, 16))}
    path = save_explanation_png(tmp_path / "sub" / "x.png", image, maps, title="gradcam on x")
    with Image.open(path) as written:
        written.load()
        assert written.format == "PNG"
        width, height = written.size
    assert width > 600 and height > 400
    with pytest.raises(ValueError, match="shape"):
        save_explanation_png(tmp_path / "bad.png", image, {"importance": np.zeros((8, 8))})
    # A z-scored map is unbounded, so it cannot colour an overlay: refused up front, by name.
    with pytest.raises(ValueError, match="'minmax' or 'percentile'"):
        save_explanation_png(tmp_path / "z.png", image, maps, normalization="zscore")
    assert not (tmp_path / "z.png").exists()
