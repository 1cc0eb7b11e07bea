"""Barlow Twins and VICReg losses: closed forms on hand-built embeddings, and agreement with
lightly's implementations of the same losses on the same inputs (lightly is test-only)."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import BarlowTwinsLoss, VICRegLoss

from sslens.methods.losses import barlow_twins_loss, vicreg_loss, vicreg_terms

#: Four embeddings whose two dimensions have mean 0, (biased) variance 1 and no correlation.
ORTHOGONAL = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def test_barlow_twins_is_zero_at_the_identity_and_four_per_dimension_at_minus_identity():
    # Identical views with C = I: nothing to correct (BatchNorm's eps leaves ~1e-10).
    assert barlow_twins_loss(ORTHOGONAL, ORTHOGONAL).item() == pytest.approx(0.0, abs=1e-8)
    # Opposite views: C = −I, each diagonal term (1 − (−1))² = 4, no off-diagonal.
    assert barlow_twins_loss(ORTHOGONAL, -ORTHOGONAL).item() == pytest.approx(8.0, rel=1e-4)
    # Two copies of one dimension: C = [[1, 1], [1, 1]] → λ · 2 off-diagonal ones.
    twin = ORTHOGONAL[:, :1].repeat(1, 2)
    assert barlow_twins_loss(twin, twin, lambd=0.5).item() == pytest.approx(1.0, rel=1e-4)
    # Standardised per dimension: scaling and shifting a view changes nothing.
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    torch.testing.assert_close(barlow_twins_loss(3 * z1 + 2, z2), barlow_twins_loss(z1, z2), rtol=1e-4, atol=1e-4)


def test_vicreg_terms_on_hand_built_embeddings():
    terms = vicreg_terms(ORTHOGONAL, ORTHOGONAL)
    # Same views: no invariance cost; unbiased std sqrt(4/3) > 1: no variance cost; uncorrelated.
    assert [terms[k].item() for k in ("invariance", "variance", "covariance")] == pytest.approx([0, 0, 0], abs=1e-7)
    constant = torch.ones(5, 3)
    terms = vicreg_terms(constant, constant + 1)
    assert terms["invariance"].item() == pytest.approx(1.0)  # every coordinate differs by 1
    assert terms["variance"].item() == pytest.approx(1 - 1e-2)  # hinge at std sqrt(0 + 1e-4)
    assert terms["covariance"].item() == 0.0
    # Two identical dimensions of variance v: off-diagonal covariances v, twice, over d = 2; both views.
    twin = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]).repeat(1, 2)
    assert vicreg_terms(twin, twin)["covariance"].item() == pytest.approx(2 * (2 * (4 / 3) ** 2 / 2))
    total = vicreg_loss(ORTHOGONAL, -ORTHOGONAL)
    assert total.item() == pytest.approx(25 * 4.0)  # only the invariance: (1 − (−1))² per coordinate


@pytest.mark.parametrize("seed", [0, 1])
def test_barlow_twins_matches_lightly(seed):
    lightly_loss = BarlowTwinsLoss
    generator = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    for lambd in (5e-3, 0.1):
        torch.testing.assert_close(barlow_twins_loss(z1, z2, lambd), lightly_loss(lambda_param=lambd)(z1, z2))


@pytest.mark.parametrize("seed", [0, 1])
def test_vicreg_matches_lightly(seed):
    lightly_loss = VICRegLoss
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(32, 16, generator=generator) * 0.5
    z2 = z1 + 0.3 * torch.randn(32, 16, generator=generator)
    torch.testing.assert_close(vicreg_loss(z1, z2), lightly_loss()(z1, z2))
    weights = {"invariance_weight": 2.0, "variance_weight": 3.0, "covariance_weight": 4.0}
    reference = lightly_loss(lambda_param=2.0, mu_param=3.0, nu_param=4.0)(z1, z2)
    torch.testing.assert_close(vicreg_loss(z1, z2, **weights), reference)


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="two \\(N, D\\) embeddings"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="two \\(N, D\\) embeddings"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 2))
