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
* ``barlowtwins``: facebookresearch/barlowtwins ``resnet50.pth`` (torchvision keys, no ``fc``)
  or ``checkpoint.pth`` (``model``: ``module.backbone.*``, ``module.projector.*``,
  ``module.bn.*``); the projector is kept, the loss's ``bn`` dropped.
* ``vicreg``: facebookresearch/vicreg ``resnet50.pth`` (torchvision keys, no ``fc``) or the full
  checkpoint (``model``: ``module.backbone.*``, ``module.projector.*``); projector kept.
* ``dino``: facebookresearch/dino backbone-only ResNet-50 (torchvision keys) and ViTs (timm's
  keys, imported as the timm ViT the keys describe), and the full checkpoints, whose teacher
  is kept with its head (``head.mlp`` as projection head, the weight-normalised last layer as
  prototypes) and whose student is dropped.
* ``byol``: solo-learn BYOL checkpoints (``backbone.*``, ``projector.*``; predictor and momentum
  networks dropped) and DeepMind's ResNet-50 converted by chigur/byol-convert (torchvision keys
  without ``num_batches_tracked``; its TensorFlow padding is recorded as a departure).

A bare torchvision-named ResNet state dict (or DINO's bare ViT) is also what the backbone-only
releases of barlowtwins, vicreg, dino and byol look like; :func:`guess_format` calls it
"torchvision" ("timm"), and those formats take it when the user names them.

The ResNet of every format but timm (and DINO's ViTs, whose timm model the keys name) is read
off the keys (:func:`infer_resnet_arch`: blocks per stage, BasicBlock or Bottleneck, widths, 7x7
or 3x3 stem) and checked against ``arch`` and against what the file says of itself (MoCo's
``arch`` field, simclr-pytorch's hparams, DINO's args); a mismatch names what the keys hold. A file given with the wrong format is told which format it
looks like (:func:`guess_format`, :func:`guess_format_of_file`).

Every key of the file is accounted for: loaded, or dropped for a stated reason (recorded in
``meta["dropped"]``); anything else is an error listing (some of) the keys.

>>> import_checkpoint("moco_v2_800ep_pretrain.pth.tar", "moco", "models/moco-v2")  # doctest: +SKIP
PosixPath('models/moco-v2')
"""

from __future__ import annotations

import argparse
import json
import math
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
#: fetches it into the cache once, under NAME. Barlow Twins and VICReg both publish a
#: ``resnet50.pth`` (and Barlow Twins a ``checkpoint.pth``), so their names here carry the
#: project as a prefix ("barlowtwins-resnet50.pth"); the others are the published names.
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
    # README "Pretrained Model" (the December 2021 release; hubconf.py still loads the earlier
    # ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth, which has the same layout).
    "barlowtwins-resnet50.pth": KnownCheckpoint(
        "barlowtwins",
        "https://dl.fbaipublicfiles.com/barlowtwins/ljng/resnet50.pth",
        "Barlow Twins ResNet-50, 1000 epochs, backbone only (facebookresearch/barlowtwins)",
    ),
    "barlowtwins-checkpoint.pth": KnownCheckpoint(
        "barlowtwins",
        "https://dl.fbaipublicfiles.com/barlowtwins/ljng/checkpoint.pth",
        "Barlow Twins ResNet-50, 1000 epochs, full checkpoint with projector (facebookresearch/barlowtwins)",
    ),
    "vicreg-resnet50.pth": KnownCheckpoint(
        "vicreg",
        "https://dl.fbaipublicfiles.com/vicreg/resnet50.pth",
        "VICReg ResNet-50, backbone only (facebookresearch/vicreg)",
    ),
    "vicreg-resnet50_fullckpt.pth": KnownCheckpoint(
        "vicreg",
        "https://dl.fbaipublicfiles.com/vicreg/resnet50_fullckpt.pth",
        "VICReg ResNet-50, full checkpoint with projector (facebookresearch/vicreg)",
    ),
    "dino_resnet50_pretrain.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        "DINO ResNet-50, backbone only (facebookresearch/dino)",
    ),
    "dino_resnet50_pretrain_full_checkpoint.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain_full_checkpoint.pth",
        "DINO ResNet-50, full checkpoint: student, teacher with head (facebookresearch/dino)",
    ),
    "dino_deitsmall16_pretrain.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "DINO ViT-S/16, backbone only (facebookresearch/dino)",
    ),
    "dino_deitsmall16_pretrain_full_checkpoint.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth",
        "DINO ViT-S/16, full checkpoint: student, teacher with head (facebookresearch/dino)",
    ),
    "dino_deitsmall8_pretrain.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "DINO ViT-S/8, backbone only (facebookresearch/dino)",
    ),
    "dino_deitsmall8_pretrain_full_checkpoint.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain_full_checkpoint.pth",
        "DINO ViT-S/8, full checkpoint: student, teacher with head (facebookresearch/dino)",
    ),
    "dino_vitbase16_pretrain.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "DINO ViT-B/16, backbone only (facebookresearch/dino)",
    ),
    "dino_vitbase16_pretrain_full_checkpoint.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain_full_checkpoint.pth",
        "DINO ViT-B/16, full checkpoint: student, teacher with head (facebookresearch/dino)",
    ),
    "dino_vitbase8_pretrain.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        "DINO ViT-B/8, backbone only (facebookresearch/dino)",
    ),
    "dino_vitbase8_pretrain_full_checkpoint.pth": KnownCheckpoint(
        "dino",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain_full_checkpoint.pth",
        "DINO ViT-B/8, full checkpoint: student, teacher with head (facebookresearch/dino)",
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
        extra_meta: further ``meta.json`` entries the file provides (``source_hparams``), or
            ``departures``: sentences on how the imported model differs from the source's.
        timm_model: when the keys themselves name a timm model (DINO's ViTs), its backbone
            options: ``{"model_name": ..., **timm.create_model kwargs}``; None for ResNets.
        head_activation: the parameter-free layers of ``head`` ("relu", DINO's "gelu").
        preprocessing: evaluation inputs the authors used where they differ from the default
            (``crop_pct``, ``interpolation``, ``image_size``, ``mean``, ``std``).
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
    timm_model: dict[str, Any] | None = None
    head_activation: str = "relu"
    preprocessing: dict[str, Any] = field(default_factory=dict)


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


#: The reason recorded for a training checkpoint's top-level entries besides the weights read.
TRAINING_STATE = "training state (not part of the network: optimizer, epoch, loss and scaler state, arguments)"


def _training_state(checkpoint: Mapping, *weights: str) -> dict[str, list[str]]:
    """{:data:`TRAINING_STATE`: the top-level entries of ``checkpoint`` other than ``weights``}."""
    rest = sorted(str(key) for key in checkpoint if key not in weights)
    return {TRAINING_STATE: rest} if rest else {}


def _prefixed(keys: set[str], *prefixes: str) -> bool:
    """Every one of ``prefixes`` starts some key."""
    return all(any(key.startswith(prefix) for key in keys) for prefix in prefixes)


def _only(keys: set[str], *prefixes: str) -> bool:
    """Some keys, and every key under one of ``prefixes``."""
    return bool(keys) and all(key.startswith(prefixes) for key in keys)


def _bare_resnet(format_name: str, checkpoint: Any, layout: str, why_no_fc: str, **options: Any) -> Converted:
    """A backbone-only release: a bare torchvision-named ResNet state dict without ``fc``.

    Barlow Twins', VICReg's and DINO's ``resnet50.pth``-style files are exactly this, which is
    also what a torchvision state dict without its classifier looks like; the format the user
    names says which it is. A file with ``fc.*`` is a supervised model, not one of these.
    """
    state = _unwrap(format_name, checkpoint)
    if guess_format(checkpoint) != "torchvision":
        raise _layout_error(format_name, checkpoint, state,
                            "a bare torchvision-named ResNet state dict (conv1.weight, bn1.*, layer1.0.* ...) or the "
                            "full training checkpoint (docs/MODELS.md)")
    _reject_classifier(state, f"{layout} has no fc ({why_no_fc})")
    return Converted(layout, state, **options)


def _reject_classifier(backbone: Mapping[str, torch.Tensor], has_none: str) -> None:
    """A UserError when a backbone that its authors saved without ``fc`` (``has_none`` says
    why) holds one: the file is some other, supervised, model."""
    classifier = sorted(key for key in backbone if key.startswith("fc."))
    if classifier:
        raise UserError(
            f"{has_none}, but this file holds {listing(classifier, 4)}: a supervised classifier. Is it a "
            "torchvision ImageNet model? Import it with --format torchvision."
        )


#: The keys of a ``BatchNorm1d(affine=False)``: running statistics only.
_BN_STATISTICS = frozenset({"running_mean", "running_var", "num_batches_tracked"})

#: Why Barlow Twins' ``bn`` is not kept.
_BARLOW_BN = ("Barlow Twins' loss normalisation (bn: BatchNorm1d without affine parameters that main.py applies to "
              "the projections only inside the loss, with batch statistics)")


def convert_barlowtwins(checkpoint: Any) -> Converted:
    """facebookresearch/barlowtwins ``main.py`` files (https://github.com/facebookresearch/barlowtwins).

    * ``resnet50.pth`` (README "ResNet-50"; what ``torch.hub.load('facebookresearch/barlowtwins:main',
      'resnet50')`` loads, ``hubconf.py``): ``model.module.backbone.state_dict()``, a
      ``torchvision.models.resnet50`` whose ``fc`` main.py replaced by ``nn.Identity()`` — bare
      torchvision keys, no ``fc`` (``evaluate.py`` asserts the missing keys are fc.weight and fc.bias).
    * ``checkpoint.pth`` (README "full checkpoint"): ``{"epoch", "model", "optimizer"}``, ``model``
      the DistributedDataParallel ``BarlowTwins`` state dict: ``module.backbone.*``,
      ``module.projector.*`` (per hidden layer Linear without bias, BatchNorm1d, ReLU; then a
      Linear without bias; ``--projector 8192-8192-8192``) and ``module.bn.*``
      (``BatchNorm1d(affine=False)``, running statistics only).

    Kept: the backbone and the projector (as the projection head). Dropped: ``bn`` (a part of the
    loss, :data:`_BARLOW_BN`) and the training state.
    """
    if not (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping)):
        return _bare_resnet("barlowtwins", checkpoint, "Barlow Twins resnet50.pth (backbone only)",
                            "main.py replaces backbone.fc with nn.Identity")
    state = _unwrap("barlowtwins", checkpoint, "model")
    keys = dict(state)
    backbone, head, bn = _take(state, "backbone."), _take(state, "projector."), _take(state, "bn.")
    if not backbone or not head or not bn or state or not set(bn) <= _BN_STATISTICS:
        raise _layout_error("barlowtwins", checkpoint, keys,
                            "under 'model' only module.backbone.*, module.projector.* and module.bn.running_mean/"
                            "running_var/num_batches_tracked (main.py's BarlowTwins)")
    _reject_classifier(backbone, "Barlow Twins' backbone has no fc (main.py replaces it with nn.Identity)")
    return Converted(
        "Barlow Twins checkpoint.pth (backbone + projector)", backbone, head=head,
        dropped={_BARLOW_BN: sorted(f"bn.{key}" for key in bn), **_training_state(checkpoint, "model")},
    )


def convert_vicreg(checkpoint: Any) -> Converted:
    """facebookresearch/vicreg ``main_vicreg.py`` files (https://github.com/facebookresearch/vicreg).

    * ``resnet50.pth`` (README "backbone only"; ``torch.hub.load('facebookresearch/vicreg:main',
      'resnet50')``, ``hubconf.py``, loads it with ``strict=True`` into ``resnet.py``'s ResNet):
      ``model.module.backbone.state_dict()``. VICReg's ``resnet.py`` names every module as
      torchvision does and has no ``fc``; its forward pads the input by 1 (``ConstantPad2d``)
      before a 7x7 ``conv1`` with padding 2, which is torchvision's zero padding of 3, and its
      ``last_activation`` is ReLU by default — so the keys and the function are torchvision's.
    * ``resnet50_fullckpt.pth`` (README "full ckpt"): ``{"epoch", "model", "optimizer"}`` as
      main_vicreg.py saves ``model.pth``; ``model`` keys ``module.backbone.*`` and
      ``module.projector.*`` (per hidden layer Linear with bias, BatchNorm1d, ReLU; then a Linear
      without bias; ``--mlp 8192-8192-8192``).

    Kept: the backbone and the projector (as the projection head); the training state is
    dropped. The wider ``resnet50x2`` / ``resnet200x2`` releases (``widen=2``: widths
    128-256-512-1024) are none of sslens's ResNets and are refused with their layout named.
    """
    if not (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping)):
        return _bare_resnet("vicreg", checkpoint, "VICReg resnet50.pth (backbone only)",
                            "VICReg's resnet.py has no classifier")
    state = _unwrap("vicreg", checkpoint, "model")
    keys = dict(state)
    backbone, head = _take(state, "backbone."), _take(state, "projector.")
    if not backbone or not head or state:
        raise _layout_error("vicreg", checkpoint, keys,
                            "under 'model' only module.backbone.* and module.projector.* (main_vicreg.py's VICReg)")
    _reject_classifier(backbone, "VICReg's backbone has no fc (its resnet.py has no classifier)")
    return Converted("VICReg full checkpoint (backbone + projector)", backbone, head=head,
                     dropped=_training_state(checkpoint, "model"))


#: DINO's released ViTs (facebookresearch/dino hubconf.py: vit_small / vit_base, patch 16 / 8)
#: as (width, patch size) → the timm model with the same architecture and key names, tagged
#: ``.dino`` (timm's pretrained_cfg for that tag is DINO's own file and statistics).
DINO_VITS: dict[tuple[int, int], str] = {
    (384, 16): "vit_small_patch16_224.dino",
    (384, 8): "vit_small_patch8_224.dino",
    (768, 16): "vit_base_patch16_224.dino",
    (768, 8): "vit_base_patch8_224.dino",
}

#: DINO's evaluation inputs (eval_linear.py, eval_knn.py): Resize(256, interpolation=3, i.e.
#: bicubic), CenterCrop(224), ImageNet mean/std.
_DINO_PREPROCESSING = {"crop_pct": 0.875, "interpolation": "bicubic"}

#: The DINO ``args`` recorded in ``meta["source_hparams"]`` (when the file has them).
_DINO_HPARAMS = ("arch", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head", "epochs",
                 "batch_size_per_gpu", "teacher_temp", "momentum_teacher", "local_crops_number")

_DINO_STUDENT = "student network (DINO evaluates and releases the teacher, the moving average of the student)"


def convert_dino(checkpoint: Any) -> Converted:
    """facebookresearch/dino files (https://github.com/facebookresearch/dino, README "Pretrained models").

    * ``dino_resnet50_pretrain.pth`` ("backbone only"; ``hubconf.py`` ``dino_resnet50``): a
      torchvision ResNet-50 state dict without ``fc`` (``MultiCropWrapper`` replaces ``fc`` by
      ``nn.Identity``; hubconf loads it into a resnet50 whose fc is Identity).
    * ``dino_deitsmall16_pretrain.pth``, ``dino_deitsmall8_pretrain.pth``,
      ``dino_vitbase16_pretrain.pth``, ``dino_vitbase8_pretrain.pth``: ``vision_transformer.py``'s
      ``VisionTransformer`` with ``num_classes=0`` (hubconf loads them ``strict=True``):
      ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv,
      attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``. timm's ViT has the same modules under
      the same names and computes the same function at the trained input size (LayerNorm eps
      1e-6, qkv bias, class-token pooling after the final norm), so the file becomes the timm
      backbone :data:`DINO_VITS` names, its depth and input size read off the keys.
    * ``*_pretrain_full_checkpoint.pth`` (main_dino.py's ``save_dict``): see
      :func:`_convert_dino_full`.

    Inputs as DINO evaluates them: shorter side 256 (bicubic), centre crop 224, ImageNet mean/std.
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("teacher"), Mapping):
        return _convert_dino_full(checkpoint)
    state = _unwrap("dino", checkpoint)
    if "patch_embed.proj.weight" in state:
        timm_model = _dino_vit(state)
        return Converted("DINO ViT backbone (dino_*_pretrain.pth)", state, timm_model=timm_model,
                         preprocessing=_dino_vit_preprocessing(timm_model))
    return _bare_resnet("dino", checkpoint, "DINO ResNet-50 backbone (dino_resnet50_pretrain.pth)",
                        "main_dino.py's MultiCropWrapper replaces it with nn.Identity",
                        preprocessing=dict(_DINO_PREPROCESSING))


def _convert_dino_full(checkpoint: Mapping) -> Converted:
    """main_dino.py's ``save_dict``: ``{"student", "teacher", "optimizer", "epoch", "args",
    "dino_loss", "fp16_scaler"?}``.

    ``teacher`` is the ``MultiCropWrapper`` state dict (``module.``-prefixed when the teacher is
    wrapped in DistributedDataParallel, i.e. for ResNets): ``backbone.*`` (the network, as in the
    backbone-only files) and the ``DINOHead``: ``head.mlp.*`` (Linear, optional BatchNorm1d, GELU
    per hidden layer, then a Linear to the 256-d bottleneck; one Linear when ``nlayers=1``) and
    ``head.last_layer.weight_g`` / ``weight_v``, the ``nn.utils.weight_norm`` Linear to K = 65536
    outputs that the head applies to the L2-normalised bottleneck.

    Kept (the teacher, which DINO evaluates): backbone, ``head.mlp`` as the projection head
    (GELUs), and the last layer as the prototypes with its weight folded to
    ``weight_g * weight_v / ‖weight_v‖`` row-wise — what weight_norm recomputes in every forward —
    so "prototypes" gives the head's K logits. Dropped: the student and the training state;
    ``args`` is also recorded in ``source_hparams`` and its ``arch``/``patch_size`` must agree
    with the keys.
    """
    teacher = _unwrap("dino", checkpoint, "teacher")
    keys = dict(teacher)
    backbone, mlp, last = _take(teacher, "backbone."), _take(teacher, "head.mlp."), _take(teacher, "head.last_layer.")
    if not backbone or not mlp or set(last) != {"weight_g", "weight_v"} or teacher:
        raise _layout_error("dino", checkpoint, keys,
                            "teacher keys backbone.*, head.mlp.* and head.last_layer.weight_g/weight_v (main_dino.py's "
                            "MultiCropWrapper with a DINOHead)")
    # DINOHead with nlayers=1: head.mlp is a single Linear, not a Sequential.
    head = {f"0.{key}": value for key, value in mlp.items()} if set(mlp) <= {"weight", "bias"} else mlp
    scale, direction = last["weight_g"], last["weight_v"]
    if direction.ndim != 2 or tuple(scale.shape) != (direction.shape[0], 1):
        raise UserError(
            f"DINO's head.last_layer should be a weight-normalised Linear: weight_v (K, bottleneck) and weight_g "
            f"(K, 1); this file has weight_v {tuple(direction.shape)} and weight_g {tuple(scale.shape)}."
        )
    # nn.utils.weight_norm(linear, dim=0): weight = g * v / ||v|| over all dims but the output dim.
    prototypes = scale * direction / direction.norm(dim=1, keepdim=True)
    student = checkpoint.get("student")
    dropped = {_DINO_STUDENT: sorted(f"student.{key}" for key in student)} if isinstance(student, Mapping) else {}
    dropped |= _training_state(checkpoint, "teacher", "student")
    args = checkpoint.get("args")
    values = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, Mapping) else {}
    recorded = {key: values[key] for key in _DINO_HPARAMS if isinstance(values.get(key), str | int | float | bool)}
    # main_dino.py renames deit_* to vit_* before saving args; older runs may keep "deit".
    arch = values["arch"].replace("deit", "vit") if isinstance(values.get("arch"), str) else None
    options: dict[str, Any] = {"head": head, "prototypes": prototypes, "dropped": dropped, "head_activation": "gelu",
                               "extra_meta": {"source_hparams": recorded} if recorded else {}}
    if "patch_embed.proj.weight" in backbone:
        timm_model = _dino_vit(backbone)
        patch = values.get("patch_size")
        if arch is not None and isinstance(patch, int) and not timm_model["model_name"].startswith(f"{arch}_patch{patch}_224."):
            raise UserError(
                f"The teacher's keys hold a {timm_model['model_name'].split('.')[0]}, although its args say arch "
                f"{arch!r}, patch_size {patch!r}. Is the file a mix of two runs?"
            )
        return Converted("DINO full checkpoint, ViT teacher (backbone + head)", backbone, timm_model=timm_model,
                         preprocessing=_dino_vit_preprocessing(timm_model), **options)
    _reject_classifier(backbone, "DINO's backbone has no fc (MultiCropWrapper replaces it with nn.Identity)")
    return Converted("DINO full checkpoint, ResNet teacher (backbone + head)", backbone, arch=arch,
                     arch_source=f"its args (arch {arch!r})", preprocessing=dict(_DINO_PREPROCESSING), **options)


def _dino_vit(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The timm model of DINO ViT weights: ``{"model_name", "img_size", "depth"}`` read off the keys
    (width and patch size from ``patch_embed.proj.weight``, the trained input size from
    ``pos_embed``'s grid, the depth from ``blocks.N``)."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    depth = 1 + max((int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))), default=-1)
    if proj is None or proj.ndim != 4 or pos is None or pos.ndim != 3 or depth == 0:
        raise UserError(
            "DINO ViT weights need patch_embed.proj.weight (a 4-D conv), pos_embed (1, 1 + patches, width) and "
            f"blocks.N.*; found {listing(sorted(state), 8)}."
        )
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    name = DINO_VITS.get((width, patch))
    if name is None:
        raise UserError(
            f"This ViT has width {width} and {patch}x{patch} patches; DINO released ViT-S/16, ViT-S/8, ViT-B/16 and "
            "ViT-B/8 (widths 384 and 768, patches 16 and 8), which sslens maps onto timm. For another ViT whose keys "
            "are timm's, use --format timm --timm-name NAME."
        )
    side = math.isqrt(int(pos.shape[1]) - 1)
    if side * side != int(pos.shape[1]) - 1:
        raise UserError(f"pos_embed {tuple(pos.shape)} is not a class token plus a square grid of patches.")
    return {"model_name": name, "img_size": side * patch, "depth": depth}


def _dino_vit_preprocessing(timm_model: Mapping[str, Any]) -> dict[str, Any]:
    size = int(timm_model["img_size"])
    return {**_DINO_PREPROCESSING, "image_size": [size, size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


#: solo-learn BYOL (``solo/methods/byol.py`` over ``BaseMomentumMethod``) state-dict parts that
#: are not kept, by reason.
_SOLO_BYOL_DROPPED = {
    "BYOL predictor (applied to the online projection only during training; not part of the representation)":
        ("predictor.",),
    "momentum (target) network: the moving average of backbone and projector that makes BYOL's targets":
        ("momentum_backbone.", "momentum_projector."),
    "solo-learn's online linear classifiers (supervised, trained on detached features)":
        ("classifier.", "momentum_classifier."),
}

#: solo-learn BYOL's projector and predictor (Linear, BatchNorm1d, ReLU, Linear, with biases).
#: Its MoCo v3, which also has momentum_backbone and predictor, ends in a bias-free Linear and
#: an affine-free BatchNorm1d (projector.4.*), and NNBYOL adds a queue.
_SOLO_BYOL_MLP = frozenset({"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                            "1.num_batches_tracked", "3.weight", "3.bias"})


def _is_solo_byol(keys: set[str]) -> bool:
    """The keys of a solo-learn BYOL state dict: momentum networks, and BYOL's two MLPs."""
    mlps = [{key.removeprefix(prefix) for key in keys if key.startswith(prefix)} for prefix in ("projector.", "predictor.")]
    return _prefixed(keys, "momentum_backbone.") and "queue" not in keys and all(
        mlp and _SOLO_BYOL_MLP - {"1.num_batches_tracked"} <= mlp <= _SOLO_BYOL_MLP for mlp in mlps
    )


#: The departure recorded for DeepMind's BYOL weights converted by chigur/byol-convert.
_BYOL_SAME_PADDING = (
    "DeepMind's BYOL ResNet-50 (and chigur/byol-convert's resnet.py, which runs the converted weights) pads "
    "TensorFlow-style ('SAME': 2/3 pixels around the 7x7 stride-2 conv1, 0/1 around the stride-2 max-pool and 3x3 "
    "convs); sslens's ResNet pads symmetrically as torchvision does, so its features differ from the original's "
    "slightly at every stride-2 layer"
)


def convert_byol(checkpoint: Any) -> Converted:
    """BYOL (https://arxiv.org/abs/2006.07733) checkpoints from its common PyTorch ports.

    * solo-learn (https://github.com/vturrisi/solo-learn) PyTorch Lightning checkpoints of
      ``solo/methods/byol.py``: ``{"state_dict", "epoch", "global_step", "optimizer_states",
      ...}``, keys ``backbone.*`` (a torchvision resnet18/resnet50 whose ``fc`` base.py replaced
      by ``nn.Identity``), ``projector.{0,1,3}.*`` (Linear, BatchNorm1d, ReLU, Linear),
      ``predictor.*``, ``momentum_backbone.*``, ``momentum_projector.*``, ``classifier.*`` (and
      ``momentum_classifier.*``). Backbone and projector are kept (:data:`_SOLO_BYOL_DROPPED`
      says why the rest is not). Its CIFAR models are refused: base.py gives them a 3x3 conv1
      with padding 2 (a 34x34 map from 32x32 inputs), which sslens's CIFAR stem (padding 1)
      does not compute.
    * DeepMind's ResNet-50 (``pretrain_res50x1.pkl``, https://github.com/deepmind/deepmind-research/tree/master/byol)
      converted by chigur/byol-convert (https://github.com/chigur/byol-convert) ``convert.py``:
      a bare torchvision-named state dict with ``fc`` (BYOL's online classifier) and without
      any ``num_batches_tracked`` (the converter filters them out), ``pretrain_res50x1.pth.tar``.
      The backbone is kept, departing from the source in its padding (:data:`_BYOL_SAME_PADDING`,
      recorded in ``meta["departures"]``).
    * A torchvision ResNet with ``num_batches_tracked``: what lucidrains/byol-pytorch's README
      saves (``torch.save(resnet.state_dict(), ...)``). Its learner's own state dict
      (``online_encoder.*``, ``target_encoder.*``) is refused with how to re-save it: its
      projector's layout changed between releases.
    """
    state = _unwrap("byol", checkpoint, "state_dict")
    if any(key.startswith(("online_encoder.", "target_encoder.", "online_predictor.")) for key in state):
        raise UserError(
            "This is a lucidrains/byol-pytorch BYOL learner's state dict (online_encoder.*, target_encoder.*); its "
            "projector's layout differs between byol-pytorch releases. Save the trained network as its README does, "
            "torch.save(resnet.state_dict(), 'net.pt') (resnet = the model passed to BYOL, learner.net), and import "
            "that with --format byol."
        )
    if any(key.startswith("momentum_backbone.") for key in state):
        if not _is_solo_byol(set(state)):
            raise _layout_error("byol", checkpoint, state,
                                "solo-learn BYOL's projector.* and predictor.* each Linear (0), BatchNorm1d (1), ReLU, "
                                "Linear (3), with biases (solo/methods/byol.py); other solo-learn methods with a "
                                "momentum backbone (MoCo v3, NNBYOL, ...) are not BYOL")
        return _convert_solo_byol(checkpoint, state)
    if guess_format(checkpoint) != "torchvision":
        raise _layout_error("byol", checkpoint, state,
                            "solo-learn BYOL keys (backbone.*, projector.*, predictor.*, momentum_backbone.*) or a "
                            "torchvision-named ResNet (chigur/byol-convert, lucidrains/byol-pytorch's saved net)")
    # convert.py keeps DeepMind's classifier as fc and filters out every num_batches_tracked.
    if "fc.weight" in state and not any(key.endswith(".num_batches_tracked") for key in state):
        return Converted("DeepMind BYOL converted by chigur/byol-convert (torchvision keys, no num_batches_tracked)",
                         state, extra_meta={"departures": [_BYOL_SAME_PADDING]})
    return Converted("torchvision-named ResNet (as lucidrains/byol-pytorch saves the trained net)", state)


def _convert_solo_byol(checkpoint: Any, state: dict[str, torch.Tensor]) -> Converted:
    """solo-learn BYOL: see :func:`convert_byol`."""
    keys = dict(state)
    backbone, head = _take(state, "backbone."), _take(state, "projector.")
    dropped = {reason: sorted(f"{prefix}{key}" for prefix in prefixes for key in _take(state, prefix))
               for reason, prefixes in _SOLO_BYOL_DROPPED.items()}
    if not backbone or state:
        raise _layout_error("byol", checkpoint, keys,
                            "solo-learn BYOL keys only: backbone.*, projector.*, predictor.*, momentum_backbone.*, "
                            "momentum_projector.*, classifier.* (solo/methods/byol.py)")
    conv1 = backbone.get("conv1.weight")
    if conv1 is None:
        raise UserError(
            "sslens imports solo-learn's ResNet backbones (torchvision resnet18/resnet50); this backbone's keys are "
            f"{listing(sorted(backbone), 6)}. For a timm backbone (ViT, Swin), strip 'backbone.' from its keys and "
            "import them with --format timm --timm-name NAME."
        )
    if conv1.ndim == 4 and conv1.shape[-1] == 3:
        raise UserError(
            "This solo-learn BYOL model has the CIFAR stem, which solo-learn builds as a 3x3 conv1 with padding=2 "
            "(solo/methods/base.py), so 32x32 images give 34x34 feature maps; sslens's CIFAR stem pads by 1 and would "
            "compute a different function. sslens imports solo-learn's ImageNet-stem (7x7) models."
        )
    _reject_classifier(backbone, "solo-learn's backbone has no fc (base.py replaces it with nn.Identity)")
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        dropped |= _training_state(checkpoint, "state_dict")
    return Converted("solo-learn BYOL (backbone + projector)", backbone, head=head,
                     dropped={reason: listed for reason, listed in dropped.items() if listed})


#: Format name (``--format``) → the converter of its layout.
CHECKPOINT_FORMATS: dict[str, Converter] = {
    "moco": convert_moco,
    "swav": convert_swav,
    "simclr": convert_simclr,
    "torchvision": convert_torchvision,
    "timm": convert_timm,
    "barlowtwins": convert_barlowtwins,
    "vicreg": convert_vicreg,
    "dino": convert_dino,
    "byol": convert_byol,
}

#: (format, test on a state dict's keys with ``module.`` removed): the first that passes names
#: the format. SwAV and simclr-pytorch files also hold torchvision keys, so torchvision is late.
#: A bare torchvision-named ResNet is "torchvision" although Barlow Twins', VICReg's and DINO's
#: backbone-only files have that layout too: the keys cannot tell them apart (the formats take
#: it when named), and torchvision is the one whose name promises nothing more.
_FORMAT_SIGNS: tuple[tuple[str, Callable[[set[str]], bool]], ...] = (
    ("moco", lambda keys: any(key.startswith("encoder_q.") for key in keys)),
    # solo-learn BYOL, and lucidrains/byol-pytorch learners (which convert_byol refuses with advice).
    ("byol", lambda keys: _is_solo_byol(keys) or _prefixed(keys, "online_encoder.")),
    ("swav", lambda keys: "prototypes.weight" in keys or any(key.startswith("projection_head.") for key in keys)),
    ("simclr", lambda keys: any(key.startswith("convnet.") for key in keys)),
    ("barlowtwins", lambda keys: "bn.running_mean" in keys and _only(keys, "backbone.", "projector.", "bn.")),
    ("vicreg", lambda keys: _prefixed(keys, "backbone.", "projector.") and _only(keys, "backbone.", "projector.")),
    ("torchvision", lambda keys: {"conv1.weight", "layer1.0.conv1.weight"} <= keys),
    ("timm", lambda keys: "patch_embed.proj.weight" in keys),
)


def guess_format(checkpoint: Any) -> str | None:
    """The format (a key of :data:`CHECKPOINT_FORMATS`) whose layout a loaded checkpoint has,
    from its keys alone; None when it has none sslens knows. Never raises.

    ``{"resnet": ..., "head": ...}`` → "simclr" (Separius); a ``teacher`` dict → "dino" (its
    full checkpoints); then, on the state dict (under ``state_dict`` or ``model``, else the
    checkpoint itself): ``encoder_q.*`` → "moco", ``momentum_backbone.*`` + ``predictor.*``
    (solo-learn) or ``online_encoder.*`` (lucidrains/byol-pytorch) → "byol",
    ``prototypes.weight`` or ``projection_head.*`` → "swav", ``convnet.*`` → "simclr"
    (AndrewAtanov/simclr-pytorch), only ``backbone.*``, ``projector.*`` and ``bn.running_mean``
    ... → "barlowtwins", only ``backbone.*`` and ``projector.*`` → "vicreg", ``conv1.weight`` +
    ``layer1.0.conv1.weight`` → "torchvision", ``patch_embed.proj.weight`` → "timm" (ViTs).

    The last two are also the layouts of files that other formats name: tonylins/simclr-converter
    ("simclr"), Barlow Twins', VICReg's and DINO's backbone-only ``*.pth``, chigur/byol-convert
    ("byol") are bare torchvision ResNets, DINO's backbone-only ViTs bare timm ViTs. The keys
    cannot tell those apart, so they guess the plain format; name the specific one with
    ``--format`` to have its layout checked and its preprocessing and heads recorded.

    >>> guess_format({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}})
    'moco'
    """
    if not isinstance(checkpoint, Mapping):
        return None
    if isinstance(checkpoint.get("resnet"), Mapping):
        return "simclr"
    if isinstance(checkpoint.get("teacher"), Mapping):
        return "dino"
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
    """image_size, mean, std, crop_pct, interpolation the source model expects: the timm
    model's ``pretrained_cfg``, or ImageNet's (CIFAR's for a CIFAR stem) with the file's own
    mean/std; then whatever the converter knows of the authors' evaluation (DINO: bicubic
    resizing, and for its ViTs the input size of their position embeddings)."""
    if isinstance(backbone, TimmBackbone):
        cfg = backbone.model.pretrained_cfg
        inputs = {
            "image_size": [int(s) for s in cfg.get("input_size", (3, 224, 224))[1:]],
            "mean": [float(m) for m in cfg.get("mean", IMAGENET_MEAN)],
            "std": [float(s) for s in cfg.get("std", IMAGENET_STD)],
            "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "interpolation": str(cfg.get("interpolation", "bicubic")),
        }
    else:
        base = CIFAR_PREPROCESSING if isinstance(backbone, ResNet) and backbone.stem_type == "cifar" else IMAGENET_PREPROCESSING
        inputs = {**base, "mean": converted.mean or base["mean"], "std": converted.std or base["std"]}
    return {**inputs, **converted.preprocessing}


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
            "timm", "barlowtwins", "vicreg", "dino", "byol").
        out_dir: the model directory to write (``model.safetensors`` + ``meta.json``).
        arch: the ResNet of moco/swav/simclr/torchvision checkpoints (a name in
            :data:`RESNET_NAMES`, e.g. "resnet50" or "resnet50-cifar"); None = the one the keys
            describe (:func:`infer_resnet_arch`). Given, it must match the keys and the file's
            own record (MoCo's ``arch``, simclr-pytorch's hparams, DINO's args). Not used with
            timm; for DINO's ViTs, whose keys name their timm model, it may only repeat that
            name.
        timm_name: the timm model name, for ``format="timm"`` (and only then).
        overwrite: replace an existing non-empty ``out_dir``.

    ``meta.json`` records ``source_format``, ``source_layout``, ``source_file``,
    ``source_sha256``, ``arch``, the preprocessing (``image_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``; 32 px and crop_pct 1.0 for a CIFAR stem), ``kept``
    (backbone / projection_head / prototypes), ``dropped`` (reason → source keys) and, for
    simclr-pytorch and DINO full checkpoints, ``source_hparams``; ``departures`` where the
    imported model cannot compute exactly what the source did (chigur/byol-convert's padding). Any key that is neither kept nor dropped for a
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
    # Not ResNets: timm files (--timm-name names the model) and DINO's ViTs (their keys name it).
    if converted.timm_model is not None:
        timm_options = dict(converted.timm_model)
        _check_timm_arch(arch, timm_options["model_name"])
    else:
        timm_options = {"model_name": timm_name} if format == "timm" else None
    resnet = None if timm_options is not None else _resolve_arch(arch, converted)
    head = head_spec(converted.head, converted.head_activation) if converted.head else None
    num_prototypes = 0 if converted.prototypes is None else int(converted.prototypes.shape[0])
    meta: dict[str, Any] = {
        "method": "imported",
        "method_options": {"head": head, "num_prototypes": num_prototypes},
        "backbone": resnet or "timm",
        "backbone_options": {} if resnet else timm_options,
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
        arch=resnet or timm_options["model_name"],
        kept=kept,
        dropped={reason: sorted(keys) for reason, keys in dropped.items() if keys},
        **converted.extra_meta,
        **provenance(),
    )
    return save_model(out, method, meta)


def _check_timm_arch(requested: str | None, model_name: str) -> None:
    """--arch, if given for a file whose keys name its timm model, must be that model."""
    if requested not in (None, model_name, model_name.split(".")[0]):
        raise UserError(
            f"The checkpoint holds a {model_name} (read off its keys); --arch {requested} does not fit. "
            "Leave --arch out."
        )


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
    lines += [f"  departs from the source: {departure}" for departure in meta.get("departures", [])]
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
