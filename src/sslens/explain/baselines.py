"""What replaces the pixels a mask or a deletion curve removes: one table for every explainer and
metric (RELAX and perceptual masking, deletion and insertion).

``make_baseline(name, images, blur_sigma=..., padding=...)`` → (B, 3, H, W) in the images'
normalised space:

* ``"zero"`` — zeros, i.e. the dataset's mean colour (relax-xai's ``X ⊙ M``);
* ``"blur"`` — the image blurred with a Gaussian of ``blur_sigma`` px (as RISE uses for
  insertion; blurring commutes with the per-channel normalisation), with ``padding``
  ``"replicate"`` (default; any σ on any image size) or ``"reflect"``;
* ``"mean"`` — each image's own mean colour, per channel.

>>> make_baseline("mean", torch.ones(1, 3, 4, 4)).unique().tolist()
[1.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sslens.data.pixels import gaussian_blur
from sslens.registry import lookup


def _zero(images: torch.Tensor, blur_sigma: float, padding: str) -> torch.Tensor:
    return torch.zeros_like(images)


def _blur(images: torch.Tensor, blur_sigma: float, padding: str) -> torch.Tensor:
    return gaussian_blur(images, blur_sigma, padding=padding)


def _mean(images: torch.Tensor, blur_sigma: float, padding: str) -> torch.Tensor:
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


#: Baseline name → ``(images, blur_sigma, padding) -> baseline images``.
BASELINES: dict[str, Callable[[torch.Tensor, float, str], torch.Tensor]] = {
    "zero": _zero,
    "blur": _blur,
    "mean": _mean,
}


def check_baseline(name: str, blur_sigma: float) -> str:
    """``name`` if it is a known baseline and ``blur_sigma`` a valid σ, else a ValueError."""
    lookup("baseline", BASELINES, name)
    if not blur_sigma > 0:
        raise ValueError(f"blur_sigma is a Gaussian σ in pixels and must be > 0; got {blur_sigma!r}")
    return name


def make_baseline(
    name: str, images: torch.Tensor, *, blur_sigma: float = 4.0, padding: str = "replicate"
) -> torch.Tensor:
    """(B, 3, H, W) normalised images → (B, 3, H, W) baseline ``name`` (see the module docstring)."""
    return lookup("baseline", BASELINES, name)(images, blur_sigma, padding)
