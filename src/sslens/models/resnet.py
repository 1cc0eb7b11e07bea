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
checkpoints come in through :func:`load_torchvision_state_dict`, and :func:`infer_resnet_arch`
names the registered ResNet whose layout a torchvision-named state dict has.

>>> backbone = create_resnet("resnet-tiny")
>>> backbone(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 128])
"""

from __future__ import annotations

import re
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

#: The registered ResNet backbones.
RESNET_NAMES: tuple[str, ...] = tuple(_CONFIGS)

#: conv1's kernel size → stem (see :func:`_make_stem`).
_STEM_KERNELS = {7: "imagenet", 3: "cifar"}


@dataclass(frozen=True)
class ResNetLayout:
    """The network that a torchvision-named ResNet state dict describes (:func:`resnet_layout`).

    Attributes:
        block: ``BasicBlock`` (``layerN.M.conv1``, ``conv2``) or ``Bottleneck`` (also ``conv3``).
        blocks_per_stage: blocks in ``layer1`` ... ``layer4`` (the largest M of ``layerN.M.*``, + 1).
        widths: output channels of each stage's first ``conv1`` (the ``planes`` of
            :class:`ResNet`: 64-128-256-512 for every registered ResNet but ``resnet-tiny``, and
            twice that for wide ResNets).
        stem_kernel: conv1's kernel size: 7 for the ImageNet stem, 3 for the CIFAR stem.
    """

    block: Block
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]
    stem_kernel: int

    @property
    def stem(self) -> str | None:
        """The stem's name ("imagenet", "cifar"), or None for a stem sslens does not build."""
        return _STEM_KERNELS.get(self.stem_kernel)

    def __str__(self) -> str:
        """E.g. "Bottleneck blocks 3-4-6-3, 7x7 ImageNet stem"."""
        text = f"{self.block.__name__} blocks {'-'.join(map(str, self.blocks_per_stage))}"
        if self.widths != (64, 128, 256, 512):
            text += f", widths {'-'.join(map(str, self.widths))}"
        stem = {"imagenet": " ImageNet", "cifar": " CIFAR"}.get(self.stem or "", "")
        return f"{text}, {self.stem_kernel}x{self.stem_kernel}{stem} stem"


def resnet_layout(state_dict: Mapping[str, torch.Tensor]) -> ResNetLayout | None:
    """The layout of a torchvision-named ResNet state dict (``conv1.weight``, ``layerN.M.*``), or
    None when it lacks conv1 or a stage's first block (it is no ResNet, or only part of one).

    >>> import torchvision
    >>> str(resnet_layout(torchvision.models.resnet50().state_dict()))
    'Bottleneck blocks 3-4-6-3, 7x7 ImageNet stem'
    """
    conv1 = state_dict.get("conv1.weight")
    firsts = [state_dict.get(f"layer{stage}.0.conv1.weight") for stage in range(1, 5)]
    if any(weight is None or weight.ndim != 4 for weight in [conv1, *firsts]):
        return None
    counts = [0, 0, 0, 0]
    for key in state_dict:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage = int(match.group(1)) - 1
            counts[stage] = max(counts[stage], int(match.group(2)) + 1)
    block = Bottleneck if "layer1.0.conv3.weight" in state_dict else BasicBlock
    return ResNetLayout(block, tuple(counts), tuple(int(w.shape[0]) for w in firsts), int(conv1.shape[-1]))


def infer_resnet_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered ResNet (a name in :data:`RESNET_NAMES`) whose block type, blocks per stage,
    widths and stem the torchvision-named ``state_dict`` has; None when none has them (a
    ResNet-101, a wide ResNet, a 5x5 stem) or the keys are no ResNet (:func:`resnet_layout`).

    >>> import torchvision
    >>> infer_resnet_arch(torchvision.models.resnet18().state_dict())
    'resnet18'
    """
    layout = resnet_layout(state_dict)
    if layout is None:
        return None
    found = (layout.block, layout.blocks_per_stage, layout.widths, layout.stem)
    return next((name for name, config in _CONFIGS.items() if config == found), None)


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
            "The state dict does not fit this backbone (is it the same depth, width and stem? "
            "infer_resnet_arch names the ResNet its keys describe). " + problems
        )
    backbone.load_state_dict(mapped, strict=True)
    return ImportReport(loaded=sorted(mapped), dropped=sorted(dropped))
