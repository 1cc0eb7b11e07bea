"""Bring your own encoder: published self-supervised checkpoints → sslens model directories.

:func:`import_checkpoint` reads a checkpoint file with ``torch.load(weights_only=True)`` (or
safetensors; never unpickling code), recognises its layout with the converter registered for its
format in :data:`CHECKPOINT_FORMATS`, and writes an sslens model directory (``model.safetensors``
+ ``meta.json``, :func:`sslens.store.save_model`) that ``load_model`` rebuilds as an
:class:`~sslens.methods.imported.ImportedMethod`: the backbone, and where the file has them
the projection head and the SwAV prototypes, so the "pooled", "projection" and "prototypes"
outputs can all be explained.

Formats (see docs/MODELS.md for the commands and what each keeps):

* ``moco``: facebookresearch/moco ``*.pth.tar`` (MoCo v1 linear head ``fc.*``, v2 MLP head
  ``fc.0``/``fc.2``) under ``state_dict`` with ``module.encoder_q.`` keys; the momentum encoder
  ``encoder_k`` and the ``queue``/``queue_ptr`` are dropped and listed.
* ``swav``: facebookresearch/swav ``module.``-prefixed ResNet keys, ``projection_head.*`` and
  ``prototypes.weight`` (K, 128), bare or nested under ``state_dict``.
* ``simclr``: TensorFlow SimCLR checkpoints converted to PyTorch by Separius/SimCLRv2-Pytorch
  (``{"resnet": ..., "head": ...}``, ResNet keys ``net.0.0.weight`` ...; 1x width, no selective
  kernels) or by tonylins/simclr-converter (``{"state_dict": torchvision keys}``, 1x width), and
  AndrewAtanov/simclr-pytorch training checkpoints (``{"state_dict": convnet.* + projection.*,
  "hparams": argparse.Namespace, ...}``; ImageNet or CIFAR-10 stem). All expect unnormalised
  [0, 1] inputs, which the model directory records (mean 0, std 1).
* ``torchvision``: a torchvision-named ResNet state dict (any of :data:`RESNET_NAMES`, the
  ``-cifar`` ones included).
* ``timm``: a weights file of any timm model, named with ``timm_name``.

The ResNet of every format but timm is read off the keys (:func:`infer_resnet_arch`: blocks per
stage, BasicBlock or Bottleneck, widths, 7x7 or 3x3 stem) and checked against ``arch`` and
against what the file says of itself (MoCo's ``arch`` field, simclr-pytorch's hparams); a
mismatch names what the keys hold. A file given with the wrong format is told which format it
looks like (:func:`guess_format`, :func:`guess_format_of_file`).

Every key of the file is accounted for: loaded, or dropped for a stated reason (recorded in
``meta["dropped"]``); anything else is an error listing (some of) the keys.

>>> import_checkpoint("moco_v2_800ep_pretrain.pth.tar", "moco", "models/moco-v2")  # doctest: +SKIP
PosixPath('models/moco-v2')
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslens.checks import listing
from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.data.cache import user_cache_dir
from sslens.errors import UserError
from sslens.hashing import file_sha256, json_sha256
from sslens.methods.imported import head_spec
from sslens.models.base import Backbone
from sslens.models.resnet import (
    RESNET_NAMES,
    ResNet,
    infer_resnet_arch,
    load_torchvision_state_dict,
    resnet_layout,
)
from sslens.models.timm_backbone import TimmBackbone
from sslens.registry import lookup, unknown_name
from sslens.store import META_FILE, MODEL_FILE, build_method, provenance, save_model

#: ImageNet evaluation preprocessing of the torchvision reference scripts: shorter side 256,
#: centre crop 224 (crop_pct = 224 / 256), bilinear resize, ImageNet mean/std.
IMAGENET_PREPROCESSING = {
    "image_size": [224, 224],
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}

#: Inputs of a CIFAR-stem ResNet: 32 px images as they are (nothing to crop).
CIFAR_PREPROCESSING = {**IMAGENET_PREPROCESSING, "image_size": [32, 32], "crop_pct": 1.0}

#: What ``torch.load(weights_only=True)`` may rebuild besides tensors, containers and numbers:
#: plain records, rebuilt without running anything from the file. AndrewAtanov/simclr-pytorch
#: saves its hparams as an ``argparse.Namespace`` (``models/ssl.py``, ``get_ckpt``), whose
#: ``root`` its myexman parser sets to a ``pathlib.PosixPath`` (``myexman/parser.py``).
SAFE_GLOBALS = (argparse.Namespace, pathlib.PosixPath)

#: Modules whose functions run programs or code: a pickle that names one of them would execute
#: it while loading (torch blocks os, posix, nt and sys outright and refuses the rest as unknown).
_CODE_MODULES = frozenset(
    {"os", "posix", "nt", "sys", "subprocess", "builtins", "runpy", "importlib", "shutil", "socket", "pty", "ctypes"}
)


@dataclass(frozen=True)
class KnownCheckpoint:
    """A file the authors publish, for ``download=True``."""

    format: str
    url: str
    description: str


#: File name → where its authors publish it. ``import_checkpoint(NAME, ..., download=True)``
#: fetches it into the cache once.
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "moco_v2_800ep_pretrain.pth.tar": KnownCheckpoint(
        "moco",
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "MoCo v2 ResNet-50, 800 epochs (facebookresearch/moco)",
    ),
    "moco_v2_200ep_pretrain.pth.tar": KnownCheckpoint(
        "moco",
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar",
        "MoCo v2 ResNet-50, 200 epochs (facebookresearch/moco)",
    ),
    "moco_v1_200ep_pretrain.pth.tar": KnownCheckpoint(
        "moco",
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar",
        "MoCo v1 ResNet-50, 200 epochs (facebookresearch/moco)",
    ),
    "swav_800ep_pretrain.pth.tar": KnownCheckpoint(
        "swav",
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        "SwAV ResNet-50, 800 epochs, multi-crop (facebookresearch/swav)",
    ),
}


@dataclass
class Converted:
    """What a converter makes of a checkpoint's state dict.

    Attributes:
        layout: the published layout recognised, e.g. "MoCo v2 (MLP head)".
        backbone: weights under the backbone's source naming (torchvision ResNet keys, or the
            timm model's own keys); classifiers stay in and are dropped by the loader.
        head: projection-head weights keyed like an ``nn.Sequential`` ("0.weight", ...).
        prototypes: (K, out_dim) SwAV prototypes, or None.
        dropped: reason → source keys deliberately not kept.
        mean, std: input normalisation the authors used, when it is not ImageNet's.
        arch: the ResNet the file says it holds (MoCo's ``arch`` field, simclr-pytorch's
            hparams), as an sslens backbone name; None when it says nothing.
        arch_source: where the file says so, for messages ("its 'arch' field").
        extra_meta: further ``meta.json`` entries the file provides (``source_hparams``).
    """

    layout: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    prototypes: torch.Tensor | None = None
    dropped: dict[str, list[str]] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    arch: str | None = None
    arch_source: str = ""
    extra_meta: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[Any], Converted]


def _unwrap(format_name: str, checkpoint: Any, *nests: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``checkpoint`` (the first of ``nests`` that holds a dict, else the
    checkpoint itself), with DataParallel's ``module.`` prefixes removed."""
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"The file holds a {type(checkpoint).__name__}, not a dict of tensors (a state dict).")
    state = _nested(checkpoint, nests)
    not_tensors = sorted(str(key) for key, value in state.items() if not torch.is_tensor(value))
    if not_tensors:
        raise UserError(
            f"{_format_hint(format_name, checkpoint)}The state dict holds entries that are not tensors: "
            f"{listing(not_tensors, 8)}. Is this a training checkpoint whose weights sit under another "
            f"key? Top-level keys: {listing(sorted(map(str, checkpoint)), 12)}."
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def _nested(checkpoint: Mapping, nests: tuple[str, ...]) -> Mapping:
    """The first of ``checkpoint[nest]`` that is a dict, else ``checkpoint`` itself."""
    return next((checkpoint[key] for key in nests if isinstance(checkpoint.get(key), Mapping)), checkpoint)


def _format_hint(format_name: str, checkpoint: Any) -> str:
    """'This looks like a 'moco' checkpoint: ...' when :func:`guess_format` names another format."""
    guessed = guess_format(checkpoint)
    if guessed is None or guessed == format_name:
        return ""
    return f"This looks like a {guessed!r} checkpoint: pass --format {guessed}. "


def _layout_error(format_name: str, checkpoint: Any, state: Mapping[str, Any], expected: str) -> UserError:
    return UserError(
        f"{_format_hint(format_name, checkpoint)}This is not a {format_name!r} checkpoint in a layout "
        f"sslens knows: expected {expected}. Keys found: {listing(sorted(map(str, state)), 12)}. Known "
        f"formats: {', '.join(sorted(CHECKPOINT_FORMATS))} (docs/MODELS.md describes each layout); pass "
        "the format that produced the file."
    )


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries of ``state`` under ``prefix`` (prefix stripped)."""
    keys = [key for key in state if key.startswith(prefix)]
    return {key[len(prefix) :]: state.pop(key) for key in keys}


def convert_moco(checkpoint: Any) -> Converted:
    """facebookresearch/moco ``main_moco.py`` checkpoints (https://github.com/facebookresearch/moco).

    ``{"epoch", "arch", "state_dict", "optimizer"}``; ``state_dict`` keys ``module.encoder_q.*``
    (a torchvision ResNet whose ``fc`` is MoCo v1's Linear or MoCo v2's ``fc.0`` Linear, ReLU,
    ``fc.2`` Linear), ``module.encoder_k.*`` (momentum copy) and ``module.queue``,
    ``module.queue_ptr``. The query encoder is kept; key encoder and queue are dropped. ``arch``
    (a torchvision model name, e.g. "resnet50") is the ResNet the file says it holds.
    """
    state = _unwrap("moco", checkpoint, "state_dict")
    if not any(key.startswith("encoder_q.") for key in state):
        raise _layout_error("moco", checkpoint, state,
                            "keys 'module.encoder_q.*' under 'state_dict' (MoCo v1/v2 pre-training)")
    query = _take(state, "encoder_q.")
    dropped = {"momentum key encoder (encoder_k)": sorted(f"encoder_k.{k}" for k in _take(state, "encoder_k."))}
    queue = sorted(key for key in ("queue", "queue_ptr") if state.pop(key, None) is not None)
    if queue:
        dropped["negatives queue"] = queue
    if state:
        raise _layout_error("moco", checkpoint, state, "only module.encoder_q.*, module.encoder_k.*, module.queue "
                            "and module.queue_ptr, but the keys below are none of these")
    head = _take(query, "fc.")
    if {"weight", "bias"} == set(head):
        layout, head = "MoCo v1 (linear head)", {f"0.{k}": v for k, v in head.items()}
    elif head and all(re.fullmatch(r"[02]\.(weight|bias)", key) for key in head):
        layout = "MoCo v2 (MLP head)"
    else:
        raise _layout_error("moco", checkpoint, {f"encoder_q.fc.{k}": v for k, v in head.items()} or query,
                            "encoder_q.fc.weight/bias (v1) or encoder_q.fc.0.* and fc.2.* (v2)")
    arch = checkpoint.get("arch")
    return Converted(layout, query, head=head, dropped=dropped, arch=arch if isinstance(arch, str) else None,
                     arch_source="its 'arch' field")


def convert_swav(checkpoint: Any) -> Converted:
    """facebookresearch/swav ``src/resnet50.py`` checkpoints (https://github.com/facebookresearch/swav).

    ``module.``-prefixed torchvision-named ResNet keys, ``projection_head.0`` Linear,
    ``projection_head.1`` BatchNorm1d, (ReLU), ``projection_head.3`` Linear (or a single Linear
    ``projection_head.*`` when ``hidden_mlp=0``) and ``prototypes.weight`` (K, 128). The released
    ``swav_800ep_pretrain.pth.tar`` is a bare state dict; training checkpoints nest it under
    ``state_dict``. Multiple prototype sets (``prototypes.prototypes0.*``) are not supported.
    """
    state = _unwrap("swav", checkpoint, "state_dict")
    if "conv1.weight" not in state:
        raise _layout_error("swav", checkpoint, state,
                            "'module.conv1.weight', 'module.layer1.*', 'module.projection_head.*'")
    if any(key.startswith("prototypes.prototypes") for key in state):
        raise UserError(
            "This SwAV checkpoint has several prototype sets (MultiPrototypes, prototypes.prototypesN.*); "
            "sslens imports one set (prototypes.weight). Drop the extra sets or import with --format torchvision."
        )
    head = _take(state, "projection_head.")
    if set(head) == {"weight", "bias"}:
        head = {f"0.{k}": v for k, v in head.items()}
    prototypes = state.pop("prototypes.weight", None)
    layout = "SwAV" + (" with projection head" if head else "") + (" and prototypes" if prototypes is not None else "")
    return Converted(layout, state, head=head, prototypes=prototypes)


#: Separius/SimCLRv2-Pytorch ResNet names → torchvision names (1x width, no selective kernel).
_SEPARIUS_RULES = [
    (r"net\.0\.0\.weight", "conv1.weight"),
    (r"net\.0\.1\.0\.(\w+)", r"bn1.\1"),
    (r"net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.weight", r"layer\1.\2.downsample.0.weight"),
    (r"net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.(\w+)", r"layer\1.\2.downsample.1.\3"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.0\.weight", r"layer\1.\2.conv1.weight"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.1\.0\.(\w+)", r"layer\1.\2.bn1.\3"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.2\.weight", r"layer\1.\2.conv2.weight"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.3\.0\.(\w+)", r"layer\1.\2.bn2.\3"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.4\.weight", r"layer\1.\2.conv3.weight"),
    (r"net\.([1-4])\.blocks\.(\d+)\.net\.5\.0\.(\w+)", r"layer\1.\2.bn3.\3"),
    (r"fc\.(weight|bias)", r"fc.\1"),
]

SIMCLR_LAYOUTS = (
    "Separius/SimCLRv2-Pytorch r50_1x_sk0 ({'resnet': ..., 'head': ...}, keys net.0.0.weight ...)",
    "tonylins/simclr-converter resnet50-1x ({'state_dict': ...}, torchvision keys conv1.weight ...)",
    "AndrewAtanov/simclr-pytorch ({'state_dict': ..., 'hparams': ...}, keys convnet.* and projection.*)",
)

#: AndrewAtanov/simclr-pytorch ``models/encoder.py`` ``EncodeProject.projection`` modules →
#: their index in its ``nn.Sequential``: fc1 (Linear, no bias), bn1 (BatchNorm1d), relu1,
#: fc2 (Linear to 128, no bias), bn2 (``BatchNorm1dNoBias``: affine, its bias frozen but saved).
_SIMCLR_PYTORCH_HEAD = {"fc1": 0, "bn1": 1, "fc2": 3, "bn2": 4}

#: The simclr-pytorch hparams recorded in ``meta["source_hparams"]`` (when the file has them).
_SIMCLR_PYTORCH_HPARAMS = ("problem", "arch", "data", "batch_size", "iters", "temperature")


def convert_simclr(checkpoint: Any) -> Converted:
    """SimCLR v1/v2 (https://github.com/google-research/simclr) converted from TensorFlow.

    * Separius/SimCLRv2-Pytorch: ``{"resnet": state_dict, "head": state_dict}``; the ResNet is
      ``net.0`` (stem) and ``net.1`` ... ``net.4`` (``blocks.N.net.{0,2,4}`` convs,
      ``net.{1,3,5}.0`` BatchNorms, ``projection.shortcut``/``projection.bn.0`` downsampling),
      ``fc`` the supervised head (dropped); the contrastive head ``layers.{0,3,6}`` Linear
      (no bias), ``layers.{1,4,7}`` BatchNorm1d, ReLUs between, is kept. Only 1x width without
      selective kernels (``r50_1x_sk0``) maps onto a torchvision ResNet-50.
    * tonylins/simclr-converter: ``{"state_dict": torchvision ResNet-50 keys}`` (SimCLR v1, 1x);
      ``fc`` (supervised head) dropped; no projection head was converted.
    * AndrewAtanov/simclr-pytorch (https://github.com/AndrewAtanov/simclr-pytorch), the
      checkpoints ``train.py`` saves: see :func:`_convert_simclr_pytorch`.

    All take unnormalised RGB in [0, 1] (the TensorFlow models normalise nothing; simclr-pytorch
    feeds ``ToTensor()`` output), recorded as mean 0, std 1.
    """
    raw = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("resnet"), Mapping):
        resnet = _unwrap("simclr", checkpoint["resnet"])
        if any(".main_conv." in key or ".mixing_conv." in key for key in resnet) or "net.0.2.weight" in resnet:
            raise UserError(
                "This SimCLRv2 checkpoint uses selective kernels (an *_sk1 model), which do not map onto a "
                f"torchvision ResNet. Supported SimCLR layouts: {'; '.join(SIMCLR_LAYOUTS)}."
            )
        mapped, unknown = {}, []
        for key, value in resnet.items():
            new = next((re.sub(p, r, key) for p, r in _SEPARIUS_RULES if re.fullmatch(p, key)), None)
            if new is None:
                unknown.append(key)
            else:
                mapped[new] = value
        if unknown:
            raise _layout_error("simclr", checkpoint, dict.fromkeys(unknown), f"one of: {'; '.join(SIMCLR_LAYOUTS)}")
        head = _unwrap("simclr", checkpoint.get("head", {}))
        head = {key.removeprefix("layers."): value for key, value in head.items()}
        return Converted("Separius/SimCLRv2-Pytorch (1x, sk0)", mapped, head=head, **raw)
    state = _unwrap("simclr", checkpoint, "state_dict")
    if any(key.startswith("convnet.") for key in state):
        return _convert_simclr_pytorch(checkpoint, state, raw)
    if guess_format(checkpoint) == "torchvision":
        return Converted("tonylins/simclr-converter (torchvision keys)", state, **raw)
    raise _layout_error("simclr", checkpoint, state, f"one of: {'; '.join(SIMCLR_LAYOUTS)}")


def _convert_simclr_pytorch(checkpoint: Mapping, state: dict[str, torch.Tensor], raw: dict) -> Converted:
    """AndrewAtanov/simclr-pytorch checkpoints (``train.py`` ``save_checkpoint``).

    ``{"state_dict": EncodeProject.state_dict(), "hparams": argparse.Namespace, "opt_state_dict",
    "iter"}``. ``convnet.*`` is ``models/resnet.py``'s ``ResNetEncoder``, a torchvision ResNet
    (hparams ``arch`` "ResNet50" or "resnet18") whose ``fc`` its forward never calls; with
    ``data == "cifar"`` its conv1 is 3x3 stride 1 and the max-pool is skipped ("cifar_head"),
    sslens's CIFAR stem. ``projection.*`` is fc1 (D → D, no bias), bn1, ReLU, fc2 (D → 128, no
    bias), bn2 (:data:`_SIMCLR_PYTORCH_HEAD`). The optimizer state is never read.
    """
    convnet, projection = _take(state, "convnet."), _take(state, "projection.")
    head, unknown = {}, sorted(state)
    for key, value in projection.items():
        module, _, param = key.partition(".")
        if module in _SIMCLR_PYTORCH_HEAD:
            head[f"{_SIMCLR_PYTORCH_HEAD[module]}.{param}"] = value
        else:
            unknown.append(f"projection.{key}")
    if unknown:
        raise _layout_error("simclr", checkpoint, dict.fromkeys(unknown),
                            "only convnet.* and projection.{fc1,bn1,fc2,bn2}.* (AndrewAtanov/simclr-pytorch)")
    unused_fc = sorted(f"convnet.fc.{key}" for key in _take(convnet, "fc."))
    hparams = checkpoint.get("hparams")
    values = vars(hparams) if isinstance(hparams, argparse.Namespace) else hparams if isinstance(hparams, Mapping) else {}
    recorded = {key: values[key] for key in _SIMCLR_PYTORCH_HPARAMS if isinstance(values.get(key), str | int | float)}
    arch = values.get("arch")
    # models/encoder.py: ResNet50(cifar_head=(hparams.data == 'cifar')), likewise resnet18.
    declared = f"{arch.lower()}{'-cifar' if values.get('data') == 'cifar' else ''}" if isinstance(arch, str) else None
    return Converted(
        "AndrewAtanov/simclr-pytorch (convnet + projection)",
        convnet,
        head=head,
        dropped={"unused torchvision classifier (ResNetEncoder.forward never calls convnet.fc)": unused_fc},
        arch=declared,
        arch_source=f"its hparams (arch {arch!r}, data {values.get('data')!r})",
        extra_meta={"source_hparams": recorded} if recorded else {},
        **raw,
    )


def convert_torchvision(checkpoint: Any) -> Converted:
    """A torchvision-named ResNet state dict (bare or under ``state_dict``); ``fc`` dropped."""
    state = _unwrap("torchvision", checkpoint, "state_dict")
    if guess_format(checkpoint) != "torchvision":
        raise _layout_error("torchvision", checkpoint, state,
                            "torchvision ResNet keys only: conv1.weight, bn1.*, layer1.0.* ..., fc.*")
    return Converted("torchvision ResNet", state)


def convert_timm(checkpoint: Any) -> Converted:
    """A timm model's weights (bare, or under ``state_dict``/``model`` as timm's train script and
    others save them); the classifier is dropped when loading."""
    return Converted("timm", _unwrap("timm", checkpoint, "state_dict", "model"))


#: Format name (``--format``) → the converter of its layout.
CHECKPOINT_FORMATS: dict[str, Converter] = {
    "moco": convert_moco,
    "swav": convert_swav,
    "simclr": convert_simclr,
    "torchvision": convert_torchvision,
    "timm": convert_timm,
}

#: (format, test on a state dict's keys with ``module.`` removed): the first that passes names
#: the format. SwAV and simclr-pytorch files also hold torchvision keys, so torchvision is late.
_FORMAT_SIGNS: tuple[tuple[str, Callable[[set[str]], bool]], ...] = (
    ("moco", lambda keys: any(key.startswith("encoder_q.") for key in keys)),
    ("swav", lambda keys: "prototypes.weight" in keys or any(key.startswith("projection_head.") for key in keys)),
    ("simclr", lambda keys: any(key.startswith("convnet.") for key in keys)),
    ("torchvision", lambda keys: {"conv1.weight", "layer1.0.conv1.weight"} <= keys),
    ("timm", lambda keys: "patch_embed.proj.weight" in keys),
)


def guess_format(checkpoint: Any) -> str | None:
    """The format (a key of :data:`CHECKPOINT_FORMATS`) whose layout a loaded checkpoint has,
    from its keys alone; None when it has none sslens knows. Never raises.

    ``{"resnet": ..., "head": ...}`` → "simclr" (Separius); then, on the state dict (under
    ``state_dict`` or ``model``, else the checkpoint itself): ``encoder_q.*`` → "moco",
    ``prototypes.weight`` or ``projection_head.*`` → "swav", ``convnet.*`` → "simclr"
    (AndrewAtanov/simclr-pytorch), ``conv1.weight`` + ``layer1.0.conv1.weight`` → "torchvision"
    (tonylins/simclr-converter files look the same), ``patch_embed.proj.weight`` → "timm" (ViTs).

    >>> guess_format({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}})
    'moco'
    """
    if not isinstance(checkpoint, Mapping):
        return None
    if isinstance(checkpoint.get("resnet"), Mapping):
        return "simclr"
    keys = {str(key).removeprefix("module.") for key in _nested(checkpoint, ("state_dict", "model"))}
    return next((name for name, sign in _FORMAT_SIGNS if sign(keys)), None)


def guess_format_of_file(path: str | os.PathLike) -> str | None:
    """:func:`guess_format` of the file at ``path``, loaded as :func:`load_checkpoint_file` loads
    it (never running pickled code; a file it refuses is its UserError).

    >>> guess_format_of_file("moco_v2_800ep_pretrain.pth.tar")  # doctest: +SKIP
    'moco'
    """
    return guess_format(load_checkpoint_file(path))


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} does not exist. Pass the checkpoint file (.pth, .pth.tar, .pt or .safetensors).")


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """The contents of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True``
    and :data:`SAFE_GLOBALS` (``argparse.Namespace``, ``pathlib.PosixPath``) allowed.

    Nothing pickled is ever executed: a file that needs other classes is a UserError naming them,
    and one whose pickle calls a function that runs code (``os.system``, ``eval``) is refused as
    such, with no advice to load it otherwise.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise UserError(f"Cannot read {path} as safetensors: {error}") from error
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Not chained: torch's message advises weights_only=False, which would run the file's code.
        raise _refused_pickle(path, error) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        raise UserError(f"Cannot load {path} with torch.load: {error}. Is it a complete PyTorch checkpoint?") from error


def _refused_pickle(path: Path, error: pickle.UnpicklingError) -> UserError:
    """The UserError for a torch file that only a full unpickle could load, naming what it needs."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            # Reads the pickle's opcodes without executing them.
            needed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError):
        # torch's legacy (pre-1.6, not zip) files are not read this way; its error names the first.
        needed = re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
    runs_code = [name for name in needed if name.split(".", 1)[0] in _CODE_MODULES]
    if not needed:
        return UserError(f"Cannot load {path} with torch.load: it is no pickle torch can read. Is it a complete "
                         "PyTorch checkpoint?")
    if runs_code:
        return UserError(
            f"{path} would run code when loaded: its pickle calls {listing(runs_code, 4)}. sslens refused it "
            "and ran nothing from it. Do not open it with pickle or torch.load(weights_only=False); if you "
            "expected a checkpoint, get it again from its authors."
        )
    return UserError(
        f"{path} stores Python objects besides tensors, dicts, lists, numbers and argparse Namespaces "
        f"({listing(needed, 4)}); only pickle could rebuild them, by running "
        "their code, and sslens loads with torch.load(weights_only=True) only. If you trust who made the "
        "file, re-save its weights where those classes import: ckpt = torch.load(path, weights_only=False); "
        "torch.save({k: v for k, v in ckpt.items() if torch.is_tensor(v) or isinstance(v, dict)}, "
        "'weights.pth') (for a pickled nn.Module, save its state_dict() instead), then import weights.pth."
    )


def download_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local copy of the published file ``name`` (a key of :data:`KNOWN_CHECKPOINTS`),
    downloaded from its authors' URL into ``cache_dir`` (default ``<torch hub dir>/sslens``)
    unless already there. Offline → a UserError saying where to get it by hand."""
    if name not in KNOWN_CHECKPOINTS:
        raise UserError(
            f"sslens does not know where {name!r} is published. Known files: {', '.join(KNOWN_CHECKPOINTS)}. "
            "For any other file, download it yourself and pass its path without --download."
        )
    known = KNOWN_CHECKPOINTS[name]
    directory = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "sslens"
    target = directory / name
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames it, so an interrupted download leaves no target.
        torch.hub.download_url_to_file(known.url, str(target), progress=True)
    except OSError as error:  # URLError, HTTPError, timeouts and resets are all OSErrors
        raise UserError(
            f"Could not download {known.description} from {known.url} ({error}). Are you offline? "
            f"Download the file by other means and run the import with its path instead of --download."
        ) from error
    return target


def _resolve_arch(requested: str | None, converted: Converted) -> str:
    """The ResNet of a moco/swav/simclr/torchvision checkpoint: the one its keys describe
    (:func:`infer_resnet_arch`), which ``requested`` (--arch) and what the file says of itself
    must match; the requested or stated one when the keys are too incomplete to tell."""
    layout, inferred = resnet_layout(converted.backbone), infer_resnet_arch(converted.backbone)
    stated = converted.arch
    if layout is not None and inferred is None:
        raise UserError(
            f"The checkpoint holds a ResNet with {layout}, which is none of sslens's ResNets "
            f"({', '.join(RESNET_NAMES)}). For other ResNets use --format timm with the model's timm name "
            "(timm's ResNets use torchvision's key names)."
        )
    if inferred is not None and requested not in (None, inferred):
        raise UserError(
            f"The checkpoint holds a {inferred} ({layout}); --arch {requested} does not fit. "
            f"Pass --arch {inferred} or leave --arch out."
        )
    if inferred is not None and requested is None and stated not in (None, inferred):
        raise UserError(
            f"The checkpoint holds a {inferred} ({layout}), although {converted.arch_source} says "
            f"{stated}. Pass --arch {inferred} to import its weights as they are."
        )
    if inferred is None and None not in (requested, stated) and requested != stated:
        raise UserError(
            f"The checkpoint says it is a {stated} ({converted.arch_source}); --arch {requested} does not "
            f"fit. Pass --arch {stated} or leave --arch out."
        )
    arch = requested or inferred or stated
    if arch is None:
        raise UserError(
            "Cannot tell the ResNet of this checkpoint: its keys lack conv1.weight or layer1..4.0.conv1.weight "
            f"and it names no architecture. Pass --arch (one of {', '.join(RESNET_NAMES)})."
        )
    if arch not in RESNET_NAMES:
        raise UserError(
            f"--arch: {unknown_name('ResNet', arch, RESNET_NAMES)} Checkpoints of every format but timm hold a "
            "torchvision-named ResNet; for other architectures use --format timm with --timm-name."
        )
    return arch


def _load_backbone(backbone: Backbone, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ``weights`` into ``backbone``; the dropped classifier keys. Mismatch → UserError."""
    try:
        if isinstance(backbone, TimmBackbone):
            report = backbone.load_timm_state_dict(weights)
        else:
            report = load_torchvision_state_dict(backbone, weights)
    except ValueError as error:
        raise UserError(str(error)) from error
    return report.dropped


def _preprocessing(backbone: Backbone, converted: Converted) -> dict:
    """image_size, mean, std, crop_pct, interpolation the source model expects."""
    if isinstance(backbone, TimmBackbone):
        cfg = backbone.model.pretrained_cfg
        return {
            "image_size": [int(s) for s in cfg.get("input_size", (3, 224, 224))[1:]],
            "mean": [float(m) for m in cfg.get("mean", IMAGENET_MEAN)],
            "std": [float(s) for s in cfg.get("std", IMAGENET_STD)],
            "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "interpolation": str(cfg.get("interpolation", "bicubic")),
        }
    base = CIFAR_PREPROCESSING if isinstance(backbone, ResNet) and backbone.stem_type == "cifar" else IMAGENET_PREPROCESSING
    return {**base, "mean": converted.mean or base["mean"], "std": converted.std or base["std"]}


def import_checkpoint(
    path: str | os.PathLike,
    format: str,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    timm_name: str | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a published checkpoint into an sslens model directory; returns ``out_dir``.

    Args:
        path: the checkpoint file; with ``download=True`` the name of a published file
            (a key of :data:`KNOWN_CHECKPOINTS`), fetched into ``cache_dir`` unless ``path``
            exists.
        format: a name in :data:`CHECKPOINT_FORMATS` ("moco", "swav", "simclr", "torchvision",
            "timm").
        out_dir: the model directory to write (``model.safetensors`` + ``meta.json``).
        arch: the ResNet of moco/swav/simclr/torchvision checkpoints (a name in
            :data:`RESNET_NAMES`, e.g. "resnet50" or "resnet50-cifar"); None = the one the keys
            describe (:func:`infer_resnet_arch`). Given, it must match the keys and the file's
            own record (MoCo's ``arch``, simclr-pytorch's hparams). Not used with timm.
        timm_name: the timm model name, for ``format="timm"`` (and only then).
        overwrite: replace an existing non-empty ``out_dir``.

    ``meta.json`` records ``source_format``, ``source_layout``, ``source_file``,
    ``source_sha256``, ``arch``, the preprocessing (``image_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``; 32 px and crop_pct 1.0 for a CIFAR stem), ``kept``
    (backbone / projection_head / prototypes), ``dropped`` (reason → source keys) and, for
    simclr-pytorch files, ``source_hparams``. Any key that is neither kept nor dropped for a
    stated reason, and any missing or misshapen key, is a UserError listing them.
    """
    converter = _format(format)
    if (format == "timm") != (timm_name is not None):
        raise UserError("--timm-name names the model of a --format timm file; pass it with --format timm only.")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty. Choose another --out or pass --overwrite.")
    source = Path(path)
    if download and not source.is_file():
        known = KNOWN_CHECKPOINTS.get(source.name)
        if known is not None and known.format != format:
            raise UserError(f"{source.name} is a {known.format!r} checkpoint; use --format {known.format}.")
        source = download_checkpoint(source.name, cache_dir)

    converted = converter(load_checkpoint_file(source))
    # The one format whose architecture is not a ResNet: timm names its model.
    resnet = None if format == "timm" else _resolve_arch(arch, converted)
    head = head_spec(converted.head) if converted.head else None
    num_prototypes = 0 if converted.prototypes is None else int(converted.prototypes.shape[0])
    meta: dict[str, Any] = {
        "method": "imported",
        "method_options": {"head": head, "num_prototypes": num_prototypes},
        "backbone": resnet or "timm",
        "backbone_options": {} if resnet else {"model_name": timm_name},
    }
    try:
        method = build_method(meta)
    except ValueError as error:
        raise UserError(f"{'--timm-name' if format == 'timm' else '--arch'}: {error}") from error
    dropped = dict(converted.dropped)
    classifier = _load_backbone(method.backbone, converted.backbone)
    if classifier:
        dropped["classifier (supervised head, not part of the representation)"] = classifier
    _load_part(method.projector, converted.head, "projection head")
    if converted.prototypes is not None:
        _load_part(method.prototypes, {"weight": converted.prototypes}, "prototypes")

    kept = ["backbone"] + (["projection_head"] if head else []) + (["prototypes"] if num_prototypes else [])
    meta.update(
        _preprocessing(method.backbone, converted),
        class_names=[],
        data=f"imported from {source.name}",
        epoch=None,
        step=None,
        source_format=format,
        source_layout=converted.layout,
        source_file=str(source.resolve()),
        source_sha256=file_sha256(source),
        arch=resnet or timm_name,
        kept=kept,
        dropped={reason: sorted(keys) for reason, keys in dropped.items() if keys},
        **converted.extra_meta,
        **provenance(),
    )
    return save_model(out, method, meta)


def _format(name: str) -> Converter:
    try:
        return lookup("checkpoint format", CHECKPOINT_FORMATS, name)
    except ValueError as error:
        raise UserError(f"--format: {error}") from error


def _load_part(module: nn.Module | None, weights: Mapping[str, torch.Tensor], what: str) -> None:
    if module is None:
        return
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(f"The checkpoint's {what} does not fit the layout sslens read from it: {error}") from error


def import_summary(model_dir: str | os.PathLike) -> str:
    """A few lines for the CLI about the model directory ``model_dir`` that
    :func:`import_checkpoint` wrote: what came from where, what was kept and what dropped."""
    meta = json.loads((Path(model_dir) / META_FILE).read_text())
    lines = [
        f"Imported {meta['source_layout']} ({meta['source_format']}, {meta['arch']}) from {meta['source_file']}",
        f"  sha256 {meta['source_sha256']}",
        f"  kept: {', '.join(meta['kept'])}",
        f"  preprocessing: {meta['image_size'][0]}x{meta['image_size'][1]}, crop_pct {meta['crop_pct']}, "
        f"mean {meta['mean']}, std {meta['std']}",
    ]
    lines += [f"  dropped {len(keys)} keys: {reason}" for reason, keys in meta["dropped"].items()]
    return "\n".join(lines)


def import_cached(
    path: str | os.PathLike,
    format: str,
    *,
    arch: str | None = None,
    timm_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The sslens model directory of a published checkpoint, imported on first use.

    Lets ``sslens explain CHECKPOINT --format moco`` and a study's ``{checkpoint: ..., format:
    moco}`` take the authors' file directly. The directory lives under ``cache_dir`` (default
    ``$XDG_CACHE_HOME/sslens/imported`` or ``~/.cache/sslens/imported``), keyed by the file's
    SHA-256 and the import options, so a changed file is imported again and an unchanged one is
    not.
    """
    _check_exists(Path(path))
    key = json_sha256([file_sha256(path), format, arch, timm_name])[:16]
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "imported"
    out_dir = root / f"{format}-{key}"
    if (out_dir / MODEL_FILE).is_file() and (out_dir / META_FILE).is_file():
        return out_dir
    return import_checkpoint(path, format, out_dir, arch=arch, timm_name=timm_name, overwrite=True)
