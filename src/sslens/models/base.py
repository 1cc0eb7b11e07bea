"""The backbone interface shared by every encoder sslens trains or explains."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sslens.checks import listing
from sslens.registry import Registry

BACKBONES = Registry("backbone", modules=("sslens.models.resnet", "sslens.models.timm_backbone"))


class Backbone(nn.Module):
    """An image encoder: (B, 3, H, W) normalised images → (B, feature_dim) pooled representation.

    Subclasses set ``feature_dim`` and ``layer_names`` (convolutional stages reachable by name,
    e.g. ``("stem", "layer1", ..., "layer4")`` for a ResNet, last = default Grad-CAM layer) and
    implement :meth:`forward_features`.
    """

    feature_dim: int
    layer_names: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, C, h, w) feature map of the last convolutional stage."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, feature_dim): global-average-pooled last feature map."""
        return self.forward_features(x).mean(dim=(2, 3))

    def get_layer(self, name: str) -> nn.Module:
        """The convolutional stage ``name``; a ValueError lists the valid names otherwise."""
        if name not in self.layer_names:
            raise ValueError(
                f"This backbone has no layer {name!r}. Valid layer names: {', '.join(self.layer_names)}."
            )
        return self.get_submodule(name)

    @property
    def default_layer(self) -> str:
        return self.layer_names[-1]


def create_backbone(name: str, **options) -> Backbone:
    """Build a registered backbone by name, e.g. ``create_backbone("resnet18-cifar")``."""
    return BACKBONES.create(name, **options)


def state_dict_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """'' when ``given`` fits ``expected`` exactly, else its missing, unexpected and misshapen keys.

    Shared by every loader of foreign weights, so nothing is ever silently ignored.
    """
    # BatchNorm's num_batches_tracked counter arrived in PyTorch 0.4.1; checkpoints saved before
    # it (torchvision's first ResNet files among them) lack it, and BatchNorm's own loader fills
    # it in (it only matters for momentum=None), so its absence is not a mismatch.
    missing = sorted(
        key for key in set(expected) - set(given) if not key.endswith(".num_batches_tracked")
    )
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(given[key].shape)} vs backbone {tuple(expected[key].shape)}"
        for key in set(given) & set(expected)
        if tuple(given[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {listing(missing)}")
    if unexpected:
        problems.append(f"not in this backbone: {listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched, separator='; ')}")
    return " | ".join(problems)
