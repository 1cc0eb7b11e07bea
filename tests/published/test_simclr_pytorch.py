"""AndrewAtanov/simclr-pytorch checkpoints (the reference report's SimCLR ResNet-50) import exactly.

The fake checkpoints are made by a copy of that repository's own modules (``models/resnet.py``
``ResNetEncoder``, ``models/encoder.py`` ``EncodeProject``) and saved as its ``train.py`` saves
them, so key names, shapes and the pickled ``argparse.Namespace`` hparams are the real layout.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
from collections import OrderedDict

import pytest
import torch
import torchvision
from test_import import random_state
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from sslens.errors import UserError
from sslens.published import guess_format_of_file, import_checkpoint
from sslens.store import load_model

torch.set_num_threads(1)


class ResNetEncoder(torchvision.models.resnet.ResNet):
    """simclr-pytorch ``models/resnet.py``: a torchvision ResNet whose ``fc`` is kept but never
    called; ``cifar_head`` swaps conv1 for a 3x3 stride-1 conv and skips the max-pool."""

    def __init__(self, block, layers, cifar_head):
        super().__init__(block, layers)
        self.cifar_head = cifar_head
        if cifar_head:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = self._norm_layer(64)
            self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if not self.cifar_head:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class BatchNorm1dNoBias(nn.BatchNorm1d):
    """simclr-pytorch ``models/encoder.py``: its bias is frozen, yet saved in the state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias.requires_grad = False


class EncodeProject(nn.Module):
    """simclr-pytorch ``models/encoder.py``: ``convnet`` then the ``projection`` head."""

    def __init__(self, arch: str, data: str):
        super().__init__()
        block, layers, dim = {"ResNet50": (Bottleneck, [3, 4, 6, 3], 2048), "resnet18": (BasicBlock, [2, 2, 2, 2], 512)}[arch]
        self.convnet = ResNetEncoder(block, layers, cifar_head=data == "cifar")
        self.projection = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(dim, dim, bias=False)),
            ("bn1", nn.BatchNorm1d(dim)),
            ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(dim, 128, bias=False)),
            ("bn2", BatchNorm1dNoBias(128)),
        ]))

    def forward(self, x, out="z"):
        h = self.convnet(x)
        return h if out == "h" else self.projection(h)


def simclr_pytorch_model(arch: str, data: str, seed: int = 0) -> EncodeProject:
    model = EncodeProject(arch, data)
    model.load_state_dict(random_state(model, seed))
    return model.eval()


def save_like_train_py(model: EncodeProject, arch: str, data: str, path: pathlib.Path) -> dict:
    """train.py ``save_checkpoint``: ``SimCLR.get_ckpt()`` (state_dict + hparams) plus the optimizer
    state and iteration; the hparams are the argparse Namespace, ``root`` a PosixPath set by myexman."""
    hparams = argparse.Namespace(
        problem="sim-clr", arch=arch, data=data, batch_size=1024, iters=48000, temperature=0.5, lr=4.0,
        opt="lars", dist="ddp", root=pathlib.PosixPath("/logs/exman-train.py/runs/000001"),
    )
    checkpoint = {"state_dict": model.state_dict(), "hparams": hparams,
                  "opt_state_dict": {"state": {}, "param_groups": [{"lr": 4.0, "params": [0, 1]}]}, "iter": None}
    torch.save(checkpoint, path)
    return checkpoint


VARIANTS = [
    # (hparams arch, hparams data, sslens backbone, image size)
    ("resnet18", "cifar", "resnet18-cifar", 32),
    ("resnet18", "imagenet", "resnet18", 224),
    ("ResNet50", "cifar", "resnet50-cifar", 32),  # the reference report's CIFAR-10 model
]


@pytest.mark.parametrize(("arch", "data", "backbone", "size"), VARIANTS, ids=[v[2] for v in VARIANTS])
def test_round_trip_keeps_stem_head_and_normalisation(tmp_path, arch, data, backbone, size):
    model = simclr_pytorch_model(arch, data)
    path = tmp_path / "checkpoint.pth.tar"
    save_like_train_py(model, arch, data, path)
    with pytest.raises(pickle.UnpicklingError):  # the file really pickles the Namespace
        torch.load(path, weights_only=True)
    method, meta = load_model(import_checkpoint(path, "simclr", tmp_path / "m"))

    assert meta["arch"] == backbone and meta["backbone"] == backbone
    assert meta["source_layout"] == "AndrewAtanov/simclr-pytorch (convnet + projection)"
    convnet = {k: v for k, v in model.convnet.state_dict().items() if not k.startswith("fc.")}
    ours = method.backbone.state_dict()
    assert set(ours) == {f"stem.{k}" if k.startswith(("conv1.", "bn1.")) else k for k in convnet}
    for key, value in convnet.items():
        assert torch.equal(ours[f"stem.{key}" if key.startswith(("conv1.", "bn1.")) else key], value), key
    dim = 2048 if arch == "ResNet50" else 512
    assert meta["method_options"]["head"] == [
        ["linear", dim, dim, False], ["batchnorm", dim], ["relu"], ["linear", dim, 128, False], ["batchnorm", 128]
    ]
    projection = model.projection.state_dict()
    for key, value in method.projector.state_dict().items():
        index, param = key.split(".", 1)
        assert torch.equal(value, projection[f"{['fc1', 'bn1', 'relu1', 'fc2', 'bn2'][int(index)]}.{param}"]), key

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.encoder("pooled")(x), model(x, out="h"))
        torch.testing.assert_close(method.encoder("projection")(x), model(x))

    # ToTensor() inputs, unnormalised; the CIFAR stem takes 32 px images uncropped.
    assert meta["mean"] == [0.0, 0.0, 0.0] and meta["std"] == [1.0, 1.0, 1.0]
    assert meta["image_size"] == [size, size]
    assert meta["crop_pct"] == (1.0 if data == "cifar" else 0.875)
    assert meta["kept"] == ["backbone", "projection_head"]
    assert meta["dropped"] == {
        "unused torchvision classifier (ResNetEncoder.forward never calls convnet.fc)": ["convnet.fc.bias", "convnet.fc.weight"]
    }
    assert meta["source_hparams"] == {"problem": "sim-clr", "arch": arch, "data": data, "batch_size": 1024,
                                      "iters": 48000, "temperature": 0.5}
    # The allow-list is lifted again after loading.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.fixture(scope="module")
def cifar_model() -> EncodeProject:
    return simclr_pytorch_model("resnet18", "cifar", seed=1)


def test_without_hparams_the_stem_comes_from_conv1(tmp_path, cifar_model):
    torch.save(cifar_model.state_dict(), tmp_path / "weights.pth")  # re-saved: bare, no hparams
    method, meta = load_model(import_checkpoint(tmp_path / "weights.pth", "simclr", tmp_path / "m"))
    assert meta["arch"] == "resnet18-cifar" and "source_hparams" not in meta
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.encoder("projection")(x), cifar_model(x))


def test_explicit_arch_must_fit_the_keys_and_the_hparams(tmp_path, cifar_model):
    path = tmp_path / "checkpoint.pth.tar"
    save_like_train_py(cifar_model, "resnet18", "cifar", path)
    _, meta = load_model(import_checkpoint(path, "simclr", tmp_path / "ok", arch="resnet18-cifar"))
    assert meta["arch"] == "resnet18-cifar"
    with pytest.raises(UserError, match=r"holds a resnet18-cifar \(BasicBlock blocks 2-2-2-2, 3x3 CIFAR stem\); "
                                        r"--arch resnet18 does not fit. Pass --arch resnet18-cifar"):
        import_checkpoint(path, "simclr", tmp_path / "m", arch="resnet18")

    save_like_train_py(cifar_model, "resnet18", "imagenet", path)  # hparams that contradict the weights
    with pytest.raises(UserError, match=r"holds a resnet18-cifar .* although its hparams \(arch 'resnet18', "
                                        r"data 'imagenet'\) says resnet18"):
        import_checkpoint(path, "simclr", tmp_path / "m")


def test_unknown_projection_module_is_refused(tmp_path, cifar_model):
    state = dict(cifar_model.state_dict(), **{"projection.fc3.weight": torch.zeros(10, 128)})
    torch.save({"state_dict": state}, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(UserError, match=r"projection\.\{fc1,bn1,fc2,bn2\}.*Keys found: projection\.fc3\.weight"):
        import_checkpoint(tmp_path / "checkpoint.pth.tar", "simclr", tmp_path / "m")


@pytest.mark.parametrize("wrong", ["torchvision", "moco", "swav"])
def test_wrong_format_names_simclr(tmp_path, cifar_model, wrong):
    path = tmp_path / "checkpoint.pth.tar"
    save_like_train_py(cifar_model, "resnet18", "cifar", path)
    assert guess_format_of_file(path) == "simclr"
    with pytest.raises(UserError, match=r"^This looks like a 'simclr' checkpoint: pass --format simclr\."):
        import_checkpoint(path, wrong, tmp_path / "m")
