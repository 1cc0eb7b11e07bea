"""Barlow Twins, VICReg, DINO and BYOL checkpoints import exactly, in each published key layout.

The fake checkpoints are made by small copies of the authors' own modules, saved as their
training scripts save them, so key names, nesting and shapes are the published layouts:

* facebookresearch/barlowtwins ``main.py`` (``BarlowTwins``: backbone, projector, bn) and
  ``hubconf.py``;
* facebookresearch/vicreg ``resnet.py`` (its ResNet pads the input by 1 before a 7x7 conv with
  padding 2) and ``main_vicreg.py`` (``VICReg``, ``Projector``);
* facebookresearch/dino ``vision_transformer.py`` (``VisionTransformer``, ``DINOHead`` with its
  ``nn.utils.weight_norm`` last layer), ``utils.py`` (``MultiCropWrapper``) and ``main_dino.py``
  (``save_dict``);
* vturrisi/solo-learn ``solo/methods/byol.py`` over ``base.py`` (Lightning ``state_dict``), and
  chigur/byol-convert ``convert.py`` (DeepMind's BYOL as torchvision keys).

Each test compares the imported model's outputs with the source network's on the same input.
ResNet-50 layouts use full-size networks (one random ResNet-50 shared by the module, run on
32 px inputs); the others use ResNet-18s and heads a few units wide, whose architecture the
converters read off the keys like any other.
"""

from __future__ import annotations

import argparse
import urllib.error
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_import import random_state
from torch import nn

from sslens.errors import UserError
from sslens.published import (
    KNOWN_CHECKPOINTS,
    TRAINING_STATE,
    guess_format,
    guess_format_of_file,
    import_checkpoint,
    import_summary,
)
from sslens.store import load_model

torch.set_num_threads(1)

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every float tensor redrawn (:func:`random_state`), in eval mode."""
    model.load_state_dict(random_state(model, seed))
    return model.eval()


def resnet_without_fc(name: str, seed: int) -> torchvision.models.ResNet:
    """A torchvision ResNet whose ``fc`` is ``nn.Identity()``, as Barlow Twins' main.py, DINO's
    MultiCropWrapper and solo-learn's base.py leave their backbones."""
    model = getattr(torchvision.models, name)()
    model.fc = nn.Identity()
    return randomised(model, seed)


def import_and_load(tmp_path, checkpoint, format: str, name: str = "checkpoint.pth", **options):
    path = tmp_path / name
    torch.save(checkpoint, path)
    out = import_checkpoint(path, format, tmp_path / f"model-{format}", **options)
    method, meta = load_model(out)
    return method.eval(), meta, path


def assert_same_outputs(ours: nn.Module, theirs, x: torch.Tensor = IMAGES) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def resnet50() -> torchvision.models.ResNet:
    return resnet_without_fc("resnet50", seed=11)


def with_module_prefix(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """DistributedDataParallel's names: ``module.`` + ``prefix`` + key."""
    return {f"module.{prefix}{key}": value for key, value in state.items()}


# --- Barlow Twins (facebookresearch/barlowtwins main.py) -------------------------------------


class BarlowTwins(nn.Module):
    """main.py ``BarlowTwins``: ``backbone`` (torchvision ResNet, fc = Identity), ``projector``
    (Linear without bias, BatchNorm1d, ReLU per hidden layer; a last Linear without bias) and
    ``bn``, the affine-free BatchNorm1d the loss applies to the projections."""

    def __init__(self, backbone: nn.Module, sizes: list[int]):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def optimizer_state() -> dict:
    return {"state": {}, "param_groups": [{"lr": 0.2, "weight_decay": 1e-6, "params": [0, 1]}]}


def test_barlowtwins_full_checkpoint_keeps_backbone_and_projector(tmp_path):
    source = randomised(BarlowTwins(resnet_without_fc("resnet18", seed=1), [512, 32, 32, 16]), seed=2)
    checkpoint = {"epoch": 1000, "model": with_module_prefix(source.state_dict()), "optimizer": optimizer_state()}
    assert guess_format(checkpoint) == "barlowtwins"
    method, meta, _ = import_and_load(tmp_path, checkpoint, "barlowtwins")

    assert_same_outputs(method.backbone, source.backbone)
    assert_same_outputs(method.encoder("projection"), source.project)
    assert meta["source_layout"] == "Barlow Twins checkpoint.pth (backbone + projector)"
    assert meta["arch"] == "resnet18" and meta["kept"] == ["backbone", "projection_head"]
    assert meta["method_options"]["head"] == [
        ["linear", 512, 32, False], ["batchnorm", 32], ["relu"],
        ["linear", 32, 32, False], ["batchnorm", 32], ["relu"], ["linear", 32, 16, False],
    ]
    # Every key: the backbone's and projector's are loaded (compared above), the rest listed.
    assert meta["dropped"] == {
        next(reason for reason in meta["dropped"] if reason.startswith("Barlow Twins' loss normalisation")):
            ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"],
        TRAINING_STATE: ["epoch", "optimizer"],
    }
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["interpolation"] == "bilinear"


# --- VICReg (facebookresearch/vicreg resnet.py, main_vicreg.py) ------------------------------


class VICRegResNet(torchvision.models.ResNet):
    """vicreg resnet.py ``ResNet``: torchvision's module names without ``fc``; the input is
    padded by ``ConstantPad2d(1, 0.0)`` and conv1 (7x7, stride 2) pads by 2 more."""

    def __init__(self, block, layers):
        super().__init__(block, layers)
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
        del self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def vicreg_projector(sizes: list[int]) -> nn.Sequential:
    """main_vicreg.py ``Projector``: Linear (with bias), BatchNorm1d, ReLU; a last Linear without bias."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = VICRegResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
        self.projector = vicreg_projector([512, 32, 16])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def test_vicreg_full_checkpoint_keeps_backbone_and_projector(tmp_path):
    source = randomised(VICReg(), seed=3)
    checkpoint = {"epoch": 1000, "model": with_module_prefix(source.state_dict()), "optimizer": optimizer_state()}
    assert guess_format(checkpoint) == "vicreg"
    method, meta, _ = import_and_load(tmp_path, checkpoint, "vicreg")

    assert_same_outputs(method.backbone, source.backbone)
    assert_same_outputs(method.encoder("projection"), source.project)
    assert meta["source_layout"] == "VICReg full checkpoint (backbone + projector)"
    assert meta["method_options"]["head"] == [["linear", 512, 32, True], ["batchnorm", 32], ["relu"],
                                              ["linear", 32, 16, False]]
    assert meta["dropped"] == {TRAINING_STATE: ["epoch", "optimizer"]}


# --- The backbone-only ResNet-50 releases: bare torchvision keys without fc ------------------


@pytest.mark.parametrize(("format", "layout", "interpolation"), [
    ("barlowtwins", "Barlow Twins resnet50.pth (backbone only)", "bilinear"),
    ("vicreg", "VICReg resnet50.pth (backbone only)", "bilinear"),
    ("dino", "DINO ResNet-50 backbone (dino_resnet50_pretrain.pth)", "bicubic"),
])
def test_backbone_only_resnet50_releases(tmp_path, resnet50, format, layout, interpolation):
    state = resnet50.state_dict()
    # A bare torchvision layout: the keys cannot say which project made it (docs/MODELS.md).
    assert guess_format(state) == "torchvision"
    method, meta, _ = import_and_load(tmp_path, state, format, name="resnet50.pth")

    assert_same_outputs(method.backbone, resnet50)
    if format == "vicreg":  # its own resnet.py: padding layer + conv1 padding 2 = torchvision's 3
        vicreg = VICRegResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]).eval()
        vicreg.load_state_dict(state, strict=True)
        assert_same_outputs(method.backbone, vicreg)
    assert meta["source_layout"] == layout and meta["arch"] == "resnet50"
    assert meta["kept"] == ["backbone"] and meta["dropped"] == {}
    assert meta["interpolation"] == interpolation and meta["crop_pct"] == 0.875


@pytest.mark.parametrize("format", ["barlowtwins", "vicreg", "dino"])
def test_backbone_only_formats_refuse_a_supervised_classifier(tmp_path, format):
    state = random_state(torchvision.models.resnet18(), seed=4)  # with fc: an ImageNet-supervised model
    torch.save(state, tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match=r"has no fc .*fc\.bias, fc\.weight.*--format torchvision"):
        import_checkpoint(tmp_path / "resnet18.pth", format, tmp_path / "m")


# --- DINO (facebookresearch/dino vision_transformer.py, utils.py, main_dino.py) --------------


class DinoAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DinoMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), DinoMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class DinoViT(nn.Module):
    """vision_transformer.py ``vit_small`` (``num_classes=0``), at the input size it was built for
    (``interpolate_pos_encoding`` then returns ``pos_embed`` unchanged)."""

    def __init__(self, img_size: int = 32, patch: int = 16, dim: int = 384, depth: int = 2, num_heads: int = 6):
        super().__init__()
        self.patch_embed = DinoPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class DINOHead(nn.Module):
    """vision_transformer.py ``DINOHead``: an MLP to the bottleneck, L2 normalisation, and a
    weight-normalised bias-free Linear to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool, nlayers: int, hidden_dim: int = 32,
                 bottleneck_dim: int = 16):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else [])
                layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        with warnings.catch_warnings():
            # DINO uses the deprecated nn.utils.weight_norm, whose weight_g/weight_v names are the
            # published layout (the parametrizations API names them differently).
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """utils.py ``MultiCropWrapper`` for one resolution: ``backbone`` then ``head``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def dino_args(**overrides) -> argparse.Namespace:
    """main_dino.py's args (a few of them), saved as the argparse.Namespace it is."""
    values = {"arch": "vit_small", "patch_size": 16, "out_dim": 10, "norm_last_layer": True, "use_bn_in_head": False,
              "epochs": 800, "teacher_temp": 0.07, "output_dir": "/checkpoint/dino", "global_crops_scale": (0.25, 1.0)}
    return argparse.Namespace(**{**values, **overrides})


def dino_save_dict(student: nn.Module, teacher: nn.Module, args: argparse.Namespace, ddp_teacher: bool) -> dict:
    """main_dino.py ``save_dict``; the student is always DDP-wrapped, the teacher only when it
    has batch norms (ResNets)."""
    teacher_state = teacher.state_dict()
    return {
        "student": with_module_prefix(student.state_dict()),
        "teacher": with_module_prefix(teacher_state) if ddp_teacher else teacher_state,
        "optimizer": optimizer_state(),
        "epoch": 800,
        "args": args,
        "dino_loss": {"center": torch.randn(1, 10)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 17},
    }


def test_dino_vit_backbone_only_becomes_the_timm_vit(tmp_path):
    pytest.importorskip("timm")
    source = randomised(DinoViT(), seed=5)
    state = source.state_dict()
    assert guess_format(state) == "timm"  # DINO's ViT keys are timm's
    method, meta, _ = import_and_load(tmp_path, state, "dino", name="dino_deitsmall16_pretrain.pth")

    assert_same_outputs(method.backbone, source)
    assert meta["backbone"] == "timm" and meta["arch"] == "vit_small_patch16_224.dino"
    assert meta["backbone_options"] == {"model_name": "vit_small_patch16_224.dino", "img_size": 32, "depth": 2}
    ours = method.backbone.model.state_dict()
    assert set(ours) == set(state) and all(torch.equal(ours[key], state[key]) for key in state)
    assert meta["image_size"] == [32, 32] and meta["interpolation"] == "bicubic" and meta["crop_pct"] == 0.875
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["dropped"] == {}


def test_an_imported_dino_vit_shows_the_class_attention_dinos_own_code_shows(tmp_path):
    """visualize_attention.py reads ``get_last_selfattention(img)[0, :, 0, 1:]``: the last block's
    class-token attention per head. cls-attention of the imported model must be that, upsampled."""
    pytest.importorskip("timm")
    from sslens.explain.base import create_explainer

    source = randomised(DinoViT(), seed=5).eval()
    method, _, _ = import_and_load(tmp_path, source.state_dict(), "dino", name="dino_deitsmall16_pretrain.pth")
    last = source.blocks[-1].attn
    recorded = []

    def attention_of(x: torch.Tensor) -> torch.Tensor:  # DinoAttention.forward, keeping attn
        B, N, C = x.shape
        q, k, v = last.qkv(x).reshape(B, N, 3, last.num_heads, C // last.num_heads).permute(2, 0, 3, 1, 4)
        recorded.append(((q @ k.transpose(-2, -1)) * last.scale).softmax(dim=-1))
        return last.proj((recorded[-1] @ v).transpose(1, 2).reshape(B, N, C))

    last.forward = attention_of
    with torch.no_grad():
        source(IMAGES)
    heads = recorded[0][:, :, 0, 1:].reshape(len(IMAGES), -1, 2, 2)  # 32 px / 16-px patches
    expected = F.interpolate(heads, size=IMAGES.shape[-2:], mode="bilinear", align_corners=False)
    explanation = create_explainer("cls-attention", method.encoder("pooled"))(IMAGES)
    for head in range(6):
        torch.testing.assert_close(explanation.components[f"head{head}"], expected[:, head], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(explanation.importance, expected.mean(dim=1), rtol=1e-4, atol=1e-6)


def test_dino_full_checkpoint_keeps_the_teacher_and_its_head(tmp_path):
    pytest.importorskip("timm")
    student = randomised(MultiCropWrapper(DinoViT(), DINOHead(384, 10, use_bn=False, nlayers=3)), seed=6)
    teacher = randomised(MultiCropWrapper(DinoViT(), DINOHead(384, 10, use_bn=False, nlayers=3)), seed=7)
    checkpoint = dino_save_dict(student, teacher, dino_args(), ddp_teacher=False)
    assert guess_format(checkpoint) == "dino"
    method, meta, _ = import_and_load(tmp_path, checkpoint, "dino", name="dino_deitsmall16_pretrain_full_checkpoint.pth")

    assert_same_outputs(method.backbone, teacher.backbone)
    assert_same_outputs(method.encoder("projection"), lambda x: teacher.head.mlp(teacher.backbone(x)))
    # The head's K logits: weight_norm's last layer over the L2-normalised bottleneck.
    assert_same_outputs(method.encoder("prototypes"), teacher)
    assert meta["source_layout"] == "DINO full checkpoint, ViT teacher (backbone + head)"
    assert meta["kept"] == ["backbone", "projection_head", "prototypes"]
    assert meta["method_options"] == {
        "head": [["linear", 384, 32, True], ["gelu"], ["linear", 32, 32, True], ["gelu"], ["linear", 32, 16, True]],
        "num_prototypes": 10,
    }
    student_keys = sorted(f"student.{key}" for key in checkpoint["student"])
    assert meta["dropped"] == {
        next(reason for reason in meta["dropped"] if reason.startswith("student network")): student_keys,
        TRAINING_STATE: ["args", "dino_loss", "epoch", "fp16_scaler", "optimizer"],
    }
    assert meta["source_hparams"] == {"arch": "vit_small", "patch_size": 16, "out_dim": 10, "norm_last_layer": True,
                                      "use_bn_in_head": False, "epochs": 800, "teacher_temp": 0.07}


@pytest.mark.parametrize(("use_bn", "nlayers"), [(True, 3), (False, 1)], ids=["bn-3-layers", "one-linear"])
def test_dino_full_checkpoint_with_a_resnet_teacher(tmp_path, use_bn, nlayers):
    teacher = randomised(MultiCropWrapper(resnet_without_fc("resnet18", seed=8),
                                          DINOHead(512, 10, use_bn=use_bn, nlayers=nlayers)), seed=9)
    # The student's values do not matter here (it is dropped); the teacher stands in for it.
    checkpoint = dino_save_dict(teacher, teacher, dino_args(arch="resnet18", use_bn_in_head=use_bn), ddp_teacher=True)
    method, meta, _ = import_and_load(tmp_path, checkpoint, "dino")

    assert_same_outputs(method.backbone, teacher.backbone)
    assert_same_outputs(method.encoder("prototypes"), teacher)
    assert meta["arch"] == "resnet18" and meta["interpolation"] == "bicubic"
    kinds = [layer[0] for layer in meta["method_options"]["head"]]
    assert kinds == (["linear", "batchnorm", "gelu"] * 2 + ["linear"] if use_bn else ["linear"])
    assert sum(len(keys) for keys in meta["dropped"].values()) == len(checkpoint["student"]) + 5


def test_dino_args_must_agree_with_the_keys(tmp_path):
    pytest.importorskip("timm")
    teacher = randomised(MultiCropWrapper(DinoViT(), DINOHead(384, 10, use_bn=False, nlayers=3)), seed=12)
    checkpoint = dino_save_dict(teacher, teacher, dino_args(patch_size=8), ddp_teacher=False)
    torch.save(checkpoint, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match=r"keys hold a vit_small_patch16_224, although its args say arch 'vit_small', "
                                        r"patch_size 8"):
        import_checkpoint(tmp_path / "mixed.pth", "dino", tmp_path / "m")


def test_dino_vit_of_another_size_points_to_timm(tmp_path):
    state = randomised(DinoViT(dim=192, num_heads=3, depth=1), seed=13).state_dict()
    torch.save(state, tmp_path / "vit_tiny.pth")
    with pytest.raises(UserError, match=r"width 192 and 16x16 patches.*--format timm --timm-name"):
        import_checkpoint(tmp_path / "vit_tiny.pth", "dino", tmp_path / "m")


# --- BYOL: solo-learn (solo/methods/byol.py) and chigur/byol-convert -------------------------


def byol_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """solo-learn BYOL's projector and predictor: Linear, BatchNorm1d, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


class SoloBYOL(nn.Module):
    """solo-learn ``BYOL`` over ``BaseMomentumMethod``: online backbone, classifier, projector,
    predictor; momentum backbone and projector; a momentum classifier when configured."""

    def __init__(self, stem: str = "imagenet"):
        super().__init__()
        self.backbone = resnet_without_fc("resnet18", seed=14)
        self.momentum_backbone = resnet_without_fc("resnet18", seed=15)
        if stem == "cifar":  # solo/methods/base.py for cifar10/cifar100
            for backbone in (self.backbone, self.momentum_backbone):
                backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
                backbone.maxpool = nn.Identity()
        self.classifier = nn.Linear(512, 10)
        self.projector, self.momentum_projector = byol_mlp(512, 32, 16), byol_mlp(512, 32, 16)
        self.predictor = byol_mlp(16, 32, 16)
        self.momentum_classifier = nn.Linear(512, 10)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def lightning_checkpoint(model: nn.Module) -> dict:
    """What pytorch-lightning's ``trainer.save_checkpoint`` writes (solo/utils/checkpointer.py)."""
    return {"epoch": 399, "global_step": 1000, "pytorch-lightning_version": "2.0.2", "state_dict": model.state_dict(),
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 399}}}}, "callbacks": {},
            "optimizer_states": [optimizer_state()], "lr_schedulers": [{"last_epoch": 399}]}


def test_byol_solo_learn_keeps_online_backbone_and_projector(tmp_path):
    source = randomised(SoloBYOL(), seed=16)
    checkpoint = lightning_checkpoint(source)
    assert guess_format(checkpoint) == "byol"
    method, meta, _ = import_and_load(tmp_path, checkpoint, "byol", name="byol-imagenet100.ckpt")

    assert_same_outputs(method.backbone, source.backbone)
    assert_same_outputs(method.encoder("projection"), source.project)
    assert meta["source_layout"] == "solo-learn BYOL (backbone + projector)" and meta["arch"] == "resnet18"
    state = checkpoint["state_dict"]

    def under(*prefixes):
        return sorted(key for key in state if key.startswith(prefixes))

    reasons = {reason.split(" ", 1)[0]: reason for reason in meta["dropped"]}
    assert meta["dropped"] == {
        reasons["BYOL"]: under("predictor."),
        reasons["momentum"]: under("momentum_backbone.", "momentum_projector."),
        reasons["solo-learn's"]: under("classifier.", "momentum_classifier."),
        TRAINING_STATE: ["callbacks", "epoch", "global_step", "loops", "lr_schedulers", "optimizer_states",
                         "pytorch-lightning_version"],
    }


def test_byol_solo_learn_cifar_stem_is_refused(tmp_path):
    torch.save(lightning_checkpoint(SoloBYOL(stem="cifar")), tmp_path / "byol-cifar10.ckpt")
    with pytest.raises(UserError, match=r"3x3 conv1 with padding=2"):
        import_checkpoint(tmp_path / "byol-cifar10.ckpt", "byol", tmp_path / "m")


def test_solo_learn_mocov3_is_not_byol(tmp_path):
    # solo-learn MoCo v3 also has momentum_backbone and predictor; its projector ends in a
    # bias-free Linear and an affine-free BatchNorm1d.
    model = SoloBYOL()
    model.projector = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                                    nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False))
    checkpoint = lightning_checkpoint(model)
    assert guess_format(checkpoint) is None
    torch.save(checkpoint, tmp_path / "mocov3.ckpt")
    with pytest.raises(UserError, match=r"other solo-learn methods with a momentum backbone"):
        import_checkpoint(tmp_path / "mocov3.ckpt", "byol", tmp_path / "m")


def test_byol_deepmind_via_chigur_records_its_padding(tmp_path, resnet50):
    # convert.py: torchvision names, BYOL's online classifier as fc, no num_batches_tracked.
    generator = torch.Generator().manual_seed(17)
    state = {key: value for key, value in resnet50.state_dict().items() if not key.endswith("num_batches_tracked")}
    state |= {"fc.weight": torch.randn(1000, 2048, generator=generator), "fc.bias": torch.randn(1000, generator=generator)}
    assert guess_format(state) == "torchvision"
    method, meta, path = import_and_load(tmp_path, state, "byol", name="pretrain_res50x1.pth.tar")

    # sslens computes the torchvision ResNet-50 of these weights, not the TF-padded original.
    assert_same_outputs(method.backbone, resnet50)
    assert meta["source_layout"].startswith("DeepMind BYOL converted by chigur/byol-convert")
    assert meta["dropped"] == {"classifier (supervised head, not part of the representation)": ["fc.bias", "fc.weight"]}
    assert len(meta["departures"]) == 1 and "'SAME'" in meta["departures"][0]
    assert "departs from the source: DeepMind's BYOL" in import_summary(tmp_path / "model-byol")


def test_byol_lucidrains_saved_net_and_learner(tmp_path):
    net = randomised(torchvision.models.resnet18(), seed=18)  # README: torch.save(resnet.state_dict(), ...)
    method, meta, _ = import_and_load(tmp_path, net.state_dict(), "byol", name="improved-net.pt")
    # byol-pytorch's representation: the output of the net's children()[-2] (avgpool), flattened.
    trunk = nn.Sequential(*list(net.children())[:-1])
    assert_same_outputs(method.backbone, lambda x: torch.flatten(trunk(x), 1))
    assert meta["source_layout"].startswith("torchvision-named ResNet (as lucidrains/byol-pytorch saves")
    assert "departures" not in meta

    # The learner's own state dict (BYOL(net, ...).state_dict()) is refused with how to re-save it.
    learner = {f"{prefix}{key}": value for prefix in ("net.", "online_encoder.net.") for key, value in net.state_dict().items()}
    learner |= {"online_encoder.projector.0.weight": torch.zeros(8, 512)}
    assert guess_format(learner) == "byol"
    torch.save(learner, tmp_path / "learner.pt")
    with pytest.raises(UserError, match=r"torch\.save\(resnet\.state_dict\(\), 'net\.pt'\)"):
        import_checkpoint(tmp_path / "learner.pt", "byol", tmp_path / "m")


# --- Telling the formats apart --------------------------------------------------------------


def barlowtwins_checkpoint() -> dict:
    source = BarlowTwins(resnet_without_fc("resnet18", seed=19), [512, 16, 8])
    return {"epoch": 1, "model": with_module_prefix(source.state_dict()), "optimizer": optimizer_state()}


def vicreg_checkpoint() -> dict:
    return {"epoch": 1, "model": with_module_prefix(VICReg().state_dict()), "optimizer": optimizer_state()}


def dino_checkpoint() -> dict:
    network = MultiCropWrapper(resnet_without_fc("resnet18", seed=20), DINOHead(512, 10, use_bn=False, nlayers=3))
    return dino_save_dict(network, network, dino_args(arch="resnet18"), ddp_teacher=True)


def byol_checkpoint() -> dict:
    return lightning_checkpoint(SoloBYOL())


@pytest.fixture(scope="module")
def family_files(tmp_path_factory) -> dict:
    """One full checkpoint file per family, made once for the module."""
    folder = tmp_path_factory.mktemp("families")
    files = {}
    for name, make in [("barlowtwins", barlowtwins_checkpoint), ("vicreg", vicreg_checkpoint),
                       ("dino", dino_checkpoint), ("byol", byol_checkpoint)]:
        files[name] = folder / f"{name}.pth"
        torch.save(make(), files[name])
    return files


@pytest.mark.parametrize(("made_by", "given"), [
    ("barlowtwins", "vicreg"), ("vicreg", "barlowtwins"), ("dino", "moco"), ("byol", "swav"),
    ("barlowtwins", "torchvision"), ("vicreg", "dino"), ("dino", "byol"), ("byol", "barlowtwins"),
])
def test_wrong_format_names_the_right_one(tmp_path, family_files, made_by, given):
    path = family_files[made_by]
    assert guess_format_of_file(path) == made_by
    with pytest.raises(UserError, match=rf"This looks like a '{made_by}' checkpoint: pass --format {made_by}\."):
        import_checkpoint(path, given, tmp_path / "m")


def test_download_names_of_the_new_families(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    # Barlow Twins and VICReg both publish a resnet50.pth; sslens's names carry the project.
    assert KNOWN_CHECKPOINTS["barlowtwins-resnet50.pth"].url.endswith("/barlowtwins/ljng/resnet50.pth")
    assert KNOWN_CHECKPOINTS["vicreg-resnet50.pth"].url == "https://dl.fbaipublicfiles.com/vicreg/resnet50.pth"
    known = KNOWN_CHECKPOINTS["dino_deitsmall16_pretrain_full_checkpoint.pth"]
    with pytest.raises(UserError, match="offline") as info:
        import_checkpoint("dino_deitsmall16_pretrain_full_checkpoint.pth", "dino", tmp_path / "m", download=True,
                          cache_dir=tmp_path / "cache")
    assert known.url in str(info.value)
    with pytest.raises(UserError, match="use --format vicreg"):
        import_checkpoint("vicreg-resnet50_fullckpt.pth", "barlowtwins", tmp_path / "m", download=True)
