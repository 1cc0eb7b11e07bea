"""Backbones (every registered one), torchvision checkpoint import and projection heads."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sslens.models import (
    BACKBONES,
    ProjectionHead,
    ResNet,
    create_backbone,
    load_torchvision_state_dict,
)

FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet18-cifar": 512,
    "resnet34-cifar": 512,
    "resnet50-cifar": 2048,
    "resnet-tiny": 128,
}
# layer4's spatial size for a 32 px input: /32 with the ImageNet stem, /8 with the CIFAR stem.
LAYER4_SIZE = {
    name: 1 if "cifar" not in name and name != "resnet-tiny" else 4 for name in FEATURE_DIMS
}


# "timm" wraps any timm model by name (tests/test_vit.py covers it); the rest are our ResNets.
RESNETS = [name for name in BACKBONES.names() if name != "timm"]


def test_every_expected_backbone_is_registered():
    assert RESNETS == sorted(FEATURE_DIMS)
    assert "timm" in BACKBONES


@pytest.mark.parametrize("name", RESNETS)
def test_backbone_forward_shapes_layers_and_no_nans(name: str):
    torch.manual_seed(0)
    backbone = create_backbone(name)
    x = torch.randn(2, 3, 32, 32)
    features = backbone.forward_features(x)
    size = LAYER4_SIZE[name]
    assert features.shape == (2, FEATURE_DIMS[name], size, size)
    pooled = backbone(x)
    assert backbone.feature_dim == FEATURE_DIMS[name]
    assert pooled.shape == (2, FEATURE_DIMS[name])
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    assert backbone.layer_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    for layer in backbone.layer_names:
        assert backbone.get_layer(layer) is getattr(backbone, layer)
    assert backbone.default_layer == "layer4"


def test_get_layer_error_lists_valid_names():
    with pytest.raises(ValueError, match="stem, layer1, layer2, layer3, layer4"):
        create_backbone("resnet-tiny").get_layer("fc")


def test_stems():
    cifar, imagenet = create_backbone("resnet18-cifar"), create_backbone("resnet18")
    assert cifar.stem.conv1.kernel_size == (3, 3) and cifar.stem.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    assert imagenet.stem.conv1.kernel_size == (7, 7) and imagenet.stem.conv1.stride == (2, 2)
    assert isinstance(imagenet.stem.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_same_architecture_as_torchvision(name: str):
    reference = getattr(torchvision.models, name)(weights=None)
    ours = create_backbone(name)
    reference_shapes = {
        k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")
    }
    ours_shapes = {k.removeprefix("stem."): v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == reference_shapes


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_round_trip(name: str):
    torch.manual_seed(1)
    reference = getattr(torchvision.models, name)(weights=None)
    # Non-trivial BatchNorm statistics, so a wrongly mapped buffer would show.
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    reference.eval()
    ours = create_backbone(name).eval()
    report = load_torchvision_state_dict(ours, reference.state_dict())
    assert report.dropped == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(ours.state_dict())
    reference.fc = nn.Identity()  # torchvision's forward then returns the flattened avgpool
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_checkpoints_older_than_num_batches_tracked_load():
    # Saved before PyTorch 0.4.1, as torchvision's first ResNet files: no BatchNorm counters.
    source = torchvision.models.resnet18(weights=None).state_dict()
    source["layer1.0.bn1.running_var"].uniform_(0.5, 1.5)
    old = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    ours = create_backbone("resnet18")
    load_torchvision_state_dict(ours, old)
    torch.testing.assert_close(ours.layer1[0].bn1.running_var, source["layer1.0.bn1.running_var"])


def test_torchvision_import_lists_missing_unexpected_and_mismatched_keys():
    source = torchvision.models.resnet18(weights=None).state_dict()
    deeper = create_backbone("resnet34")
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: layer1\.2\.bn1\.bias, .*\(80 in all\)$"
    ):
        load_torchvision_state_dict(deeper, source)
    assert all(torch.equal(v, before[k]) for k, v in deeper.state_dict().items())

    with pytest.raises(ValueError, match=r"shape mismatches: stem\.conv1\.weight"):
        load_torchvision_state_dict(create_backbone("resnet18-cifar"), source)

    extra = dict(source, **{"layer5.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"not in this backbone: layer5\.weight"):
        load_torchvision_state_dict(create_backbone("resnet18"), extra)

    with pytest.raises(TypeError, match="sslens ResNet"):
        load_torchvision_state_dict(nn.Linear(2, 2), source)


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    tiny = create_backbone("resnet-tiny", zero_init_residual=True)
    assert all(not block.bn2.weight.any() for block in tiny.layer1)
    deep = create_backbone("resnet50", zero_init_residual=True)
    assert all(not block.bn3.weight.any() for block in deep.layer4)
    assert create_backbone("resnet-tiny").layer1[0].bn2.weight.all()


def test_resnet_validates_arguments():
    from torchvision.models.resnet import BasicBlock

    with pytest.raises(ValueError, match="stem must be one of imagenet, cifar"):
        ResNet(BasicBlock, (1, 1, 1, 1), stem="tiny")
    with pytest.raises(ValueError, match="blocks_per_stage"):
        ResNet(BasicBlock, (1, 1, 1))
    with pytest.raises(TypeError, match="zero_init_residual"):
        create_backbone("resnet-tiny", zero_init_residual="yes")


def test_projection_head_structure_and_shapes():
    head = ProjectionHead(16, 32, 8)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].bias is None and head[3].bias is not None
    assert head(torch.randn(4, 16)).shape == (4, 8)

    no_bn = ProjectionHead(16, 32, 8, num_layers=3, batch_norm=False, last_bn=True)
    assert [type(m) for m in no_bn] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
    ]
    assert [m.out_features for m in no_bn if isinstance(m, nn.Linear)] == [32, 32, 8]
    linear = ProjectionHead(16, 32, 8, num_layers=1)
    assert len(linear) == 1 and linear[0].in_features == 16 and linear[0].out_features == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_dim": 0}, "in_dim"),
        ({"hidden_dim": 2.5}, "hidden_dim"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_projection_head_rejects_bad_arguments(kwargs, message):
    arguments = {"in_dim": 16, "hidden_dim": 32, "out_dim": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        ProjectionHead(**arguments)
