"""One grayscale and one blur for augmentations, explainers and metrics, and one baselines table."""

import kornia.filters
import pytest
import torch
import torchvision.transforms.functional as TF

from sslens.data.pixels import gaussian_blur, grayscale, luma, separable_blur
from sslens.explain.baselines import make_baseline
from sslens.explain.metrics.faithfulness import deletion_insertion


def images(seed: int = 0, size: int = 9) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_the_blur_equals_kornias_with_the_same_padding(padding):
    x = images()
    ours = gaussian_blur(x, 1.5, kernel_size=7, padding=padding)
    torch.testing.assert_close(ours, kornia.filters.gaussian_blur2d(x, (7, 7), (1.5, 1.5), border_type=padding))


def test_the_augmentations_blur_is_torchvisions():
    x = images()
    sigma = torch.tensor([0.7, 1.9])
    kernels = torch.exp(-0.5 * (torch.arange(-2, 3) / sigma[:, None]) ** 2)
    ours = separable_blur(x, kernels / kernels.sum(1, keepdim=True), padding="reflect")
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_replicate_padding_blurs_images_smaller_than_the_kernel_and_reflect_refuses_them():
    x = images(size=4)
    blurred = gaussian_blur(x, 5.0)  # 31 taps on a 4-px image
    assert blurred.shape == x.shape and blurred.std() < x.std()
    # A very wide Gaussian with replicate padding tends to the image mean's neighbourhood, not to 0.
    assert blurred.min() >= x.min() and blurred.max() <= x.max()
    with pytest.raises(ValueError, match="too large for 4x4 images with reflect padding"):
        gaussian_blur(x, 5.0, padding="reflect")
    with pytest.raises(ValueError, match="padding must be one of replicate, reflect"):
        gaussian_blur(x, 1.0, padding="zeros")


def test_relax_and_the_deletion_curve_mask_with_the_same_blur():
    """Before, RELAX blurred with replicate padding and the deletion metric with a kernel capped to
    reflect padding, so "blur" meant two different images."""
    x = images(size=6)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 36, 4))
    result = deletion_insertion(encoder, x, torch.rand(2, 6, 6), steps=2, baseline="blur", blur_sigma=3.0)
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(encoder(make_baseline("blur", x, blur_sigma=3.0)), encoder(x))
    assert [c[-1] for c in result["per_image_curves"]["deletion"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert result["settings"]["blur_padding"] == "replicate"


def test_grayscale_keeps_a_grey_pixel_and_weights_channels_by_luma():
    grey = torch.full((1, 3, 2, 2), 0.3)
    torch.testing.assert_close(grayscale(grey), grey)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1.0
    assert luma(red).item() == pytest.approx(0.299)
