"""Perceptual components: the masked images' invariants, the explainer's maps, skipping, seeding."""

from __future__ import annotations

import urllib.error

import kornia.color
import pytest
import torch
from torch import nn

from sslens.data.pixels import grayscale
from sslens.errors import UserError
from sslens.explain.base import EXPLAINERS
from sslens.explain.depth import midas_depth_estimator
from sslens.explain.perceptual import (
    ALL_COMPONENTS,
    COMPONENTS,
    Amounts,
    PerceptualComponents,
    blend,
    canny_edges,
    darken,
    frequency_split,
    sharpen,
    zscore,
)

SIZE = 16
#: Index of the one image the component tests mask.
FIRST = torch.arange(1)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Mid-tone random images in [0.2, 0.8] (no clipping when darkened or sharpened a little)."""
    return 0.2 + 0.6 * torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def binary_masks(n: int = 3, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def step_image() -> torch.Tensor:
    x = torch.full((1, 3, SIZE, SIZE), 0.2)
    x[..., SIZE // 2 :] = 0.8
    return x


def test_grayscale_is_luma_on_three_channels():
    x = pixels(1)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    gray = grayscale(x)
    assert gray.shape == x.shape
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma)


def test_color_masking_keeps_luma_and_the_image_where_kept():
    x, m = pixels(1), torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    color = COMPONENTS["color"].build(x, None, Amounts())
    masked = color.masked(FIRST, m)  # (1, 4, 3, H, W)
    torch.testing.assert_close(grayscale(masked.flatten(0, 1)), grayscale(x).expand(4, -1, -1, -1))
    ones = color.masked(FIRST, torch.ones(1, 1, SIZE, SIZE))
    assert torch.equal(ones[:, 0], x)
    zeros = color.masked(FIRST, torch.zeros(1, 1, SIZE, SIZE))
    torch.testing.assert_close(zeros[:, 0], grayscale(x))


def test_shape_image_is_zero_where_masked_out_and_edges_elsewhere():
    edges = canny_edges(step_image()).expand(-1, 3, -1, -1)
    m = binary_masks()
    masked = COMPONENTS["shape"].build(step_image(), None, Amounts()).masked(FIRST, m)[0]
    assert torch.equal(masked * (1 - m), torch.zeros_like(masked))
    assert torch.equal(masked * m, edges * m)


def test_canny_finds_the_step_and_nothing_in_flat_regions():
    edges = canny_edges(step_image())[0, 0]
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    columns = edges.sum(dim=0).nonzero().flatten().tolist()
    assert columns and all(abs(c - SIZE // 2) <= 1 for c in columns)


def test_texture_image_is_gray_on_edges_and_where_kept_blurred_elsewhere():
    x = step_image() + 0.1 * pixels(1)
    texture = COMPONENTS["texture"].build(x, None, Amounts())
    gray, blurred = texture.present, texture.absent
    assert torch.equal(gray, grayscale(x)) and not torch.equal(blurred, gray)
    edges = canny_edges(x)
    m = binary_masks()
    out = texture.masked(FIRST, m)[0]  # (3, 3, H, W)
    keep = torch.maximum(m, edges)
    assert edges.sum() > 0
    assert torch.equal(out * keep, gray * keep)
    assert torch.equal(out * (1 - keep), blurred * (1 - keep))
    on_edges = edges.expand_as(out).bool()
    assert torch.equal(out[on_edges], gray.expand_as(out)[on_edges])


def test_darken_lowers_lab_lightness_by_the_decrement_only_where_masked_out():
    # Low-saturation mid-tones stay inside the RGB gamut when darkened, so nothing is clipped.
    x = 0.45 + 0.1 * pixels(1)
    darker = darken(x, 20.0)
    lab_x, lab_d = kornia.color.rgb_to_lab(x), kornia.color.rgb_to_lab(darker)
    torch.testing.assert_close(lab_d[:, 0], lab_x[:, 0] - 20.0, rtol=0, atol=1e-3)
    torch.testing.assert_close(lab_d[:, 1:], lab_x[:, 1:], rtol=0, atol=1e-2)
    m = binary_masks()
    out = blend(x[:, None], darker[:, None], m)[0]
    lightness = kornia.color.rgb_to_lab(out)[:, 0]
    kept = m[:, 0].bool()
    torch.testing.assert_close(lightness[kept], lab_x[:, 0].expand_as(lightness)[kept], rtol=0, atol=1e-3)
    torch.testing.assert_close(lightness[~kept], lab_x[:, 0].expand_as(lightness)[~kept] - 20.0, rtol=0, atol=1e-3)


def test_low_and_high_pass_sum_back_to_the_image():
    x = pixels(2)
    low, high = frequency_split(x, 1.5)
    torch.testing.assert_close(low + high, x, rtol=0, atol=1e-6)
    assert high.abs().mean() < x.abs().mean()
    flat = torch.full((1, 3, SIZE, SIZE), 0.4)
    torch.testing.assert_close(frequency_split(flat, 1.5)[0], flat)


def test_sharpen_is_identity_on_flat_images_and_adds_contrast_at_a_step():
    flat = torch.full((1, 3, SIZE, SIZE), 0.4)
    torch.testing.assert_close(sharpen(flat, 1.0), flat)
    x = step_image()
    s = sharpen(x, 0.25)
    # x − ∇²x at the step: the dark side gets darker, the bright side brighter (by 0.25 · 3 · 0.6).
    torch.testing.assert_close(s[0, 0, 4, SIZE // 2 - 1], torch.tensor(0.2 - 0.25 * 3 * 0.6).clamp(0, 1))
    torch.testing.assert_close(s[0, 0, 4, SIZE // 2], torch.tensor(0.8 + 0.25 * 3 * 0.6).clamp(0, 1))
    assert torch.equal(s[..., :, 2], x[..., :, 2])


def test_component_images_follow_the_table():
    x, a = pixels(1), Amounts()
    depth = torch.rand(1, SIZE, SIZE)
    built = {name: COMPONENTS[name].build(x, depth, a) for name in ALL_COMPONENTS}
    m = binary_masks(1)
    index = torch.tensor([0])
    assert torch.equal(built["color"].reference, x)
    assert torch.equal(built["texture"].reference, grayscale(x))
    assert torch.equal(built["sharpness"].reference, sharpen(x, a.sharpen_amount))
    # Where M = 1 the masked image shows the component; lowpass/highpass keep X there.
    for name in ("color", "brightness", "lowpass", "highpass"):
        out = built[name].masked(index, torch.ones_like(m))[0, 0]
        assert torch.equal(out, x[0]), name
    # Where M = 0: sharpness falls back to X, depth and shape to black.
    torch.testing.assert_close(built["sharpness"].masked(index, torch.zeros_like(m))[0, 0], x[0])
    assert torch.equal(built["depth"].masked(index, torch.zeros_like(m)), torch.zeros(1, 1, 3, SIZE, SIZE))
    d = built["depth"].reference
    assert d.min() == 0 and d.max() == 1 and torch.equal(d[:, 0], d[:, 2])
    high = built["highpass"].masked(index, torch.zeros_like(m))[0, 0]
    torch.testing.assert_close(high.mean(dim=(1, 2)), x[0].mean(dim=(1, 2)), rtol=0, atol=1e-2)


def test_components_give_maps_for_every_image_and_report_skipped_depth():
    explainer = PerceptualComponents(tiny_encoder(), num_masks=12, batch_size=16, round_size=8, mean=MEAN, std=STD)
    out = explainer(normalise(pixels(2)))
    expected = [c for c in ALL_COMPONENTS if c != "depth"]
    assert list(out.components) == expected
    for name, value in out.components.items():
        assert value.shape == (2, SIZE, SIZE) and value.dtype == torch.float32, name
        assert torch.isfinite(value).all() and value.std() > 0, name
    assert "depth" in out.info["skipped"] and "depth_estimator" in out.info["skipped"]["depth"]
    torch.testing.assert_close(out.importance, torch.stack(list(out.components.values())).mean(0))
    assert out.info["num_masks_used"] == [12, 12] and out.info["masks"] == "perceptual"


def test_depth_from_the_call_or_an_estimator():
    x = normalise(pixels(2))
    depth = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    calls = []

    def estimator(images):
        calls.append(images.shape)
        assert images.min() >= 0 and images.max() <= 1
        return depth

    kwargs = {"components": ("depth",), "num_masks": 8, "mean": MEAN, "std": STD}
    given = PerceptualComponents(tiny_encoder(), **kwargs)(x, depth=depth)
    estimated = PerceptualComponents(tiny_encoder(), depth_estimator=estimator, **kwargs)(x)
    assert calls == [(2, 3, SIZE, SIZE)]
    assert given.info["skipped"] == {} and given.info["depth_source"] == "call"
    assert estimated.info["depth_source"] == "estimator"
    assert torch.equal(given.components["depth"], estimated.components["depth"])
    with pytest.raises(ValueError, match="Every requested component was skipped"):
        PerceptualComponents(tiny_encoder(), **kwargs)(x)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        PerceptualComponents(tiny_encoder(), **kwargs)(x, depth=depth[:1])
    # An estimator's output is checked like depth passed in (here: a channel axis too many).
    channelled = PerceptualComponents(tiny_encoder(), depth_estimator=lambda images: depth[:, None], **kwargs)
    with pytest.raises(ValueError, match=r"depth_estimator's output must be a \(B, H, W\)"):
        channelled(x)


def test_a_gray_image_has_no_colour_to_remove():
    # gray(X) = X, so every colour-masked image equals X: s = 1, importance = 1 everywhere.
    x = grayscale(pixels(1))
    out = PerceptualComponents(tiny_encoder(), components=("color",), num_masks=10, mean=MEAN, std=STD)(normalise(x))
    torch.testing.assert_close(out.components["color"], torch.ones(1, SIZE, SIZE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("masks", ["perceptual", "relax"])
def test_seeded(masks):
    x = normalise(pixels(1))

    def run(seed):
        return PerceptualComponents(
            tiny_encoder(), components=("color", "texture"), num_masks=10, masks=masks, seed=seed, mean=MEAN, std=STD
        )(x)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a.components[k], b.components[k]) for k in a.components)
    assert not torch.allclose(a.components["color"], c.components["color"])
    assert a.info["masks"] == masks


def test_batch_equals_one_by_one():
    x = normalise(pixels(2))
    explainer = PerceptualComponents(tiny_encoder(), components=("shape", "lowpass"), num_masks=10, mean=MEAN, std=STD)
    together = explainer(x)
    alone = explainer(x[1:])
    for name in together.components:
        torch.testing.assert_close(together.components[name][1], alone.components[name][0], rtol=0, atol=1e-6)


def test_registered_and_validated():
    assert EXPLAINERS.get("perceptual") is PerceptualComponents
    with pytest.raises(ValueError, match="Known perceptual component"):
        PerceptualComponents(tiny_encoder(), components=("colour",))
    with pytest.raises(TypeError, match="sequence of names"):
        PerceptualComponents(tiny_encoder(), components="color")
    with pytest.raises(ValueError, match="Known mask distribution"):
        PerceptualComponents(tiny_encoder(), masks="gaussian")
    with pytest.raises(ValueError, match="odd"):
        PerceptualComponents(tiny_encoder(), texture_kernel=4)
    with pytest.raises(ValueError, match="canny_low"):
        PerceptualComponents(tiny_encoder(), canny_low=0.5, canny_high=0.2)


def test_zscore_is_explicit_and_refuses_flat_maps():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    z = zscore(maps)
    torch.testing.assert_close(z.flatten(1).mean(1), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(z.flatten(1).std(1), torch.ones(2))
    with pytest.raises(ValueError, match="constant"):
        zscore(torch.ones(1, 4, 4))


def test_midas_offline_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError, match="depth=..."):
        midas_depth_estimator()
    with pytest.raises(ValueError, match="Unknown MiDaS model"):
        midas_depth_estimator("MiDaS_tiny")


def test_components_and_images_share_forward_passes():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.sizes = tiny_encoder(), []

        def forward(self, x):
            self.sizes.append(x.shape[0])
            return self.body(x)

    encoder, x = Recorder(), normalise(pixels(2))
    kwargs = {"components": ("color", "lowpass"), "num_masks": 10, "mean": MEAN, "std": STD, "round_size": 4}
    together = PerceptualComponents(encoder, batch_size=40, **kwargs)(x)
    # One reference pass per component, then 2 components × 2 images × 10 masks in one pass.
    assert encoder.sizes == [2, 2, 40]
    alone = PerceptualComponents(tiny_encoder(), batch_size=3, **kwargs)(x[1:])
    for name in together.components:
        torch.testing.assert_close(together.components[name][1], alone.components[name][0], rtol=0, atol=1e-6)
    assert together.info["batch_size"] == 40
