"""RELAX: exact agreement with relax-xai, seeding, batching, masks, adaptive stopping, state."""

from __future__ import annotations

import pytest
import relax_xai.relax
import torch
from relax_xai.masking_functions import mask_generator
from torch import nn

from sslens.explain.base import EXPLAINERS
from sslens.explain.masks import MASK_SAMPLERS, PerceptualMasks, RelaxMasks, rise_shift
from sslens.explain.relax import INITIAL_WEIGHT, RELAX, RelaxEstimator, u_relax

SIZE = 12


def tiny_encoder(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).to(dtype)


def images(n: int = 1, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_relax_is_registered():
    assert EXPLAINERS.get("relax") is RELAX
    assert MASK_SAMPLERS.get("relax") is RelaxMasks


def test_masks_equal_relax_xai_masks_for_the_same_seed():
    torch.manual_seed(3)
    reference = next(mask_generator(6, (16, 20), "cpu"))
    ours = RelaxMasks()(6, (16, 20), torch.Generator().manual_seed(3))
    assert torch.equal(ours, reference)


def test_matches_relax_xai_exactly_on_the_same_masks(monkeypatch):
    encoder = tiny_encoder(torch.float64).eval()
    x = images(1, torch.float64)
    masks = RelaxMasks()(40, (SIZE, SIZE), torch.Generator().manual_seed(5), torch.float64)
    batches = iter(masks.split(8))
    monkeypatch.setattr(relax_xai.relax, "mask_generator", lambda *args, **kwargs: iter([next(batches)]))
    reference = relax_xai.relax.RELAX(x, encoder, batch_size=8, num_batches=5)
    for name in ("importance", "uncertainty", "sum_of_weights"):
        setattr(reference, name, getattr(reference, name).double())
    with torch.no_grad():
        reference.forward()

    # Different batching on purpose: forward passes of 7, rounds of 16 masks.
    out = RELAX(encoder, batch_size=7, round_size=16)(x, masks=masks)
    sum_of_weights = INITIAL_WEIGHT + masks.sum(dim=0)[0]
    torch.testing.assert_close(out.importance[0].double(), reference.importance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.uncertainty[0].double() * sum_of_weights, reference.uncertainty, rtol=1e-6, atol=1e-9)
    # relax-xai's U-RELAX thresholds its unnormalised sum; ours thresholds the variance (documented).
    their_u_relax = u_relax(out.importance.double(), reference.uncertainty[None])[0]
    torch.testing.assert_close(their_u_relax, reference.u_relax.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.components["u_relax"], u_relax(out.importance, out.uncertainty))
    assert out.info["num_masks_used"] == [40]


def test_estimator_is_stable_against_cancellation():
    # Similarities near 1 with a tiny spread: the naive Σ w s² − W R² loses everything in fp32.
    g = torch.Generator().manual_seed(0)
    masks = RelaxMasks()(1000, (8, 8), g, torch.float64)
    s = 0.999 + 1e-4 * torch.randn(1, 1000, generator=g, dtype=torch.float64)
    estimator = RelaxEstimator(1, (8, 8), torch.float32, torch.device("cpu"))
    for chunk, scores in zip(masks.split(128), s.split(128, dim=1), strict=True):
        estimator.update(scores.float(), chunk.float())
    w = masks[:, 0]
    total = INITIAL_WEIGHT + w.sum(0)
    mean = (s[0, :, None, None] * w).sum(0) / total
    variance = ((s[0, :, None, None] - mean) ** 2 * w).sum(0) / total
    torch.testing.assert_close(estimator.importance[0].double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(estimator.uncertainty[0].double(), variance, rtol=1e-3, atol=0)


def test_same_seed_same_maps_other_seed_other_maps():
    encoder, x = tiny_encoder(), images(2)
    a = RELAX(encoder, num_masks=60, seed=4)(x)
    b = RELAX(encoder, num_masks=60, seed=4)(x)
    c = RELAX(encoder, num_masks=60, seed=5)(x)
    assert torch.equal(a.importance, b.importance) and torch.equal(a.uncertainty, b.uncertainty)
    assert not torch.allclose(a.importance, c.importance)
    assert a.info["seed"] == 4 and a.info["masks"] == "relax" and a.info["baseline"] == "zero"


def test_batch_equals_one_by_one():
    encoder, x = tiny_encoder(), images(3)
    explainer = RELAX(encoder, num_masks=50, batch_size=32, round_size=20)
    together = explainer(x)
    for i in range(3):
        alone = explainer(x[i : i + 1])
        torch.testing.assert_close(together.importance[i], alone.importance[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(together.uncertainty[i], alone.uncertainty[0], rtol=0, atol=1e-6)
    assert together.info["num_masks_used"] == [50, 50, 50]


@pytest.mark.parametrize("shift", ["relax", "rise"])
def test_relax_mask_distribution(shift):
    masks = RelaxMasks(p=0.3, shift=shift)(3000, (14, 10), torch.Generator().manual_seed(0))
    assert masks.shape == (3000, 1, 14, 10)
    assert masks.min() >= 0 and masks.max() <= 1
    # Bilinear interpolation of Bernoulli(p) cells has mean p at every pixel.
    assert abs(masks.mean().item() - 0.3) < 0.01
    assert (masks.mean(dim=0) - 0.3).abs().max() < 0.05


def test_rise_shift_moves_by_up_to_one_cell():
    # A 2 × 2 grid upsampled to 3 × 3 cells of 4 px: every crop is one of the 4 × 4 possible
    # indents (0..cell_size − 1 on each axis), and all of them occur.
    g = torch.Generator().manual_seed(0)
    sampler = RelaxMasks(num_cells=2, p=1.0, shift="rise")
    torch.testing.assert_close(sampler(5, (8, 8), g), torch.ones(5, 1, 8, 8))
    grid = torch.zeros(200, 1, 2, 2)
    grid[:, :, 0, 0] = 1
    masks = rise_shift(grid, (8, 8), torch.Generator().manual_seed(1))
    upsampled = torch.nn.functional.interpolate(grid[:1], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
    crops = {(t, left): upsampled[t : t + 8, left : left + 8] for t in range(4) for left in range(4)}
    found = set()
    for mask in masks[:, 0]:
        matches = [key for key, crop in crops.items() if torch.equal(crop, mask)]
        assert len(matches) == 1
        found.add(matches[0])
    assert found == set(crops)  # every shift in 0..cell_size-1 on both axes occurs


def test_perceptual_masks_distribution():
    masks = PerceptualMasks()(400, (16, 16), torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 16, 16)
    assert masks.min() >= 0 and masks.max() <= 1  # bicubic overshoot clamped
    assert abs(masks.mean().item() - 0.7) < 0.04
    # One crop per mask: crops of different sizes give masks of different smoothness.
    roughness = (masks[..., 1:] - masks[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert roughness.std() > 0.1 * roughness.mean()


@pytest.mark.parametrize(("stop", "tolerance"), [("change", 0.05), ("stderr", 1.0)])
def test_adaptive_stops_early_and_equals_the_prefix_of_the_full_run(stop, tolerance):
    encoder, x = tiny_encoder(), images(2)
    adaptive = RELAX(
        encoder, num_masks=2000, adaptive=True, stop=stop, tolerance=tolerance, round_size=50, min_masks=100
    )(x)
    used = adaptive.info["num_masks_used"]
    assert all(100 <= n < 2000 and n % 50 == 0 for n in used)
    assert adaptive.info["adaptive"] and adaptive.info["tolerance"] == tolerance and adaptive.info["stop"] == stop
    for i, n in enumerate(used):
        # Masks come in the same seeded sequence, so stopping at n masks equals asking for n.
        full = RELAX(encoder, num_masks=n, round_size=50)(x[i : i + 1])
        torch.testing.assert_close(adaptive.importance[i], full.importance[0], rtol=0, atol=1e-6)


def test_non_adaptive_uses_all_masks():
    out = RELAX(tiny_encoder(), num_masks=70, round_size=30)(images(1))
    assert out.info["num_masks_used"] == [70]
    assert not out.info["adaptive"]


class Flaky(nn.Module):
    def __init__(self, fail_at: int):
        super().__init__()
        self.body = tiny_encoder()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.body(x)


@pytest.mark.parametrize("fail_at", [None, 3])
def test_model_state_is_restored(fail_at):
    model = Flaky(fail_at or 10**9).train()
    model.body[2].eval()
    model.body[0].weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    explainer = RELAX(model, num_masks=30, batch_size=8)
    if fail_at:
        with pytest.raises(RuntimeError, match="boom"):
            explainer(images(1))
    else:
        explainer(images(1))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_encoder_runs_in_eval_mode():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_encoder()

        def forward(self, x):
            seen.append(self.training)
            return self.body(x)

    RELAX(Probe().train(), num_masks=10)(images(1))
    assert seen and not any(seen)


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_constant_image_is_unchanged_by_masking(baseline):
    # With the image's own mean colour (or its blur) as baseline, masking a constant image changes
    # nothing: s = 1 for every mask, so R = Σ M / (1e-10 + Σ M) = 1 and U = 0 everywhere.
    x = torch.ones(1, 3, SIZE, SIZE) * torch.tensor([0.3, -0.2, 1.1])[:, None, None]
    out = RELAX(tiny_encoder(), num_masks=40, baseline=baseline)(x)
    torch.testing.assert_close(out.importance, torch.ones_like(out.importance), rtol=0, atol=1e-6)
    assert out.uncertainty.abs().max() < 1e-10
    assert out.info["baseline"] == baseline


def test_u_relax_keeps_importance_where_uncertainty_is_low():
    importance = torch.arange(8.0).view(1, 2, 4)
    uncertainty = torch.tensor([[[0.1, 0.5, 0.2, 0.9], [0.3, 0.05, 0.7, 0.4]]])
    # Lower median of the 8 values is 0.3.
    expected = importance * torch.tensor([[[1, 0, 1, 0], [1, 1, 0, 0]]])
    assert torch.equal(u_relax(importance, uncertainty), expected)


def test_single_image_single_mask_batch_works():
    out = RELAX(tiny_encoder(), num_masks=5, batch_size=1)(images(1))
    assert out.importance.shape == (1, SIZE, SIZE) and torch.isfinite(out.importance).all()


def test_explicit_masks_ignore_num_masks_and_seed():
    masks = RelaxMasks()(20, (SIZE, SIZE), torch.Generator().manual_seed(9))
    a = RELAX(tiny_encoder(), num_masks=3000, seed=1)(images(1), masks=masks)
    b = RELAX(tiny_encoder(), num_masks=7, seed=2)(images(1), masks=masks[:, 0])
    assert torch.equal(a.importance, b.importance)
    assert a.info["num_masks_used"] == [20] and a.info["masks"] == "explicit"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"baseline": "noise"}, ValueError, "Known baseline"),
        ({"shift": "left"}, ValueError, "Known mask shift"),
        ({"num_masks": 0}, ValueError, "positive integer"),
        ({"p": 0.0}, ValueError, "probability of keeping"),
        ({"tolerance": 0}, ValueError, "tolerance"),
        ({"stop": "never"}, ValueError, "Known stopping rule"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_options_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        RELAX(tiny_encoder(), **kwargs)


def test_bad_inputs_are_rejected_with_a_fix():
    explainer = RELAX(tiny_encoder(), num_masks=4)
    with pytest.raises(ValueError, match=r"\(N, 1, 12, 12\)"):
        explainer(images(1), masks=torch.rand(4, 1, 5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        explainer(images(1), masks=-torch.rand(4, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="pools and flattens"):
        RELAX(nn.Conv2d(3, 4, 3), num_masks=4)(images(1))
    with pytest.raises(TypeError, match="nn.Module"):
        RELAX(lambda x: x)
