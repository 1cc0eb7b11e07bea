"""Importing published checkpoints: fake files in each published layout round-trip exactly."""

from __future__ import annotations

import hashlib
import json
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from sslens.errors import UserError
from sslens.published import (
    CHECKPOINT_FORMATS,
    KNOWN_CHECKPOINTS,
    import_checkpoint,
    import_summary,
)
from sslens.store import load_model

torch.set_num_threads(1)


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every float tensor redrawn, so a round trip proves something."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            # Small weights and positive variances keep activations finite through the network.
            drawn = torch.randn(value.shape, generator=generator)
            value = drawn.abs() + 0.5 if "running_var" in key else 0.05 * drawn
        state[key] = value.clone()
    return state


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    # torchvision's own names, not sslens's, so the layouts are those of the published files.
    return random_state(torchvision.models.resnet18(), seed=0)


def our_key(torchvision_key: str) -> str:
    return f"stem.{torchvision_key}" if torchvision_key.startswith(("conv1.", "bn1.")) else torchvision_key


def assert_backbone_equals(method: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    ours = method.backbone.state_dict()
    expected = {our_key(k): v for k, v in source.items() if not k.startswith("fc.")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def linear_head(dims: list[int], seed: int, prefix: str, bias: bool = True) -> dict[str, torch.Tensor]:
    """Linear layers at indices 0, 2, 4 ... (ReLUs between) with random weights."""
    generator = torch.Generator().manual_seed(seed)
    head = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        head[f"{prefix}{2 * i}.weight"] = torch.randn(d_out, d_in, generator=generator)
        if bias:
            head[f"{prefix}{2 * i}.bias"] = torch.randn(d_out, generator=generator)
    return head


def moco_checkpoint(resnet_state: dict[str, torch.Tensor], version: int) -> dict:
    """facebookresearch/moco main_moco.py's save: epoch, arch, state_dict, optimizer."""
    trunk = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    head = linear_head([512, 32, 16], seed=1, prefix="fc.") if version == 2 else {
        "fc.weight": torch.randn(16, 512), "fc.bias": torch.randn(16)
    }
    query = {**trunk, **head}
    state = {f"module.encoder_q.{k}": v for k, v in query.items()}
    state |= {f"module.encoder_k.{k}": v + 1 for k, v in query.items()}
    state |= {"module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"epoch": 200, "arch": "resnet18", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}


def test_moco_v2_round_trip(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state, version=2)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(checkpoint, path)
    out = import_checkpoint(path, "moco", tmp_path / "model", arch="resnet18")

    method, meta = load_model(out)
    assert_backbone_equals(method, resnet18_state)
    state = checkpoint["state_dict"]
    for ours, theirs in (("0.weight", "fc.0.weight"), ("0.bias", "fc.0.bias"),
                         ("2.weight", "fc.2.weight"), ("2.bias", "fc.2.bias")):
        assert torch.equal(method.projector.state_dict()[ours], state[f"module.encoder_q.{theirs}"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = method.backbone(x)
        expected = F.linear(F.relu(F.linear(h, state["module.encoder_q.fc.0.weight"], state["module.encoder_q.fc.0.bias"])),
                            state["module.encoder_q.fc.2.weight"], state["module.encoder_q.fc.2.bias"])
        torch.testing.assert_close(method.encoder("projection")(x), expected)

    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["source_format"] == "moco" and meta["source_layout"] == "MoCo v2 (MLP head)"
    assert meta["source_file"] == str(path.resolve()) and meta["arch"] == "resnet18"
    assert meta["kept"] == ["backbone", "projection_head"]
    encoder_k = sorted(k.removeprefix("module.") for k in state if k.startswith("module.encoder_k."))
    assert meta["dropped"]["momentum key encoder (encoder_k)"] == encoder_k
    assert meta["dropped"]["negatives queue"] == ["queue", "queue_ptr"]
    assert meta["image_size"] == [224, 224] and meta["crop_pct"] == 0.875
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert f"dropped {len(encoder_k)} keys: momentum key encoder" in import_summary(out)


def test_moco_v1_linear_head(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state, version=1)
    torch.save(checkpoint, tmp_path / "moco_v1.pth.tar")
    method, meta = load_model(import_checkpoint(tmp_path / "moco_v1.pth.tar", "moco", tmp_path / "m", arch="resnet18"))
    assert meta["source_layout"] == "MoCo v1 (linear head)"
    assert meta["method_options"]["head"] == [["linear", 512, 16, True]]
    assert torch.equal(method.projector[0].weight, checkpoint["state_dict"]["module.encoder_q.fc.weight"])


def swav_state(resnet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    head = {
        "projection_head.0.weight": torch.randn(32, 512, generator=generator),
        "projection_head.0.bias": torch.randn(32, generator=generator),
        "projection_head.1.weight": torch.rand(32, generator=generator),
        "projection_head.1.bias": torch.randn(32, generator=generator),
        "projection_head.1.running_mean": torch.randn(32, generator=generator),
        "projection_head.1.running_var": torch.rand(32, generator=generator) + 0.5,
        "projection_head.1.num_batches_tracked": torch.tensor(7),
        "projection_head.3.weight": torch.randn(16, 32, generator=generator),
        "projection_head.3.bias": torch.randn(16, generator=generator),
        "prototypes.weight": F.normalize(torch.randn(10, 16, generator=generator), dim=1),
    }
    trunk = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    return {f"module.{k}": v for k, v in {**trunk, **head}.items()}


@pytest.mark.parametrize("nested", [False, True], ids=["bare", "state_dict"])
def test_swav_keeps_head_and_prototypes(tmp_path, resnet18_state, nested):
    state = swav_state(resnet18_state)
    torch.save({"state_dict": state, "epoch": 800} if nested else state, tmp_path / "swav.pth.tar")
    method, meta = load_model(import_checkpoint(tmp_path / "swav.pth.tar", "swav", tmp_path / "m", arch="resnet18"))

    assert_backbone_equals(method, resnet18_state)
    assert meta["kept"] == ["backbone", "projection_head", "prototypes"]
    assert meta["method_options"] == {
        "head": [["linear", 512, 32, True], ["batchnorm", 32], ["relu"], ["linear", 32, 16, True]],
        "num_prototypes": 10,
    }
    head = {k.removeprefix("module.projection_head."): v for k, v in state.items() if "projection_head" in k}
    for key, value in method.projector.state_dict().items():
        assert torch.equal(value, head[key]), key
    assert torch.equal(method.prototypes.weight, state["module.prototypes.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = F.normalize(method.encoder("projection")(x), dim=1)
        torch.testing.assert_close(method.encoder("prototypes")(x), z @ state["module.prototypes.weight"].T)
    assert meta["dropped"] == {}


def to_separius(torchvision_key: str) -> str:
    """torchvision ResNet-50 name → Separius/SimCLRv2-Pytorch resnet.py name (written independently)."""
    parts = torchvision_key.split(".")
    if parts[0] == "conv1":
        return "net.0.0.weight"
    if parts[0] == "bn1":
        return f"net.0.1.0.{parts[1]}"
    if parts[0] == "fc":
        return torchvision_key
    stage, block, module, rest = parts[0][-1], parts[1], parts[2], parts[3:]
    prefix = f"net.{stage}.blocks.{block}"
    if module == "downsample":
        return f"{prefix}.projection.shortcut.weight" if rest[0] == "0" else f"{prefix}.projection.bn.0.{rest[1]}"
    index = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5}[module]
    return f"{prefix}.net.{index}.{rest[0]}" if module.startswith("conv") else f"{prefix}.net.{index}.0.{rest[0]}"


def test_simclr_v2_separius_layout(tmp_path):
    resnet50 = random_state(torchvision.models.resnet50(), seed=5)
    generator = torch.Generator().manual_seed(6)
    head = {}
    for i, (d_in, d_out) in enumerate([(2048, 32), (32, 32), (32, 16)]):
        head[f"layers.{3 * i}.weight"] = torch.randn(d_out, d_in, generator=generator)
        head[f"layers.{3 * i + 1}.weight"] = torch.rand(d_out, generator=generator)
        head[f"layers.{3 * i + 1}.bias"] = torch.randn(d_out, generator=generator)
        head[f"layers.{3 * i + 1}.running_mean"] = torch.randn(d_out, generator=generator)
        head[f"layers.{3 * i + 1}.running_var"] = torch.rand(d_out, generator=generator) + 0.5
        head[f"layers.{3 * i + 1}.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save({"resnet": {to_separius(k): v for k, v in resnet50.items()}, "head": head}, path)
    method, meta = load_model(import_checkpoint(path, "simclr", tmp_path / "m"))

    assert_backbone_equals(method, resnet50)
    assert meta["source_layout"] == "Separius/SimCLRv2-Pytorch (1x, sk0)"
    assert [layer[0] for layer in meta["method_options"]["head"]] == [
        "linear", "batchnorm", "relu", "linear", "batchnorm", "relu", "linear", "batchnorm"
    ]
    for key, value in method.projector.state_dict().items():
        assert torch.equal(value, head[f"layers.{key}"]), key
    # The TensorFlow SimCLR models take unnormalised [0, 1] RGB.
    assert meta["mean"] == [0.0, 0.0, 0.0] and meta["std"] == [1.0, 1.0, 1.0]
    assert meta["dropped"]["classifier (supervised head, not part of the representation)"] == ["fc.bias", "fc.weight"]


def test_simclr_selective_kernel_is_refused_with_the_supported_layouts(tmp_path):
    torch.save({"resnet": {"net.0.0.weight": torch.zeros(32, 3, 3, 3),
                           "net.1.blocks.0.net.2.main_conv.0.weight": torch.zeros(1)}, "head": {}},
               tmp_path / "r50_1x_sk1.pth")
    with pytest.raises(UserError, match="selective kernels") as info:
        import_checkpoint(tmp_path / "r50_1x_sk1.pth", "simclr", tmp_path / "m")
    assert "Separius/SimCLRv2-Pytorch r50_1x_sk0" in str(info.value)
    assert "tonylins/simclr-converter" in str(info.value)


def test_simclr_v1_tonylins_layout(tmp_path, resnet18_state):
    torch.save({"state_dict": resnet18_state}, tmp_path / "resnet50-1x.pth")
    method, meta = load_model(import_checkpoint(tmp_path / "resnet50-1x.pth", "simclr", tmp_path / "m", arch="resnet18"))
    assert_backbone_equals(method, resnet18_state)
    assert meta["kept"] == ["backbone"] and meta["std"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no projection head"):
        method.encoder("projection")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict(tmp_path, resnet18_state, suffix):
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(resnet18_state, path)
    else:
        torch.save(resnet18_state, path)
    method, meta = load_model(import_checkpoint(path, "torchvision", tmp_path / "m", arch="resnet18"))
    assert_backbone_equals(method, resnet18_state)
    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_weights_use_the_models_preprocessing(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with its 1000-class head
    state = random_state(model, seed=8)
    torch.save(state, tmp_path / "vit.pth")
    method, meta = load_model(
        import_checkpoint(tmp_path / "vit.pth", "timm", tmp_path / "m", timm_name="vit_tiny_patch16_224")
    )
    ours = method.backbone.model.state_dict()
    assert set(ours) == {k for k in state if not k.startswith("head.")}
    assert all(torch.equal(ours[k], state[k]) for k in ours)
    assert meta["dropped"]["classifier (supervised head, not part of the representation)"] == ["head.bias", "head.weight"]
    cfg = model.pretrained_cfg
    assert meta["backbone"] == "timm" and meta["backbone_options"] == {"model_name": "vit_tiny_patch16_224"}
    assert meta["mean"] == list(cfg["mean"]) and meta["crop_pct"] == cfg["crop_pct"]
    assert meta["interpolation"] == cfg["interpolation"] and meta["image_size"] == [224, 224]


def test_unknown_layout_lists_keys_and_formats(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(UserError) as info:
        import_checkpoint(tmp_path / "x.pth", "moco", tmp_path / "m")
    message = str(info.value)
    assert "decoder.bias" in message and "encoder.weight" in message
    assert ", ".join(sorted(CHECKPOINT_FORMATS)) in message


def test_unexpected_moco_entry_is_reported(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state, version=2)
    checkpoint["state_dict"]["module.predictor.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "moco.pth.tar")
    with pytest.raises(UserError, match="predictor.weight"):
        import_checkpoint(tmp_path / "moco.pth.tar", "moco", tmp_path / "m", arch="resnet18")


def test_missing_and_misshapen_keys_are_reported(tmp_path, resnet18_state):
    state = dict(resnet18_state)
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing from the checkpoint: layer4\.1\.conv2\.weight"):
        import_checkpoint(tmp_path / "partial.pth", "torchvision", tmp_path / "m", arch="resnet18")
    # A whole other architecture is named from the keys (test_inference.py); one odd tensor is listed.
    state = dict(resnet18_state, **{"layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(state, tmp_path / "misshapen.pth")
    with pytest.raises(UserError, match=r"shape mismatches: layer1\.0\.conv2\.weight: checkpoint \(64, 64, 1, 1\)"):
        import_checkpoint(tmp_path / "misshapen.pth", "torchvision", tmp_path / "m")
    assert not (tmp_path / "m").exists()


class CustomArgs:
    """Stands for the argparse/config objects some training scripts pickle into checkpoints."""

    learning_rate = 0.1


def test_checkpoint_needing_pickle_is_refused(tmp_path, resnet18_state):
    torch.save({"state_dict": resnet18_state, "args": CustomArgs()}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match=r"weights_only=True") as info:
        import_checkpoint(tmp_path / "pickled.pth", "torchvision", tmp_path / "m", arch="resnet18")
    message = str(info.value)
    # It names the class, and its advice fits a dict checkpoint (not torch's "will likely succeed").
    assert f"{CustomArgs.__module__}.CustomArgs" in message
    assert "{k: v for k, v in ckpt.items() if torch.is_tensor(v) or isinstance(v, dict)}" in message
    assert "model.state_dict()" not in message and "likely succeed" not in message


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="offline") as info:
        import_checkpoint("moco_v2_800ep_pretrain.pth.tar", "moco", tmp_path / "m", download=True,
                          cache_dir=tmp_path / "cache")
    assert KNOWN_CHECKPOINTS["moco_v2_800ep_pretrain.pth.tar"].url in str(info.value)
    with pytest.raises(UserError, match="use --format swav"):
        import_checkpoint("swav_800ep_pretrain.pth.tar", "moco", tmp_path / "m", download=True)


def test_download_uses_the_cached_file(tmp_path, monkeypatch, resnet18_state):
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(swav_state(resnet18_state), cache / "swav_800ep_pretrain.pth.tar")
    out = import_checkpoint("swav_800ep_pretrain.pth.tar", "swav", tmp_path / "m", arch="resnet18",
                            download=True, cache_dir=cache)
    assert json.loads((out / "meta.json").read_text())["source_file"] == str(cache / "swav_800ep_pretrain.pth.tar")


def test_imported_models_cannot_be_trained(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    method, _ = load_model(import_checkpoint(tmp_path / "r18.pth", "torchvision", tmp_path / "m", arch="resnet18"))
    with pytest.raises(UserError, match="does not train imported"):
        method.training_step([torch.zeros(2, 3, 32, 32)] * 2)
    with pytest.raises(UserError, match="not empty"):
        import_checkpoint(tmp_path / "r18.pth", "torchvision", tmp_path / "m", arch="resnet18")
    with pytest.raises(UserError, match="holds a resnet18 .*--arch resnet18-cifar does not fit"):
        import_checkpoint(tmp_path / "r18.pth", "torchvision", tmp_path / "c", arch="resnet18-cifar")


def test_published_checkpoints_work_directly_in_explain_and_study(tmp_path, resnet18_state, monkeypatch):
    """`sslens explain CKPT --format moco` and a study's {checkpoint, format} import once, then reuse."""
    from PIL import Image

    from sslens import published
    from sslens.cli import main
    from sslens.study import load_study_config, run_study

    path = tmp_path / "moco_v2.pth.tar"
    torch.save(moco_checkpoint(resnet18_state, version=2), path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))  # where the import cache lives
    image = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(path), "--format", "moco", "--arch", "resnet18", "--image", str(image),
              "--method", "relax", "--num-masks", "8", "--out", str(tmp_path / "maps"), "--device", "cpu"])
    assert exit_info.value.code in (0, None)
    assert (tmp_path / "maps" / "a_relax.npz").is_file()
    cached = list((tmp_path / "home" / ".cache" / "sslens" / "imported").iterdir())
    assert len(cached) == 1

    # The study finds the same import in the cache: importing again would raise.
    monkeypatch.setattr(published, "import_checkpoint", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-imported")))
    config = load_study_config(None, {
        "device": "cpu",
        "dataset": {"train_options": {"num_images": 64}, "test_options": {"num_images": 32}},
        "models": [{"name": "moco-r18", "checkpoint": str(path), "format": "moco", "arch": "resnet18"}],
        "experiments": ["quality", "tradeoff"],
        "settings": {"quality": {"linear_epochs": 2, "k": 10}},
    })
    outcome = run_study(config, tmp_path / "study", progress=False)
    assert outcome.tradeoff[0]["model"] == "moco-r18"
