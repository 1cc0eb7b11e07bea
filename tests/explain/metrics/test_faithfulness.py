import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslens.explain.baselines import make_baseline
from sslens.explain.metrics.faithfulness import deletion_insertion, pixel_ranks, trapezoid_auc

R = 1 / math.sqrt(2)


class QuadrantEncoder(nn.Module):
    """Embedding = [mean of channel 0 over the top-left 2x2 quadrant, mean over the other 12 pixels]."""

    def forward(self, x):
        quadrant = torch.zeros(4, 4, dtype=torch.bool)
        quadrant[:2, :2] = True
        return torch.stack([x[:, 0, quadrant].mean(1), x[:, 0, ~quadrant].mean(1)], dim=1)


def _quadrant_first_map():
    # Strictly decreasing in raster order, with the quadrant lifted above everything else.
    importance = -torch.arange(16, dtype=torch.float32).view(4, 4)
    importance[:2, :2] += 100
    return importance.unsqueeze(0)


def _cos(a, b):
    return (a * 1 + b * 1) / (math.hypot(a, b) * math.sqrt(2))


def test_exact_curves_and_auc_for_a_hand_computable_encoder():
    result = deletion_insertion(QuadrantEncoder(), torch.ones(1, 3, 4, 4), _quadrant_first_map(), steps=4)
    assert result["x"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # Step 1 removes the quadrant ([0, 1]); steps 2-3 thin out the rest ([0, 2/3], [0, 1/3]);
    # step 4 leaves [0, 0], whose cosine similarity is 0.
    deletion = [1.0, R, R, R, 0.0]
    assert result["per_image_curves"]["deletion"][0] == pytest.approx(deletion, abs=1e-6)
    assert result["deletion_auc"] == pytest.approx((1 + 6 * R) / 8, abs=1e-6)
    insertion = [0.0, R, _cos(1, 1 / 3), _cos(1, 2 / 3), 1.0]
    assert result["per_image_curves"]["insertion"][0] == pytest.approx(insertion, abs=1e-6)
    expected = sum(insertion[k] + insertion[k + 1] for k in range(4)) / 8
    assert result["insertion_auc"] == pytest.approx(expected, abs=1e-6)


def test_deleting_the_true_region_beats_random_order():
    result = deletion_insertion(
        QuadrantEncoder(), torch.ones(1, 3, 4, 4), _quadrant_first_map(), steps=4, random_repeats=8
    )
    # Random deletion thins both embedding coordinates alike, so the direction barely moves.
    assert result["deletion_auc"] < result["random_deletion_auc"] - 0.1


def test_curve_endpoints_are_one_and_the_baseline_similarity():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    images, maps = torch.randn(3, 3, 6, 6), torch.rand(3, 6, 6)
    result = deletion_insertion(encoder, images, maps, steps=5, baseline="blur", blur_sigma=1.0)
    blurred = make_baseline("blur", images, blur_sigma=1.0)
    with torch.no_grad():
        expected = F.cosine_similarity(encoder(blurred), encoder(images)).tolist()
    curves = result["per_image_curves"]
    for name in ("deletion", "random_deletion"):
        assert [c[0] for c in curves[name]] == pytest.approx([1.0] * 3, abs=1e-5)
        assert [c[-1] for c in curves[name]] == pytest.approx(expected, abs=1e-5)
    for name in ("insertion", "random_insertion"):
        assert [c[0] for c in curves[name]] == pytest.approx(expected, abs=1e-5)
        assert [c[-1] for c in curves[name]] == pytest.approx([1.0] * 3, abs=1e-5)


def test_ties_follow_raster_order():
    assert pixel_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]
    assert pixel_ranks(torch.tensor([[[1.0, 3.0], [3.0, 2.0]]])).tolist() == [[3, 0, 1, 2]]


def test_trapezoid_auc_of_a_line():
    assert trapezoid_auc(torch.linspace(0, 1, 11)).item() == pytest.approx(0.5)


def test_batching_and_seeding_do_not_change_results():
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    images, maps = torch.randn(2, 3, 5, 5), torch.rand(2, 5, 5)
    big = deletion_insertion(encoder, images, maps, steps=3, random_repeats=2, seed=7)
    small = deletion_insertion(encoder, images, maps, steps=3, random_repeats=2, seed=7, batch_size=1)
    for name, curves in big["per_image_curves"].items():
        assert torch.allclose(torch.tensor(curves), torch.tensor(small["per_image_curves"][name]), atol=1e-6)
    other = deletion_insertion(encoder, images, maps, steps=3, random_repeats=2, seed=8)
    assert other["random_deletion_auc"] != big["random_deletion_auc"]
    assert other["deletion_auc"] == big["deletion_auc"]


def test_encoder_mode_is_restored():
    encoder = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten()).train()
    deletion_insertion(encoder, torch.randn(2, 3, 5, 5), torch.rand(2, 5, 5), steps=2)
    assert all(module.training for module in encoder.modules())


def test_bad_arguments_raise_with_a_hint():
    images = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="Upsample"):
        deletion_insertion(QuadrantEncoder(), images, torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        deletion_insertion(QuadrantEncoder(), images, torch.rand(1, 4, 4), steps=0)
    with pytest.raises(ValueError, match="Did you mean 'blur'"):
        deletion_insertion(QuadrantEncoder(), images, torch.rand(1, 4, 4), baseline="blurr")
