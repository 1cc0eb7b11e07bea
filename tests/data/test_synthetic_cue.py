"""The synthetic world's planted cue: a per-image code stamped over the scene and nothing else."""

import pytest
import torch

from sslens.data import load_dataset
from sslens.data.synthetic import CUE_PALETTES, CUE_POSITIONS, cue_generator

OPTIONS = {"image_size": 32, "num_images": 200, "seed": 5}


@pytest.fixture(scope="module")
def pair():
    """The same 200 images with and without the cue."""
    return load_dataset("synthetic", "train", **OPTIONS), load_dataset("synthetic", "train", cue=True, **OPTIONS)


def test_only_the_marker_pixels_change(pair):
    plain, marked = pair
    cue = marked.extras["cue_mask"]
    assert cue.dtype == torch.bool and cue.shape == (200, 32, 32)
    assert torch.equal(marked.images[~cue], plain.images[~cue])
    for name in ("labels", "masks", "depth"):
        assert torch.equal(getattr(marked, name), getattr(plain, name)), name
    for key, value in plain.extras.items():
        assert torch.equal(marked.extras[key], value), key
    assert "cue_mask" not in plain.extras


def test_cue_mask_is_exactly_the_stamped_square(pair):
    _, marked = pair
    cue, position, pattern = marked.extras["cue_mask"], marked.extras["cue_position"], marked.extras["cue_pattern"]
    assert pattern.shape == (200, 4, 4) and position.shape == (200, 2)
    for i in range(len(marked)):
        top, left = position[i].tolist()
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[top : top + 8, left : left + 8] = True
        assert torch.equal(cue[i], expected), f"image {i}"
        # Each 2 x 2 cell holds its code's colour: white where the pattern says 1, else black.
        cells = marked.images[i, top : top + 8, left : left + 8]
        code = torch.tensor(CUE_PALETTES["binary"], dtype=torch.uint8)[pattern[i]]
        assert torch.equal(cells, code.repeat_interleave(2, 0).repeat_interleave(2, 1)), f"image {i}"


def test_every_image_has_its_own_pattern_and_place(pair):
    _, marked = pair
    codes = marked.extras["cue_pattern"].flatten(1)
    # 16 fair bits: among 200 images a repeated code is rare (about 0.3 expected pairs).
    assert len(torch.unique(codes, dim=0)) >= 198
    assert 0.4 < codes.float().mean() < 0.6
    assert len(torch.unique(marked.extras["cue_position"], dim=0)) > 100


def test_cue_depends_only_on_seed_split_and_index(pair):
    _, marked = pair
    again = load_dataset("synthetic", "train", cue=True, **OPTIONS)
    assert torch.equal(again.images, marked.images)
    fewer = load_dataset("synthetic", "train", cue=True, **{**OPTIONS, "num_images": 50})
    assert torch.equal(fewer.extras["cue_pattern"], marked.extras["cue_pattern"][:50])
    assert torch.equal(fewer.extras["cue_position"], marked.extras["cue_position"][:50])
    other_seed = load_dataset("synthetic", "train", cue=True, **{**OPTIONS, "seed": 6})
    test_split = load_dataset("synthetic", "test", cue=True, **OPTIONS)
    for other in (other_seed, test_split):
        assert not torch.equal(other.extras["cue_pattern"], marked.extras["cue_pattern"])
    # Image i's code comes from its own stream: the first draw of cue_generator(seed, split, i).
    first = torch.randint(2, (4, 4), generator=cue_generator(5, "train", 7))
    assert torch.equal(marked.extras["cue_pattern"][7], first)


@pytest.mark.parametrize("position", CUE_POSITIONS)
@pytest.mark.parametrize(("cells", "cell_size", "image_size"), [(4, 2, 32), (3, 5, 16), (2, 8, 16), (4, 3, 48)])
def test_marker_stays_inside_the_image(position, cells, cell_size, image_size):
    data = load_dataset(
        "synthetic", "test", image_size=image_size, num_images=64, cue=True, cue_cells=cells,
        cue_cell_size=cell_size, cue_position=position,
    )
    side = cells * cell_size
    cue, where = data.extras["cue_mask"], data.extras["cue_position"]
    assert (cue.flatten(1).sum(1) == side * side).all()
    assert where.min() >= 0 and where.max() <= image_size - side
    span = image_size - side
    named = {
        "center": (span // 2, span // 2), "top-left": (0, 0), "top-right": (0, span),
        "bottom-left": (span, 0), "bottom-right": (span, span),
    }
    if position in named:
        assert (where == torch.tensor(named[position])).all()
    else:
        # Uniform over every place: over 64 images both ends of the range come close.
        assert where.min() <= span // 4 and where.max() >= span - span // 4


def test_cube_palette_uses_the_corners_of_the_rgb_cube():
    data = load_dataset("synthetic", "test", num_images=50, cue=True, cue_palette="cube", cue_cells=2, cue_cell_size=4)
    colours = data.images[data.extras["cue_mask"]]
    allowed = torch.tensor(CUE_PALETTES["cube"], dtype=torch.uint8)
    assert (colours[:, None] == allowed[None]).all(-1).any(-1).all()
    assert data.extras["cue_pattern"].max() < 8 and len(torch.unique(data.extras["cue_pattern"])) == 8


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cue": 1}, TypeError, "cue must be True or False"),
        ({"cue": True, "cue_cells": 1}, ValueError, "cue_cells must be >= 2"),
        ({"cue": True, "cue_cells": 4.0}, TypeError, "cue_cells must be an int"),
        ({"cue": True, "cue_cell_size": 0}, ValueError, "cue_cell_size must be >= 1"),
        ({"cue": True, "cue_position": "top_left"}, ValueError, "cue_position must be one of .* Did you mean"),
        ({"cue": True, "cue_palette": "rgb"}, ValueError, "cue_palette must be one of"),
        ({"cue": True, "cue_cells": 8, "cue_cell_size": 5}, ValueError, "40 px wide, larger than the 32-px"),
        # Checked also with the cue off, so a typo does not wait for cue=True to surface.
        ({"cue_position": "middle"}, ValueError, "cue_position"),
    ],
)
def test_bad_cue_options_are_rejected(options, error, match):
    with pytest.raises(error, match=match):
        load_dataset("synthetic", "train", num_images=4, **options)


def test_source_names_the_cue(pair):
    plain, marked = pair
    assert "cue" not in plain.source
    assert "cue=4x4 binary cells of 2 px at random" in marked.source
