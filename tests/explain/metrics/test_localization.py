
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


def test_pointing_game_hit_miss_and_random_tie_break():
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 5.0  # peak inside the mask
    maps[1, 3, 3] = 5.0  # peak outside
    masks = torch.stack([_mask((1, 2)), _mask((0, 0))])
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    # A constant map points at a seeded random pixel: over many images it hits as often as the
    # object's area (4 of 16 pixels), the chance level, not always (the top-left pixel was).
    constant, object_in_corner = torch.ones(2000, 4, 4), _mask((0, 0), (0, 1), (1, 0), (1, 1)).expand(2000, 4, 4)
    hits = pointing_game(constant, object_in_corner.clone(), seed=1)
    assert abs(hits.mean().item() - 0.25) < 0.03
    assert torch.equal(hits, pointing_game(constant, object_in_corner.clone(), seed=1))


def test_pointing_game_tolerance_is_euclidean_pixels():
    maps = torch.zeros(1, 6, 6)
    maps[0, 0, 0] = 1.0
    masks = _mask((3, 4), size=6).unsqueeze(0)  # distance 5 from (0, 0)
    assert pointing_game(maps, masks, tolerance=4.9).item() == 0.0
    assert pointing_game(maps, masks, tolerance=5.0).item() == 1.0


def test_relevance_mass_is_offset_free():
    maps = torch.tensor([[[3.0, 1.0], [-4.0, 0.0]]])  # mean 0: offset-free relevance 3, 1, 0, 0
    masks = torch.tensor([[[True, False], [True, False]]])
    assert relevance_mass(maps, masks).tolist() == [0.75]
    # A constant map (RELAX's ≈ 0.93 everywhere, say) scores 0, however large its level.
    assert relevance_mass(torch.full((1, 2, 2), 0.93), masks).tolist() == [0.0]
    # A perfect map (1 on the object, 0 elsewhere) scores 1, and adding a level changes nothing.
    perfect = masks.float()
    assert relevance_mass(perfect, masks).tolist() == [1.0]
    assert relevance_mass(perfect + 0.9, masks).tolist() == pytest.approx([1.0])
    # A random map scores about the object's area.
    random = torch.rand(4000, 2, 2, generator=torch.Generator().manual_seed(0))
    assert abs(relevance_mass(random, masks.expand(4000, 2, 2).clone()).mean().item() - 0.5) < 0.02


def test_relevance_rank_counts_the_top_k_inside():
    maps = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]]).view(1, 2, 2)
    masks = torch.tensor([[[True, False], [True, False]]])  # K = 2: the top two are (0,0), (0,1)
    assert relevance_rank(maps, masks).tolist() == [0.5]
    # Ties are broken at random: a flat map scores the object's share of pixels on average.
    flat = relevance_rank(torch.zeros(2000, 2, 2), masks.expand(2000, 2, 2).clone())
    assert abs(flat.mean().item() - 0.5) < 0.03


def test_scores_summary_has_intervals():
    maps = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])])
    masks = torch.tensor([[True, False], [False, False]]).expand(2, 2, 2).clone()
    result = localization_scores(maps, masks, options={"pointing_game": {"tolerance": 0}})
    assert result["relevance_mass"]["per_image"] == [1.0, 0.0] and result["relevance_mass"]["undefined"] == 0
    assert result["pointing_game"]["per_image"] == [1.0, 0.0]
    pointing = result["pointing_game"]["interval"]
    assert pointing["method"] == "wilson" and pointing["n"] == 2 and pointing["ci_low"] < 0.5 < pointing["ci_high"]
    assert result["relevance_mass"]["interval"]["method"] == "bootstrap"


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
