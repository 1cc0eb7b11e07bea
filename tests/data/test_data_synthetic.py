"""The synthetic shapes world: determinism, exact masks, depth order, balance, shapes in bounds."""

import math

import pytest
import torch

from sslens.data import ImageData, load_dataset
from sslens.data.synthetic import (
    CLASS_NAMES,
    MIN_OBJECT_CONTRAST,
    SHAPES,
    render,
    sample_params,
    split_generator,
)


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic", "train", image_size=32, num_images=400, seed=3, distractors=3)


def test_same_options_give_bitwise_identical_data(small):
    again = load_dataset("synthetic", "train", image_size=32, num_images=400, seed=3, distractors=3)
    assert torch.equal(small.images, again.images)
    assert torch.equal(small.labels, again.labels)
    assert torch.equal(small.masks, again.masks)
    assert torch.equal(small.depth, again.depth)


def test_other_seed_and_other_split_differ(small):
    other_seed = load_dataset("synthetic", "train", image_size=32, num_images=400, seed=4, distractors=3)
    test_split = load_dataset("synthetic", "test", image_size=32, num_images=400, seed=3, distractors=3)
    assert not torch.equal(small.images, other_seed.images)
    assert not torch.equal(small.images, test_split.images)
    # No test image is a copy of a train image.
    train_flat = small.images.flatten(1)
    assert not (test_split.images.flatten(1)[:, None] == train_flat[None]).all(-1).any()


def test_split_streams_do_not_alias_across_seeds():
    draw = lambda seed, split: torch.rand(8, generator=split_generator(seed, split))  # noqa: E731
    assert not torch.equal(draw(0, "test"), draw(1, "train"))
    assert not torch.equal(draw(0, "train"), draw(0, "test"))


def test_mask_is_exactly_the_pixels_the_object_changes(small):
    params = sample_params(400, split_generator(3, "train"), distractors=3)
    without, empty_mask, _ = render(params, 32, draw_object=False)
    assert not empty_mask.any()
    mask = small.masks
    # Outside the mask the object changed nothing...
    assert torch.equal(small.images[~mask], without[~mask])
    # ...and inside it every pixel holds one of the object's two colours.
    colors = small.extras["object_colors"]  # (N, 2, 3)
    for i in range(len(small)):
        pixels = small.images[i][mask[i]]
        is_color = (pixels[:, None] == colors[i][None]).all(-1).any(-1)
        assert is_color.all(), f"image {i}"
    # The object is visible everywhere: its colours differ from every background pixel.
    assert (small.images != without)[mask].any(-1).float().mean() > 0.9


def test_object_colours_keep_their_distance_from_the_background(small):
    obj = small.extras["object_colors"].float() / 255
    bg = small.extras["background_colors"].float() / 255
    a, b = bg[:, 0], bg[:, 1]
    for shade in range(2):
        p = obj[:, shade]
        t = ((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp_min(1e-12)
        closest = a + t.clamp(0, 1)[:, None] * (b - a)
        assert (p - closest).norm(dim=-1).min() >= MIN_OBJECT_CONTRAST - 1e-6


def test_depth_orders_object_over_distractors_over_background(small):
    params = sample_params(400, split_generator(3, "train"), distractors=3)
    depth, mask = small.depth, small.masks
    assert depth.dtype == torch.float32 and 0 <= depth.min() and depth.max() <= 1
    background = torch.linspace(0.5 / 32, 31.5 / 32, 32)[:, None].expand(32, 32) * 0.3
    is_background = (depth - background).abs() < 1e-6
    is_distractor = ~mask & ~is_background
    assert depth[mask].min() >= 0.9
    assert depth[is_distractor].min() > 0.4 and depth[is_distractor].max() < 0.9
    assert depth[is_background].max() <= 0.3
    # Distractors appear only where some were drawn; the object depth grows with its size.
    assert is_distractor.any() and not is_distractor[params.distractor_active.sum(1) == 0].any()
    object_depth = torch.stack([depth[i][mask[i]].max() for i in range(len(small))])
    order = params.size.argsort()
    assert (object_depth[order].diff() >= -1e-6).all()


def test_no_distractors_means_only_object_and_background():
    data = load_dataset("synthetic", "test", image_size=32, num_images=50, distractors=0)
    assert set(data.depth[~data.masks].unique().tolist()) <= set(
        (torch.linspace(0.5 / 32, 31.5 / 32, 32) * 0.3).tolist()
    )
    assert (data.extras["num_distractors"] == 0).all()


def test_labels_are_balanced_and_cover_every_class():
    data = load_dataset("synthetic", "train", image_size=16, num_images=1600, distractors=0)
    counts = torch.bincount(data.labels, minlength=len(CLASS_NAMES))
    assert data.class_names == list(CLASS_NAMES) and len(CLASS_NAMES) >= 6
    assert counts.min() >= 0.7 * 1600 / len(CLASS_NAMES)
    # Every image shows its object (at least 4 % of the pixels at the smallest size).
    assert data.masks.float().mean((1, 2)).min() > 0.04


@pytest.mark.parametrize("size", [32, 64, 20])
def test_sizes_and_object_fully_inside(size):
    data = load_dataset("synthetic", "train", image_size=size, num_images=60)
    assert isinstance(data, ImageData)
    assert data.images.shape == (60, size, size, 3) and data.masks.shape == (60, size, size)
    assert data.depth.shape == (60, size, size)
    # Object size/centre in extras agree with the mask's extent.
    rows = data.masks.any(2).float()
    span = (rows.shape[1] - rows.flip(1).argmax(1) - rows.argmax(1)).float() / size
    assert (span <= data.extras["size"] + 2 / size).all()
    center = data.extras["center"]
    radius = data.extras["size"][:, None] / 2
    assert ((center - radius) >= -1e-6).all() and ((center + radius) <= 1 + 1e-6).all()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_fits_the_unit_disc_and_is_substantial(name):
    coords = torch.linspace(-1.5, 1.5, 601)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    inside = SHAPES[name](x[None], y[None])[0]
    assert not inside[x * x + y * y > 1.0 + 1e-3].any()
    area = inside.float().mean() * 9
    assert area > 0.2 * math.pi


def test_shapes_are_distinguishable_at_32_px():
    """No two classes render to nearly the same mask for the same pose."""
    n = len(CLASS_NAMES)
    params = sample_params(n, torch.Generator().manual_seed(0), distractors=0)
    params = params.replace(
        label=torch.arange(n),
        center=torch.full((n, 2), 0.5),
        size=torch.full((n,), 0.6),
        angle=torch.zeros(n),
    )
    _, masks, _ = render(params, 32)
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None] - inter
    iou = inter / union
    assert (iou - torch.eye(n)).max() < 0.85


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"image_size": 8}, ValueError),
        ({"image_size": 32.0}, TypeError),
        ({"num_images": 0}, ValueError),
        ({"distractors": -1}, ValueError),
        ({"seed": True}, TypeError),
    ],
)
def test_bad_options_are_rejected(options, error):
    with pytest.raises(error):
        load_dataset("synthetic", "train", **options)


def test_imagedata_validation():
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageData(images.float(), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="labels"):
        ImageData(images, torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="masks"):
        ImageData(images, torch.zeros(2, dtype=torch.int64), ["a"], masks=torch.zeros(2, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        ImageData(images[:0], torch.zeros(0, dtype=torch.int64), ["a"])
