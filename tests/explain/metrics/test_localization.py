import math

import pytest
import torch

from sslens.explain.metrics.localization import (
    LOCALIZATION_METRICS,
    localization_scores,
    pointing_game,
    relevance_mass,
    relevance_rank,
)


def _mask(*pixels, size=4):
    mask = torch.zeros(size, size, dtype=torch.bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


def test_registry_names():
    assert sorted(LOCALIZATION_METRICS) == ["pointing_game", "relevance_mass", "relevance_rank"]


def test_pointing_game_hit_miss_and_raster_tie_break():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 5.0  # peak inside the mask
    maps[1, 3, 3] = 5.0  # peak outside
    maps[2, 0, 3] = maps[2, 2, 0] = 5.0  # tie: (0, 3) comes first in raster order
    masks = torch.stack([_mask((1, 2)), _mask((0, 0)), _mask((2, 0))])
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0, 0.0]
    # A constant map points at the top-left pixel.
    assert pointing_game(torch.ones(1, 4, 4), _mask((0, 0)).unsqueeze(0)).tolist() == [1.0]


def test_pointing_game_tolerance_is_euclidean_pixels():
    maps = torch.zeros(1, 6, 6)
    maps[0, 0, 0] = 1.0
    masks = _mask((3, 4), size=6).unsqueeze(0)  # distance 5 from (0, 0)
    assert pointing_game(maps, masks, tolerance=4.9).item() == 0.0
    assert pointing_game(maps, masks, tolerance=5.0).item() == 1.0


def test_relevance_mass_clamps_negatives():
    maps = torch.tensor([[[3.0, 1.0], [-4.0, 0.0]]])
    masks = torch.tensor([[[True, False], [True, False]]])
    # Positive relevance 3 + 1 = 4, of which 3 inside; the -4 inside is clamped to 0.
    assert relevance_mass(maps, masks).tolist() == [0.75]
    assert math.isnan(relevance_mass(-torch.ones(1, 2, 2), masks).item())


def test_relevance_rank_counts_the_top_k_inside():
    maps = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]]).view(1, 2, 2)
    masks = torch.tensor([[[True, False], [True, False]]])  # K = 2: the top two are (0,0), (0,1)
    assert relevance_rank(maps, masks).tolist() == [0.5]
    # Ties broken in raster order: with a flat map the top-2 are (0,0) and (0,1).
    assert relevance_rank(torch.zeros(1, 2, 2), masks).tolist() == [0.5]
    assert relevance_rank(torch.zeros(1, 2, 2), torch.tensor([[[True, True], [False, False]]])).tolist() == [1.0]


def test_scores_summary_ignores_undefined_values():
    maps = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 0.0]]), -torch.ones(2, 2)])
    masks = torch.tensor([[True, False], [False, False]]).expand(2, 2, 2).clone()
    result = localization_scores(maps, masks, options={"pointing_game": {"tolerance": 0}})
    assert result["relevance_mass"]["mean"] == 1.0
    assert result["relevance_mass"]["undefined"] == 1
    assert result["pointing_game"]["per_image"] == [1.0, 1.0]


def test_bad_inputs_raise_with_a_hint():
    maps = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match="images \\[1\\] are empty"):
        pointing_game(maps, torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]]))
    with pytest.raises(TypeError, match="masks.bool"):
        relevance_mass(maps, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="upsample"):
        relevance_rank(maps, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not run"):
        localization_scores(maps, torch.ones(2, 2, 2, dtype=torch.bool), ("relevance_mass",),
                            options={"pointing_game": {"tolerance": 1}})
