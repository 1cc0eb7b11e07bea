import pytest
import torch

from sslens.data.base import denormalize
from sslens.data.pixels import LUMA_WEIGHTS as LUMINANCE_WEIGHTS
from sslens.explain.metrics.invariance import (
    INVARIANCE_AUGMENTATIONS,
    RETEST,
    binarize_at_mean,
    invariance_augmentation,
    masked_iou,
    rotate,
    saliency_invariance,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n=3, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _luminance(x):
    """Per-pixel brightness of the denormalised image: commutes with flips, invariant to grayscale."""
    weights = torch.tensor(LUMINANCE_WEIGHTS).view(1, 3, 1, 1)
    return (denormalize(x, MEAN, STD) * weights).sum(1)


def test_registry_lists_the_four_augmentations():
    assert sorted(INVARIANCE_AUGMENTATIONS) == ["grayscale", "hflip", "rot15", "vflip"]


def test_content_maps_are_perfectly_invariant_to_flips_and_grayscale():
    result = saliency_invariance(
        _luminance, _images(), ("hflip", "vflip", "grayscale"), mean=MEAN, std=STD
    )
    for name in ("hflip", "vflip", "grayscale"):
        assert result[name]["per_image_iou"] == [1.0, 1.0, 1.0]
        assert result[name]["iou_std"] == 0.0
        assert result[name]["corr_mean"] == pytest.approx(1.0, abs=1e-6)
        assert result[name]["valid_fraction"] == 1.0


def test_fixed_position_blob_gives_hand_computed_hflip_scores():
    # The map ignores the image: columns 0..4 of 8 are on. Flipped back it covers columns 3..7,
    # so the intersection is 2 columns and the union 8: IoU 2/8. On one row the maps are
    # a = [1,1,1,1,1,0,0,0], b = [0,0,0,1,1,1,1,1]: cov = 2/8 - (5/8)^2 = -9/64,
    # var = 5/8 - (5/8)^2 = 15/64, so Pearson = -9/15.
    blob = torch.zeros(8, 8)
    blob[:, :5] = 1.0
    result = saliency_invariance(
        lambda x: blob.expand(x.shape[0], 8, 8), _images(2, 8), ("hflip", "vflip")
    )
    assert result["hflip"]["per_image_iou"] == [0.25, 0.25]
    assert result["hflip"]["corr_mean"] == pytest.approx(-0.6, abs=1e-6)
    # A vertical flip leaves a column blob where it was.
    assert result["vflip"]["iou_mean"] == 1.0


def test_retest_compares_two_maps_of_the_unchanged_images():
    # explain_fn puts columns 0..4 on, the retest columns 3..7 (as above, without any flip):
    # IoU 2/8 and Pearson -9/15 over the whole image; a deterministic retest agrees exactly.
    left, right = torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :5], right[:, 3:] = 1.0, 1.0
    images = _images(2, 8)
    result = saliency_invariance(
        lambda x: left.expand(x.shape[0], 8, 8), images, ("hflip",), retest_fn=lambda x: right.expand(x.shape[0], 8, 8)
    )
    assert list(result) == ["hflip", RETEST]
    assert result[RETEST]["per_image_iou"] == [0.25, 0.25]
    assert result[RETEST]["corr_mean"] == pytest.approx(-0.6, abs=1e-6)
    assert result[RETEST]["valid_fraction"] == 1.0
    same = saliency_invariance(_luminance, _images(), ("vflip",), mean=MEAN, std=STD, retest_fn=_luminance)
    assert same[RETEST]["per_image_iou"] == [1.0, 1.0, 1.0]
    assert RETEST not in saliency_invariance(_luminance, _images(), ("vflip",), mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="retest_fn"):
        saliency_invariance(_luminance, _images(), ("vflip",), retest_fn="seed 1")


def test_binarize_is_strictly_above_the_mean_over_the_valid_region():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    everywhere = torch.ones(2, 2, dtype=torch.bool)
    assert binarize_at_mean(maps, everywhere).tolist() == [[[False, False], [True, True]]]
    # Excluding the 3 moves the mean to 1: only the 2 stays above it; excluded pixels are False.
    valid = torch.tensor([[True, True], [True, False]])
    assert binarize_at_mean(maps, valid).tolist() == [[[False, False], [True, False]]]


def test_iou_of_identical_and_disjoint_masks():
    valid = torch.ones(3, 3, dtype=torch.bool)
    a = torch.zeros(1, 3, 3, dtype=torch.bool)
    a[0, 0] = True
    assert masked_iou(a, a, valid).item() == 1.0
    assert masked_iou(a, ~a, valid).item() == 0.0
    # Two empty masks (two constant maps) agree.
    assert masked_iou(a & False, a & False, valid).item() == 1.0


def test_rotation_by_90_degrees_matches_rot90():
    x = _images(2, 6)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_rotation_valid_region_excludes_corners_and_never_touches_padding():
    transform = invariance_augmentation("rot15", MEAN, STD)
    valid = transform.valid_region(32, 32)
    assert not valid[0, 0] and not valid[0, -1] and not valid[-1, 0] and not valid[-1, -1]
    assert valid[16, 16] and valid[16, 8]
    # The region is exactly where an all-ones map survives the inverse rotation unblended with the
    # zero padding.
    survived = transform.invert_map(torch.ones(1, 32, 32))[0]
    assert torch.equal(valid, survived > 1 - 1e-4)
    # A point symmetry of the rotation: the region is unchanged by a 180° turn.
    assert torch.equal(valid, torch.rot90(valid, 2))
    assert 0.6 < valid.float().mean() < 0.9


def test_rotation_of_a_smooth_content_map_is_nearly_invariant():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    blob = torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.1)
    images = blob.expand(1, 3, 24, 24).clone()
    result = saliency_invariance(lambda x: x.mean(1), images, ("rot15",))
    assert result["rot15"]["iou_mean"] > 0.9
    assert result["rot15"]["corr_mean"] > 0.99


def test_grayscale_image_has_equal_luminance_channels_in_pixel_space():
    gray = invariance_augmentation("grayscale", MEAN, STD).apply(_images())
    pixels = denormalize(gray, MEAN, STD)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)


def test_wrong_map_shape_and_unknown_name_raise_with_a_hint():
    with pytest.raises(ValueError, match="Upsample"):
        saliency_invariance(lambda x: x[:, 0, ::2, ::2], _images(), ("hflip",))
    with pytest.raises(ValueError, match="Did you mean 'hflip'"):
        saliency_invariance(_luminance, _images(), ("hflp",))
    with pytest.raises(TypeError, match="sequence of names"):
        saliency_invariance(_luminance, _images(), "hflip")
