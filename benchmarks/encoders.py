"""The encoders the explainer benchmarks time, by image size: random weights (speed does not
depend on them), pooled features. Imported by relax_speed.py and explain_throughput.py, which run
as scripts from the repository root (``python benchmarks/NAME.py``), so this folder is on sys.path."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from sslens.models import create_backbone


def resnet18_cifar() -> nn.Module:
    """sslens's ResNet-18 with the CIFAR stem (3 × 3 conv1, no max-pool)."""
    return create_backbone("resnet18-cifar")


def resnet50() -> nn.Module:
    """torchvision's ResNet-50 without its classifier."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    return model


MODELS: dict[int, tuple[str, Callable[[], nn.Module]]] = {
    32: ("resnet18-cifar", resnet18_cifar),
    224: ("resnet50", resnet50),
}
