"""Batched augmentations: exact invariants, agreement with torchvision, seeding, recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision.transforms.functional as TF

from sslens.data import normalize, to_float
from sslens.data.augment import (
    VIEW_RECIPES,
    ViewRecipe,
    ViewSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    create_views,
    jitter_with_factors,
    random_gaussian_blur,
    random_grayscale,
    random_horizontal_flip,
    random_resized_crop,
    random_solarize,
    simclr_kernel_size,
)
from sslens.data.augment import _crop_boxes as crop_boxes
from sslens.data.pixels import luma

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 6, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=gen(seed))


def uint8_images(batch: int = 4, size: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen(seed))


# ---------------------------------------------------------------------------------------------
# Geometry


def test_crop_of_whole_image_at_same_size_is_identity():
    x = images()
    out = random_resized_crop(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen())
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_crop_boxes_fit_and_follow_scale_and_ratio():
    x = images(batch=1)
    top, left, h, w = crop_boxes(4000, 40, 60, (0.1, 0.5), (0.5, 2.0), x, gen())
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 60)).all())
    area = h * w / (40 * 60)
    # Rounding the sides to whole pixels moves the area a little beyond the sampled interval.
    assert float(area.min()) >= 0.1 - 0.02 and float(area.max()) <= 0.5 + 0.03
    aspect = w / h
    assert float(aspect.min()) >= 0.5 - 0.1 and float(aspect.max()) <= 2.0 + 0.1
    # Positions spread over the whole valid range, not only the centre.
    assert float(top.min()) == 0 and float((top + h).max()) == 40


def test_crop_falls_back_to_centre_crop_when_no_candidate_fits():
    # A 4x40 strip with ratio forced to 1: every candidate box is taller than 4 px.
    x = images(batch=1)
    top, left, h, w = crop_boxes(5, 4, 40, (0.9, 1.0), (1.0, 1.0), x, gen())
    assert h.tolist() == [4.0] * 5 and w.tolist() == [4.0] * 5
    assert top.tolist() == [0.0] * 5 and left.tolist() == [18.0] * 5


def test_crop_selects_the_box_it_samples():
    # A crop resized to its own pixel size reproduces that box exactly: compare with slicing.
    x = images(batch=64, size=10)
    g = gen(3)
    top, left, h, w = crop_boxes(
        64, 10, 10, (0.3, 0.3), (1.0, 1.0), x, torch.Generator().manual_seed(3)
    )
    out = random_resized_crop(x, 5, scale=(0.3, 0.3), ratio=(1.0, 1.0), generator=g)
    assert h.unique().tolist() == [5.0]  # round(sqrt(30)) == 5
    for i in range(len(x)):
        t, lf = int(top[i]), int(left[i])
        torch.testing.assert_close(out[i], x[i, :, t : t + 5, lf : lf + 5], atol=1e-5, rtol=0)


def test_crop_draws_different_boxes_per_sample():
    _, _, h, w = crop_boxes(16, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), images(batch=1), gen())
    assert len(set(zip(h.tolist(), w.tolist(), strict=True))) > 8


def test_flip_is_exact_and_per_sample():
    x = images(batch=32)
    out = random_horizontal_flip(x, 0.5, generator=gen(4))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    assert 0 < int(flipped.sum()) < 32
    again = random_horizontal_flip(out, 0.5, generator=gen(4))
    assert torch.equal(again, x)  # the same coins flip the same images back
    assert torch.equal(random_horizontal_flip(x, 1.0, generator=gen()).flip(-1), x)
    assert torch.equal(random_horizontal_flip(x, 0.0, generator=gen()), x)


# ---------------------------------------------------------------------------------------------
# Colour


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_adjustments_match_torchvision(ours, theirs):
    x = images(batch=5)
    factors = torch.tensor([0.0, 0.3, 1.0, 1.5, 1.8])
    out = ours(x, factors)
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(5)])
    # torchvision weights red 0.2989 where we use 0.299.
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


def test_hue_matches_torchvision():
    x = images(batch=5)
    shifts = torch.tensor([-0.5, -0.2, 0.0, 0.13, 0.5])
    out = adjust_hue(x, shifts)
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(5)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_hue_shift_of_a_full_turn_and_of_grey_is_identity():
    x = images(batch=2)
    torch.testing.assert_close(adjust_hue(x, torch.tensor([0.0, 1.0])), x, atol=1e-5, rtol=0)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(adjust_hue(grey, torch.tensor([0.3, -0.4])), grey, atol=1e-6, rtol=0)


def test_jitter_with_all_factors_zero_is_identity():
    x = images()
    assert torch.equal(color_jitter(x, 0, 0, 0, 0, p=1.0, generator=gen()), x)


def test_jitter_factors_are_drawn_in_torchvision_ranges_and_per_sample():
    # Brightness only on a constant 0.5 image: out = 0.5 * factor, factor ~ U[0.2, 1.8].
    x = torch.full((400, 3, 2, 2), 0.25)
    out = color_jitter(x, brightness=0.8, p=1.0, generator=gen())
    factor = out[:, 0, 0, 0] / 0.25
    assert float(factor.min()) >= 0.2 and float(factor.max()) <= 1.8
    assert float(factor.min()) < 0.3 and float(factor.max()) > 1.7
    assert len(factor.unique()) > 300


def test_jitter_probability_leaves_the_rest_untouched():
    x = images(batch=200, size=4)
    out = color_jitter(x, 0.8, 0.8, 0.8, 0.2, p=0.3, generator=gen())
    unchanged = (out == x).flatten(1).all(1).float().mean()
    assert abs(float(unchanged) - 0.7) < 0.1


def test_jitter_applies_steps_in_fixed_order():
    x = images(batch=3)
    f = torch.tensor([0.5, 1.2, 1.7])
    expected = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, f), f), f), f - 1)
    out = jitter_with_factors(x, brightness=f, contrast=f, saturation=f, hue=f - 1)
    assert torch.equal(out, expected)


def test_grayscale_uses_luma_weights_and_equal_channels():
    x = images(batch=64)
    out = random_grayscale(x, 0.5, generator=gen())
    is_gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(
        1
    )
    changed = ~(out == x).flatten(1).all(1)
    assert torch.equal(is_gray, changed) and 0 < int(is_gray.sum()) < 64
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(out[is_gray, 0], expected[is_gray], atol=1e-6, rtol=0)
    torch.testing.assert_close(luma(torch.ones(1, 3, 2, 2)), torch.ones(1, 1, 2, 2))


def test_solarize_is_exact():
    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.7, 1.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = random_solarize(x, 0.5, p=1.0, generator=gen())
    expected = torch.tensor([0.0, 0.2, 0.49, 0.5, 1 - 0.7, 0.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    assert torch.equal(out, expected)
    assert torch.equal(random_solarize(x, 0.5, p=0.0, generator=gen()), x)
    torch.testing.assert_close(out, TF.solarize(x, 0.5))


# ---------------------------------------------------------------------------------------------
# Blur


def test_blur_preserves_constant_images_and_mean():
    x = torch.full((4, 3, 9, 9), 0.37)
    out = random_gaussian_blur(x, 5, (0.1, 2.0), p=1.0, generator=gen())
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_blur_matches_torchvision_for_each_samples_sigma():
    x = images(batch=4, size=10)
    out = random_gaussian_blur(x, 5, (0.5, 2.0), p=1.0, generator=gen(7))
    u = torch.rand((4, 2), generator=gen(7))
    sigmas = 0.5 + 1.5 * u[:, 0]
    expected = torch.stack(
        [TF.gaussian_blur(x[i], [5, 5], [float(s)] * 2) for i, s in enumerate(sigmas)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_blur_probability_keeps_unblurred_samples_exact():
    x = images(batch=64, size=8)
    out = random_gaussian_blur(x, 3, p=0.5, generator=gen())
    kept = (out == x).flatten(1).all(1)
    assert 0 < int(kept.sum()) < 64


def test_simclr_kernel_is_ten_percent_and_odd():
    assert [simclr_kernel_size(s) for s in (32, 64, 96, 224)] == [3, 7, 9, 23]


# ---------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "call",
    [
        lambda x, g: random_horizontal_flip(x, 1.5, generator=g),
        lambda x, g: random_resized_crop(x, 8, scale=(0.5, 0.1), generator=g),
        lambda x, g: random_resized_crop(x, 0, generator=g),
        lambda x, g: color_jitter(x, hue=0.7, generator=g),
        lambda x, g: color_jitter(x, brightness=-1, generator=g),
        lambda x, g: random_gaussian_blur(x, 4, generator=g),
        lambda x, g: random_gaussian_blur(x, 31, generator=g),
        lambda x, g: random_solarize(x, threshold=2.0, generator=g),
        lambda x, g: random_grayscale(x.permute(0, 2, 3, 1), 0.5, generator=g),
    ],
)
def test_primitives_reject_bad_arguments(call):
    with pytest.raises(ValueError):
        call(images(), gen())


# ---------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("name", VIEW_RECIPES.names())
def test_every_recipe_is_seeded_shaped_normalised_and_described(name):
    recipe = create_views(name, image_size=16, mean=MEAN, std=STD)
    batch = uint8_images()
    first = recipe(batch, gen(5))
    second = recipe(batch, gen(5))
    assert len(first) == recipe.num_views
    assert [v.shape for v in first] == [(4, 3, s, s) for s in recipe.view_sizes]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    low = normalize(torch.zeros(1, 3, 1, 1), MEAN, STD).view(3)
    high = normalize(torch.ones(1, 3, 1, 1), MEAN, STD).view(3)
    for view in first:
        assert view.dtype == torch.float32
        per_channel = view.transpose(0, 1).flatten(1)
        assert bool((per_channel.amin(1) >= low - 1e-5).all())
        assert bool((per_channel.amax(1) <= high + 1e-5).all())
    description = recipe.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["num_views"] == recipe.num_views


def test_eval_recipe_only_normalises():
    batch = uint8_images()
    (view,) = create_views("eval", image_size=16, mean=MEAN, std=STD)(batch, gen())
    assert torch.equal(view, normalize(to_float(batch), MEAN, STD))


def test_views_differ_between_views_and_samples():
    recipe = create_views("simclr", image_size=16, mean=MEAN, std=STD)
    same = uint8_images()[:1].expand(8, -1, -1, -1).contiguous()
    a, b = recipe(same, gen())
    assert not torch.equal(a, b)
    assert len({tuple(v.flatten().tolist()) for v in a}) == 8  # same image, 8 different views
    assert not torch.equal(recipe(same, gen(1))[0], a)


def test_identical_views_are_batched_without_changing_the_distribution():
    spec = ViewSpec(size=16, crop_scale=(0.08, 1.0), flip_p=0.5, brightness=0.4, jitter_p=0.8)
    recipe = ViewRecipe("t", [spec, spec], MEAN, STD)
    batch = uint8_images()
    views = recipe(batch, gen(9))
    # The two views of one call equal one spec applied to the batch stacked twice.
    stacked = spec(to_float(batch).repeat(2, 1, 1, 1), gen(9))
    expected = normalize(stacked, MEAN, STD).split(4)
    assert all(torch.equal(a, b) for a, b in zip(views, expected, strict=True))


def test_recipe_defaults():
    simclr = create_views("simclr", image_size=32, mean=MEAN, std=STD).describe()["views"][0]
    assert simclr["crop_scale"] == [0.08, 1.0] and simclr["blur_p"] == 0.0
    assert (simclr["brightness"], simclr["hue"], simclr["jitter_p"]) == (0.8, 0.2, 0.8)
    big = create_views("simclr", image_size=96, mean=MEAN, std=STD).describe()["views"][0]
    assert big["blur_p"] == 0.5 and big["blur_kernel_size"] == 9
    moco = create_views("moco-v2", image_size=224, mean=MEAN, std=STD).describe()["views"][0]
    assert moco["crop_scale"] == [0.2, 1.0] and (moco["brightness"], moco["hue"]) == (0.4, 0.1)
    assert moco["blur_p"] == 0.5 and moco["blur_kernel_size"] == 23
    ref = create_views("reference-cifar", image_size=32, mean=MEAN, std=STD).describe()["views"][0]
    assert ref["blur_kernel_size"] == 3 and ref["blur_p"] == 0.5 and ref["grayscale_p"] == 0.0
    swav = create_views("swav", image_size=224, mean=MEAN, std=STD)
    assert swav.view_sizes == [224, 224] + [96] * 6
    assert swav.describe()["views"][2]["crop_scale"] == [0.05, 0.14]
    small = create_views("swav", image_size=16, mean=MEAN, std=STD, num_local=0)
    assert small.view_sizes == [16, 16]
    assert create_views("swav", image_size=16, mean=MEAN, std=STD).view_sizes[2:] == [8] * 6


def test_overrides_are_applied_and_validated():
    recipe = create_views(
        "simclr", image_size=32, mean=MEAN, std=STD, blur_p=0.3, crop_scale=[0.5, 1]
    )
    spec = recipe.describe()["views"][0]
    assert spec["blur_p"] == 0.3 and spec["crop_scale"] == [0.5, 1.0]
    with pytest.raises(ValueError, match="Valid: .*crop_scale"):
        create_views("simclr", image_size=32, mean=MEAN, std=STD, blurr_p=0.3)
    with pytest.raises(ValueError, match="probability"):
        create_views("simclr", image_size=32, mean=MEAN, std=STD, flip_p=2)
    with pytest.raises(ValueError, match="ordered pair"):
        create_views("moco-v2", image_size=32, mean=MEAN, std=STD, crop_scale=(0.9, 0.2))
    with pytest.raises(ValueError, match="image_size"):
        create_views("simclr", image_size=0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="std"):
        create_views("eval", image_size=8, mean=MEAN, std=(1, 0, 1))
    with pytest.raises(ValueError, match="num_local"):
        create_views("swav", image_size=32, mean=MEAN, std=STD, num_local=-1)
    with pytest.raises(ValueError, match="Did you mean 'simclr'"):
        create_views("simclrr", image_size=32, mean=MEAN, std=STD)


def test_recipe_rejects_float_or_channels_first_input_and_wrong_generator_device():
    recipe = create_views("simclr", image_size=16, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="uint8"):
        recipe(uint8_images().float(), gen())
    with pytest.raises(ValueError, match="uint8"):
        recipe(uint8_images().permute(0, 3, 1, 2), gen())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            recipe(uint8_images().cuda(), gen())


def test_recipe_probabilities_show_in_outputs():
    # With only grayscale at p=0.2, about a fifth of the views have equal channels.
    spec = ViewSpec(size=8, crop_scale=None, grayscale_p=0.2)
    x = to_float(uint8_images(batch=500, size=8))
    out = spec(x, gen())
    gray = (out[:, 0] == out[:, 2]).flatten(1).all(1).float().mean()
    assert math.isclose(float(gray), 0.2, abs_tol=0.06)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", VIEW_RECIPES.names())
def test_recipe_on_cuda_is_seeded_and_never_syncs(name):
    recipe = create_views(
        name, image_size=32, mean=MEAN, std=STD, **({"blur_p": 0.5} if name != "eval" else {})
    )
    batch = uint8_images(batch=64, size=32).cuda()
    recipe(batch, torch.Generator(device="cuda").manual_seed(0))  # fills the constant cache
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = recipe(batch, torch.Generator(device="cuda").manual_seed(3))
        second = recipe(batch, torch.Generator(device="cuda").manual_seed(3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert [v.shape[-1] for v in first] == recipe.view_sizes
