"""Run an encoder on images prepared for another input convention.

A study compares models on one dataset, prepared one way (its size, its normalisation); an
imported ImageNet model expects 224-px images normalised with ImageNet statistics. Rather than
preparing the images once per model in every experiment, the model is wrapped so that it accepts
the dataset's images: the wrapper undoes the dataset's normalisation, resizes to the model's
input size and applies the model's normalisation. It is differentiable, so gradient explainers
see through it, and the explainers' maps stay at the dataset's resolution.

>>> import torch
>>> from torch import nn
>>> inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> adapter = InputAdapter(inner, from_mean=(0.5,) * 3, from_std=(0.25,) * 3, to_size=(64, 64),
...                        to_mean=(0.485, 0.456, 0.406), to_std=(0.229, 0.224, 0.225))
>>> adapter(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.data.base import denormalize, normalize


class InputAdapter(nn.Module):
    """``encoder`` fed with images normalised by (``from_mean``, ``from_std``) at any size.

    Args:
        encoder: maps (B, 3, h, w) images normalised with ``to_mean``/``to_std`` at
            ``to_size`` to (B, D) embeddings.
        from_mean, from_std: the normalisation of the images this adapter receives.
        to_size: (h, w) the encoder expects.
        to_mean, to_std: the normalisation the encoder expects.
        interpolation: "bilinear" or "bicubic" for the resize (antialiased when shrinking).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        from_mean: Sequence[float],
        from_std: Sequence[float],
        to_size: Sequence[int],
        to_mean: Sequence[float],
        to_std: Sequence[float],
        interpolation: str = "bilinear",
    ):
        super().__init__()
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic'; got {interpolation!r}")
        if len(to_size) != 2 or min(to_size) < 1:
            raise ValueError(f"to_size must be (height, width) in pixels; got {tuple(to_size)}")
        self.encoder = encoder
        self.from_stats = (tuple(from_mean), tuple(from_std))
        self.to_size = (int(to_size[0]), int(to_size[1]))
        self.to_stats = (tuple(to_mean), tuple(to_std))
        self.interpolation = interpolation

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in the source convention → (B, 3, h, w) in the encoder's."""
        pixels = denormalize(x, *self.from_stats)
        if tuple(pixels.shape[-2:]) != self.to_size:
            shrinking = pixels.shape[-2] > self.to_size[0] or pixels.shape[-1] > self.to_size[1]
            pixels = F.interpolate(
                pixels, size=self.to_size, mode=self.interpolation, align_corners=False, antialias=shrinking
            )
        return normalize(pixels, *self.to_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x))


def adapt_input(
    encoder: nn.Module, meta: dict, *, image_size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    """``encoder`` itself when its model (``meta``: image_size, mean, std, interpolation) expects
    images as given; else an :class:`InputAdapter` that converts them."""
    to_size = tuple(int(s) for s in meta.get("image_size", image_size))
    to_mean, to_std = tuple(meta.get("mean", mean)), tuple(meta.get("std", std))
    same = (
        to_size == tuple(int(s) for s in image_size)
        and torch.allclose(torch.tensor(to_mean), torch.tensor(tuple(mean)))
        and torch.allclose(torch.tensor(to_std), torch.tensor(tuple(std)))
    )
    if same:
        return encoder
    interpolation = meta.get("interpolation", "bilinear")
    return InputAdapter(
        encoder, from_mean=mean, from_std=std, to_size=to_size, to_mean=to_mean, to_std=to_std,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )
