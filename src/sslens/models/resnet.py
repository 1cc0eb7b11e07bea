"""ResNet backbones (He et al. 2016, https://arxiv.org/abs/1512.03385) built from torchvision blocks.

Two stems are offered:

* ``"imagenet"``: torchvision's 7x7 stride-2 convolution followed by a 3x3 stride-2 max-pool, for
  224 px inputs. Registered as ``resnet18``, ``resnet34``, ``resnet50``.
* ``"cifar"``: a 3x3 stride-1 convolution and no max-pool, so 32 px CIFAR images keep their
  resolution into ``layer1``, as SimCLR does for CIFAR-10 (https://arxiv.org/abs/2002.05709,
  appendix B.9: "we replace the first 7x7 Conv of stride 2 with 3x3 Conv of stride 1, and also
  remove the first max pooling operation"). Registered as ``resnet18-cifar``, ``resnet34-cifar``,
  ``resnet50-cifar`` and the test-sized ``resnet-tiny``.

Every backbone exposes its stages as the attributes ``stem``, ``layer1`` ... ``layer4`` so an
explainer can hook ``backbone.get_layer("layer4")``. Weights are never downloaded; published
checkpoints come in through :func:`load_torchvision_state_dict`.

>>> backbone = create_resnet("resnet-tiny")
>>> backbone(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 128])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from sslens.checks import boolean
from sslens.models.base import BACKBONES, Backbone, state_dict_problems

Block = type[BasicBlock] | type[Bottleneck]

STEMS = ("imagenet", "cifar")


class ResNet(Backbone):
    """A ResNet trunk without its classifier: (B, 3, H, W) → (B, feature_dim).

    Args:
        block: torchvision's ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: number of blocks in ``layer1`` ... ``layer4``, e.g. (2, 2, 2, 2).
        widths: base channel count of each stage (the block's ``planes``); a ``Bottleneck``
            stage outputs 4x as many channels.
        stem: "imagenet" (7x7/2 conv + max-pool) or "cifar" (3x3/1 conv, no max-pool).
        zero_init_residual: start the last BatchNorm of every residual branch at zero, so each
            block begins as the identity (Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
            Default False, as in torchvision and in the published SimCLR/MoCo/SwAV ResNets.

    Feature map sizes: the CIFAR stem keeps H x W into ``layer1`` and ``layer4`` is H/8 x W/8;
    the ImageNet stem reduces by 4 before ``layer1`` and ``layer4`` is H/32 x W/32.
    """

    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: Block,
        blocks_per_stage: tuple[int, int, int, int],
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be torchvision's BasicBlock or Bottleneck; got {block!r}")
        if len(blocks_per_stage) != 4 or any(int(n) < 1 for n in blocks_per_stage):
            raise ValueError(
                f"blocks_per_stage needs four positive counts (layer1..layer4); got {blocks_per_stage}"
            )
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths needs four positive channel counts; got {widths}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
        boolean("zero_init_residual", zero_init_residual)

        self.stem = _make_stem(stem, widths[0])
        in_channels = widths[0]
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stage, in_channels = _make_stage(
                block, in_channels, width, int(count), stride=1 if index == 0 else 2
            )
            setattr(self, f"layer{index + 1}", stage)
        self.feature_dim = in_channels
        self.stem_type = stem
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, feature_dim, h, w), the output of ``layer4``."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _make_stem(stem: str, channels: int) -> nn.Sequential:
    # The submodule names match torchvision's top-level names (conv1, bn1) so checkpoint keys map
    # one-to-one: torchvision "conv1.weight" is our "stem.conv1.weight".
    if stem == "imagenet":
        conv = nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False)
        tail = [("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
    else:
        conv = nn.Conv2d(3, channels, kernel_size=3, stride=1, padding=1, bias=False)
        tail = []
    layers = [("conv1", conv), ("bn1", nn.BatchNorm2d(channels)), ("relu", nn.ReLU(inplace=True))]
    return nn.Sequential(OrderedDict(layers + tail))


def _make_stage(
    block: Block, in_channels: int, width: int, count: int, stride: int
) -> tuple[nn.Sequential, int]:
    """One residual stage, as torchvision's ``ResNet._make_layer`` builds it (same key names)."""
    out_channels = width * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks = [block(in_channels, width, stride, downsample)]
    blocks += [block(out_channels, width) for _ in range(1, count)]
    return nn.Sequential(*blocks), out_channels


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation (kaiming-normal fan-out convs, unit BatchNorm)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)


# name → (block, blocks per stage, widths, stem). Entry names are the registered backbone names.
_CONFIGS: dict[str, tuple[Block, tuple[int, ...], tuple[int, ...], str]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet"),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet18-cifar": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "cifar"),
    "resnet34-cifar": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "cifar"),
    "resnet50-cifar": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "cifar"),
    # For tests and smoke runs: one BasicBlock per stage, 1/4 of the ResNet-18 widths.
    "resnet-tiny": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), "cifar"),
}


def create_resnet(name: str, zero_init_residual: bool = False) -> ResNet:
    """Build the ResNet configuration ``name`` (one of the keys of ``_CONFIGS``)."""
    if name not in _CONFIGS:
        raise ValueError(f"Unknown ResNet {name!r}. Known: {', '.join(_CONFIGS)}.")
    block, blocks, widths, stem = _CONFIGS[name]
    return ResNet(block, blocks, widths, stem=stem, zero_init_residual=zero_init_residual)


def _register(name: str) -> None:
    def factory(zero_init_residual: bool = False) -> ResNet:
        return create_resnet(name, zero_init_residual=zero_init_residual)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"The {name!r} backbone; see :class:`ResNet`."
    BACKBONES.register(name)(factory)


for _name in _CONFIGS:
    _register(_name)


@dataclass
class ImportReport:
    """What :func:`load_torchvision_state_dict` did.

    Attributes:
        loaded: our parameter/buffer names that received a value.
        dropped: source keys deliberately not loaded (the ``fc.*`` classifier, which sslens
            backbones do not have).
    """

    loaded: list[str]
    dropped: list[str]


def load_torchvision_state_dict(
    backbone: ResNet, state_dict: Mapping[str, torch.Tensor]
) -> ImportReport:
    """Load a torchvision ``resnetXX`` state dict (e.g. a published checkpoint) into ``backbone``.

    Key mapping: ``conv1.*`` → ``stem.conv1.*``, ``bn1.*`` → ``stem.bn1.*``, ``layerN.*`` unchanged,
    ``fc.*`` dropped (and listed in the report). Any other disagreement is an error, never
    silently ignored: a ValueError lists the keys the backbone expects but ``state_dict`` lacks,
    the keys of ``state_dict`` that have no place in the backbone, and shape mismatches (e.g. a
    7x7 ImageNet stem loaded into a 3x3 CIFAR stem). Prefixes such as ``module.`` or
    ``encoder_q.`` of training checkpoints must be stripped by the caller first.

    Returns an :class:`ImportReport`; the backbone is modified only if every check passes.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(
            f"backbone must be an sslens ResNet (e.g. create_backbone('resnet50')); got {type(backbone).__name__}"
        )
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            dropped.append(key)
        elif key.startswith(("conv1.", "bn1.")):
            mapped[f"stem.{key}"] = value
        else:
            mapped[key] = value

    problems = state_dict_problems(backbone.state_dict(), mapped)
    if problems:
        raise ValueError(
            "The state dict does not fit this backbone (is it the same depth and stem? "
            "ImageNet checkpoints need 'resnetXX', not 'resnetXX-cifar'). " + problems
        )
    backbone.load_state_dict(mapped, strict=True)
    return ImportReport(loaded=sorted(mapped), dropped=sorted(dropped))
