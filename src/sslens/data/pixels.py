"""Pixel operations shared by the augmentations, the explainers and their metrics.

One luma, one grayscale and one Gaussian blur for the whole library: the training views, the
perceptual components, the RELAX and deletion baselines and the invariance test all call these,
so "grayscale" or "blurred" means the same pixels wherever it appears.

* Luma: ITU-R BT.601 weights (0.299, 0.587, 0.114), as PIL's ``convert("L")`` and torchvision's
  Grayscale (whose tensor path uses 0.2989 for red; 0.299 is the standard's value).
* Blur: a separable Gaussian ``exp(-x² / 2σ²)`` normalised to sum 1 over ``2r + 1`` taps, applied
  as two grouped convolutions (one kernel per image and channel, so one call serves per-image σ),
  with an explicit padding: ``"replicate"`` (any kernel on any image size) or ``"reflect"``
  (torchvision's GaussianBlur; the radius must stay below the image side).

>>> x = torch.rand(2, 3, 8, 8)
>>> torch.allclose(grayscale(x)[:, 0], luma(x)[:, 0])
True
>>> gaussian_blur(torch.ones(1, 3, 5, 5), sigma=2.0).allclose(torch.ones(1, 3, 5, 5))
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslens.checks import is_int

#: ITU-R BT.601 luma weights; they sum to 1.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: Padding modes of :func:`separable_blur` (the ``F.pad`` modes that keep a blur unbiased).
PADDINGS = ("replicate", "reflect")


def luma(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB → (..., 1, H, W) luma with :data:`LUMA_WEIGHTS`."""
    r, g, b = images.unbind(dim=-3)
    # Scalar multiply-adds: three light kernels, faster than a reduction over channels.
    return (r * LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2]).unsqueeze(-3)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB → (..., 3, H, W): the luma repeated on three channels."""
    return luma(images).expand_as(images)


def gaussian_kernel(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B,) standard deviations in pixels → (B, 2·radius + 1) normalised Gaussian taps."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    taps = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    return taps / taps.sum(dim=1, keepdim=True)


def separable_blur(images: torch.Tensor, kernels: torch.Tensor, padding: str = "replicate") -> torch.Tensor:
    """(B, C, H, W) convolved with the separable kernel ``kernels[b] ⊗ kernels[b]`` of each image.

    Args:
        images: (B, C, H, W) float.
        kernels: (B, K) or (1, K) taps, K odd (one kernel per image, or one for all).
        padding: one of :data:`PADDINGS`.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
    batch, channels, height, width = images.shape
    size = kernels.shape[1]
    radius = size // 2
    if size % 2 == 0:
        raise ValueError(f"a blur kernel needs an odd number of taps; got {size}")
    if padding == "reflect" and radius >= min(height, width):
        raise ValueError(
            f"a {size}-tap kernel is too large for {height}x{width} images with reflect padding "
            f"(it needs kernel_size // 2 < side); use at most {2 * min(height, width) - 1} taps "
            "or replicate padding."
        )
    kernels = kernels.to(images.dtype).expand(batch, size)
    weight = kernels.repeat_interleave(channels, dim=0)  # (B·C, K): one kernel per image channel
    # The batch is folded into channels so one grouped convolution serves every image's kernel.
    folded = F.pad(images.reshape(1, batch * channels, height, width), (radius,) * 4, mode=padding)
    groups = batch * channels
    folded = F.conv2d(folded, weight.view(groups, 1, 1, size), groups=groups)
    folded = F.conv2d(folded, weight.view(groups, 1, size, 1), groups=groups)
    return folded.view(batch, channels, height, width)


def gaussian_blur(
    images: torch.Tensor, sigma: float, kernel_size: int | None = None, padding: str = "replicate"
) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H, W) blurred with a Gaussian of ``sigma`` px.

    ``kernel_size`` defaults to ``2·⌈3σ⌉ + 1`` taps (±3σ); ``padding`` is ``"replicate"``
    (default: works for kernels larger than small images) or ``"reflect"``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma is a Gaussian σ in pixels and must be > 0; got {sigma!r}")
    size = 2 * math.ceil(3 * sigma) + 1 if kernel_size is None else kernel_size
    if not is_int(size) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}")
    sigmas = torch.full((1,), float(sigma), dtype=images.dtype, device=images.device)
    return separable_blur(images, gaussian_kernel(sigmas, size // 2), padding)
