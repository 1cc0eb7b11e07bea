"""What the keys say: the ResNet (arch inference and its errors), the format, and safe loading."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from test_import import moco_checkpoint, random_state, swav_state, to_separius

from sslens.errors import UserError
from sslens.models import create_backbone
from sslens.models.resnet import RESNET_NAMES, ResNet, infer_resnet_arch, resnet_layout
from sslens.published import (
    guess_format,
    guess_format_of_file,
    import_checkpoint,
    load_checkpoint_file,
)
from sslens.store import load_model

torch.set_num_threads(1)


def torchvision_named(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An sslens ResNet's state dict under torchvision's names (``stem.conv1.*`` → ``conv1.*``)."""
    return {key.removeprefix("stem."): value for key, value in backbone.state_dict().items()}


@pytest.mark.parametrize("name", RESNET_NAMES)
def test_every_registered_resnet_is_inferred_from_its_keys(name):
    with torch.device("meta"):  # shapes only: nothing is allocated
        assert infer_resnet_arch(torchvision_named(create_backbone(name))) == name


@pytest.mark.parametrize(("model", "expected", "layout"), [
    ("resnet18", "resnet18", "BasicBlock blocks 2-2-2-2, 7x7 ImageNet stem"),
    ("resnet34", "resnet34", "BasicBlock blocks 3-4-6-3, 7x7 ImageNet stem"),
    ("resnet50", "resnet50", "Bottleneck blocks 3-4-6-3, 7x7 ImageNet stem"),
    ("resnet101", None, "Bottleneck blocks 3-4-23-3, 7x7 ImageNet stem"),
    ("wide_resnet50_2", None, "Bottleneck blocks 3-4-6-3, widths 128-256-512-1024, 7x7 ImageNet stem"),
])
def test_torchvision_models_are_named_or_described(model, expected, layout):
    with torch.device("meta"):
        state = getattr(torchvision.models, model)().state_dict()
    assert infer_resnet_arch(state) == expected
    assert str(resnet_layout(state)) == layout


def test_keys_that_are_no_resnet_have_no_layout():
    assert resnet_layout({"encoder.weight": torch.zeros(2)}) is None
    assert infer_resnet_arch({"conv1.weight": torch.zeros(64, 3, 7, 7)}) is None


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return random_state(torchvision.models.resnet18(), seed=0)


def test_weights_without_arch_are_imported_as_the_resnet_their_keys_describe(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    _, meta = load_model(import_checkpoint(tmp_path / "r18.pth", "torchvision", tmp_path / "m"))
    assert meta["arch"] == "resnet18" and meta["image_size"] == [224, 224]

    cifar = torchvision_named(create_backbone("resnet18-cifar"))
    torch.save(cifar, tmp_path / "r18c.pth")
    method, meta = load_model(import_checkpoint(tmp_path / "r18c.pth", "torchvision", tmp_path / "c"))
    assert meta["arch"] == "resnet18-cifar" and method.backbone.stem_type == "cifar"
    assert meta["image_size"] == [32, 32] and meta["crop_pct"] == 1.0
    ours = torchvision_named(method.backbone)
    assert all(torch.equal(ours[k], cifar[k]) for k in cifar)


def test_a_wrong_arch_says_what_the_keys_hold_in_one_short_sentence(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    with pytest.raises(UserError) as info:
        import_checkpoint(tmp_path / "r18.pth", "torchvision", tmp_path / "m", arch="resnet50")
    assert str(info.value) == (
        "The checkpoint holds a resnet18 (BasicBlock blocks 2-2-2-2, 7x7 ImageNet stem); --arch resnet50 does "
        "not fit. Pass --arch resnet18 or leave --arch out."
    )


def test_a_resnet_sslens_lacks_is_described_not_listed(tmp_path):
    odd = ResNet(torchvision.models.resnet.BasicBlock, (2, 1, 1, 1), (16, 32, 64, 128), stem="cifar")
    torch.save(torchvision_named(odd), tmp_path / "odd.pth")
    with pytest.raises(UserError) as info:
        import_checkpoint(tmp_path / "odd.pth", "torchvision", tmp_path / "m", arch="resnet18")
    message = str(info.value)
    assert message.startswith("The checkpoint holds a ResNet with BasicBlock blocks 2-1-1-1, widths 16-32-64-128, "
                              "3x3 CIFAR stem, which is none of sslens's ResNets")
    assert "layer1.1" not in message and len(message) < 400


def test_moco_uses_its_arch_field(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state, version=2)  # "arch": "resnet18"
    torch.save(checkpoint, tmp_path / "moco.pth.tar")
    _, meta = load_model(import_checkpoint(tmp_path / "moco.pth.tar", "moco", tmp_path / "m"))
    assert meta["arch"] == "resnet18"
    with pytest.raises(UserError, match=r"--arch resnet34 does not fit. Pass --arch resnet18 or leave --arch out"):
        import_checkpoint(tmp_path / "moco.pth.tar", "moco", tmp_path / "a", arch="resnet34")

    torch.save(dict(checkpoint, arch="resnet50"), tmp_path / "lying.pth.tar")
    with pytest.raises(UserError, match=r"holds a resnet18 .*, although its 'arch' field says resnet50"):
        import_checkpoint(tmp_path / "lying.pth.tar", "moco", tmp_path / "b")


def test_keys_too_partial_to_read_need_an_arch_sslens_has(tmp_path, resnet18_state):
    partial = {k: v for k, v in resnet18_state.items() if not k.startswith(("layer2.", "layer3.", "layer4."))}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"Cannot tell the ResNet of this checkpoint.*Pass --arch"):
        import_checkpoint(tmp_path / "partial.pth", "torchvision", tmp_path / "m")
    with pytest.raises(UserError, match=r"--arch: Unknown ResNet 'resnet5'. Did you mean 'resnet50'\?"):
        import_checkpoint(tmp_path / "partial.pth", "torchvision", tmp_path / "m", arch="resnet5")
    with pytest.raises(UserError, match=r"missing from the checkpoint: layer2\.0\.bn1\.bias"):
        import_checkpoint(tmp_path / "partial.pth", "torchvision", tmp_path / "m", arch="resnet18")


def separius(resnet_state):
    return {"resnet": {to_separius(k): v for k, v in resnet_state.items()}, "head": {}}


@pytest.mark.parametrize(("make", "expected"), [
    (lambda state: moco_checkpoint(state, version=2), "moco"),
    (swav_state, "swav"),
    (lambda state: {"state_dict": swav_state(state), "epoch": 800}, "swav"),
    (separius, "simclr"),
    (lambda state: {"state_dict": {f"convnet.{k}": v for k, v in state.items()}, "hparams": {}}, "simclr"),
    (lambda state: state, "torchvision"),
    (lambda state: {"state_dict": state}, "torchvision"),
    (lambda state: {"model": {"patch_embed.proj.weight": torch.zeros(1), "cls_token": torch.zeros(1)}}, "timm"),
    (lambda state: {"encoder.weight": torch.zeros(1)}, None),
    (lambda state: [state], None),
], ids=["moco", "swav", "swav-nested", "separius", "simclr-pytorch", "torchvision", "torchvision-nested", "timm",
        "unknown", "list"])
def test_guess_format(resnet18_state, make, expected):
    assert guess_format(make(resnet18_state)) == expected


@pytest.mark.parametrize(("make", "right", "wrong"), [
    (lambda state: moco_checkpoint(state, version=2), "moco", "swav"),
    (lambda state: moco_checkpoint(state, version=2), "moco", "torchvision"),
    (swav_state, "swav", "moco"),
    (swav_state, "swav", "torchvision"),
    (swav_state, "swav", "simclr"),
    (lambda state: state, "torchvision", "moco"),
    (separius, "simclr", "moco"),
    (separius, "simclr", "torchvision"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_a_wrong_format_says_which_format_the_file_looks_like(tmp_path, resnet18_state, make, right, wrong):
    path = tmp_path / "checkpoint.pth"
    torch.save(make(resnet18_state), path)
    assert guess_format_of_file(path) == right
    with pytest.raises(UserError, match=rf"^This looks like a '{right}' checkpoint: pass --format {right}\.") as info:
        import_checkpoint(path, wrong, tmp_path / "m", arch="resnet18")
    assert len(str(info.value)) < 1200


class RunsAShellCommand:
    """A checkpoint that, unpickled, would run a command: os.system, or eval of Python."""

    def __init__(self, marker, via):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "eval":
            return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("via", "calls"), [("os.system", "posix.system"), ("eval", "builtins.eval")])
def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path, resnet18_state, via, calls):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet18_state, "args": RunsAShellCommand(marker, via)}, path)
    for load in (load_checkpoint_file, guess_format_of_file,
                 lambda p: import_checkpoint(p, "torchvision", tmp_path / "m", arch="resnet18")):
        with pytest.raises(UserError) as info:
            load(path)
        message = str(info.value)
        assert f"would run code when loaded: its pickle calls {calls}" in message
        # torch's advice to retry with weights_only=False is neither relayed nor chained.
        assert "likely succeed" not in message and "re-save" not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="Cannot load .* Is it a complete PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "noise.pth")
