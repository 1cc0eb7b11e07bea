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
  kernels) or by tonylins/simclr-converter (``{"state_dict": torchvision keys}``, 1x width).
  Both expect unnormalised [0, 1] inputs, which the model directory records (mean 0, std 1).
* ``torchvision``: a torchvision ResNet-18/34/50 state dict.
* ``timm``: a weights file of any timm model, named with ``timm_name``.

Every key of the file is accounted for: loaded, or dropped for a stated reason (recorded in
``meta["dropped"]``); anything else is an error listing the keys.

>>> import_checkpoint("moco_v2_800ep_pretrain.pth.tar", "moco", "models/moco-v2")  # doctest: +SKIP
PosixPath('models/moco-v2')
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.data.cache import user_cache_dir
from sslens.errors import UserError
from sslens.hashing import file_sha256, json_sha256
from sslens.methods.imported import head_spec
from sslens.models.base import Backbone
from sslens.models.resnet import ResNet, load_torchvision_state_dict
from sslens.models.timm_backbone import TimmBackbone
from sslens.registry import lookup
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
    """

    layout: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    prototypes: torch.Tensor | None = None
    dropped: dict[str, list[str]] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None


Converter = Callable[[Any], Converted]


def _unwrap(checkpoint: Any, *nests: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``checkpoint`` (the first of ``nests`` that holds a dict, else the
    checkpoint itself), with DataParallel's ``module.`` prefixes removed."""
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"The file holds a {type(checkpoint).__name__}, not a dict of tensors (a state dict).")
    state = next((checkpoint[key] for key in nests if isinstance(checkpoint.get(key), Mapping)), checkpoint)
    not_tensors = sorted(key for key, value in state.items() if not torch.is_tensor(value))
    if not_tensors:
        raise UserError(
            f"The state dict holds entries that are not tensors: {', '.join(not_tensors[:8])}. "
            f"Is this a training checkpoint whose weights sit under another key? Top-level keys: "
            f"{', '.join(map(str, checkpoint))}."
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def _layout_error(format_name: str, state: Mapping[str, Any], expected: str) -> UserError:
    keys = sorted(map(str, state))
    sample = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
    return UserError(
        f"This is not a {format_name!r} checkpoint in a layout sslens knows: expected {expected}. "
        f"Keys found: {sample}. Known formats: {', '.join(sorted(CHECKPOINT_FORMATS))} "
        "(docs/MODELS.md describes each layout); pass the format that produced the file."
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
    ``module.queue_ptr``. The query encoder is kept; key encoder and queue are dropped.
    """
    state = _unwrap(checkpoint, "state_dict")
    if not any(key.startswith("encoder_q.") for key in state):
        raise _layout_error("moco", state, "keys 'module.encoder_q.*' under 'state_dict' (MoCo v1/v2 pre-training)")
    query = _take(state, "encoder_q.")
    dropped = {"momentum key encoder (encoder_k)": sorted(f"encoder_k.{k}" for k in _take(state, "encoder_k."))}
    queue = sorted(key for key in ("queue", "queue_ptr") if state.pop(key, None) is not None)
    if queue:
        dropped["negatives queue"] = queue
    if state:
        raise _layout_error("moco", state, "only module.encoder_q.*, module.encoder_k.*, module.queue and module.queue_ptr, "
                                "but the keys below are none of these")
    head = _take(query, "fc.")
    if {"weight", "bias"} == set(head):
        layout, head = "MoCo v1 (linear head)", {f"0.{k}": v for k, v in head.items()}
    elif head and all(re.fullmatch(r"[02]\.(weight|bias)", key) for key in head):
        layout = "MoCo v2 (MLP head)"
    else:
        raise _layout_error("moco", {f"encoder_q.fc.{k}": v for k, v in head.items()} or query,
                            "encoder_q.fc.weight/bias (v1) or encoder_q.fc.0.* and fc.2.* (v2)")
    return Converted(layout, query, head=head, dropped=dropped)


def convert_swav(checkpoint: Any) -> Converted:
    """facebookresearch/swav ``src/resnet50.py`` checkpoints (https://github.com/facebookresearch/swav).

    ``module.``-prefixed torchvision-named ResNet keys, ``projection_head.0`` Linear,
    ``projection_head.1`` BatchNorm1d, (ReLU), ``projection_head.3`` Linear (or a single Linear
    ``projection_head.*`` when ``hidden_mlp=0``) and ``prototypes.weight`` (K, 128). The released
    ``swav_800ep_pretrain.pth.tar`` is a bare state dict; training checkpoints nest it under
    ``state_dict``. Multiple prototype sets (``prototypes.prototypes0.*``) are not supported.
    """
    state = _unwrap(checkpoint, "state_dict")
    if "conv1.weight" not in state:
        raise _layout_error("swav", state, "'module.conv1.weight', 'module.layer1.*', 'module.projection_head.*'")
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
)


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

    Both take unnormalised RGB in [0, 1] (the TensorFlow models normalise nothing), recorded as
    mean 0, std 1.
    """
    raw = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("resnet"), Mapping):
        resnet = _unwrap(checkpoint["resnet"])
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
            raise _layout_error("simclr", dict.fromkeys(unknown), f"one of: {'; '.join(SIMCLR_LAYOUTS)}")
        head = _unwrap(checkpoint.get("head", {}))
        head = {key.removeprefix("layers."): value for key, value in head.items()}
        return Converted("Separius/SimCLRv2-Pytorch (1x, sk0)", mapped, head=head, **raw)
    state = _unwrap(checkpoint, "state_dict")
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return Converted("tonylins/simclr-converter (torchvision keys)", state, **raw)
    raise _layout_error("simclr", state, f"one of: {'; '.join(SIMCLR_LAYOUTS)}")


def convert_torchvision(checkpoint: Any) -> Converted:
    """A torchvision ``resnet18/34/50`` state dict (bare or under ``state_dict``); ``fc`` dropped."""
    state = _unwrap(checkpoint, "state_dict")
    if "conv1.weight" not in state:
        raise _layout_error("torchvision", state, "torchvision ResNet keys: conv1.weight, bn1.*, layer1.0.* ...")
    return Converted("torchvision ResNet", state)


def convert_timm(checkpoint: Any) -> Converted:
    """A timm model's weights (bare, or under ``state_dict``/``model`` as timm's train script and
    others save them); the classifier is dropped when loading."""
    return Converted("timm", _unwrap(checkpoint, "state_dict", "model"))


#: Format name (``--format``) → the converter of its layout.
CHECKPOINT_FORMATS: dict[str, Converter] = {
    "moco": convert_moco,
    "swav": convert_swav,
    "simclr": convert_simclr,
    "torchvision": convert_torchvision,
    "timm": convert_timm,
}


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """The contents of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True``.

    Nothing pickled is ever executed: a file that needs arbitrary classes is a UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist. Pass the checkpoint file (.pth, .pth.tar, .pt or .safetensors).")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise UserError(f"Cannot read {path} as safetensors: {error}") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} needs Python's pickle to run code to load (it stores objects other than tensors, "
            f"dicts, lists and numbers), and sslens only loads with torch.load(weights_only=True). In an "
            f"environment you trust, re-save its weights: torch.save(model.state_dict(), 'weights.pth'). "
            f"Details: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"Cannot load {path} with torch.load: {error}. Is it a complete PyTorch checkpoint?") from error


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


def _check_resnet(backbone: Backbone, format_name: str, arch: str) -> None:
    """Checkpoints of every format but timm hold a torchvision-style ImageNet ResNet."""
    if format_name != "timm" and (not isinstance(backbone, ResNet) or backbone.stem_type != "imagenet"):
        raise UserError(
            f"--arch {arch} is not an ImageNet ResNet; {format_name} checkpoints need resnet18, resnet34 "
            "or resnet50. For other architectures use --format timm with --timm-name."
        )


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
    return {
        **IMAGENET_PREPROCESSING,
        "mean": converted.mean or IMAGENET_PREPROCESSING["mean"],
        "std": converted.std or IMAGENET_PREPROCESSING["std"],
    }


def import_checkpoint(
    path: str | os.PathLike,
    format: str,
    out_dir: str | os.PathLike,
    *,
    arch: str = "resnet50",
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
        arch: the ResNet of moco/swav/simclr/torchvision checkpoints ("resnet18", "resnet34",
            "resnet50").
        timm_name: the timm model name, for ``format="timm"`` (and only then).
        overwrite: replace an existing non-empty ``out_dir``.

    ``meta.json`` records ``source_format``, ``source_layout``, ``source_file``,
    ``source_sha256``, ``arch``, the preprocessing (``image_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``), ``kept`` (backbone / projection_head / prototypes) and
    ``dropped`` (reason → source keys). Any key that is neither kept nor dropped for a stated
    reason, and any missing or misshapen key, is a UserError listing them.
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
    head = head_spec(converted.head) if converted.head else None
    num_prototypes = 0 if converted.prototypes is None else int(converted.prototypes.shape[0])
    meta: dict[str, Any] = {
        "method": "imported",
        "method_options": {"head": head, "num_prototypes": num_prototypes},
        # The one format whose architecture is not a ResNet named by arch: timm names its model.
        "backbone": "timm" if format == "timm" else arch,
        "backbone_options": {"model_name": timm_name} if format == "timm" else {},
    }
    try:
        method = build_method(meta)
    except ValueError as error:
        raise UserError(f"{'--timm-name' if format == 'timm' else '--arch'}: {error}") from error
    _check_resnet(method.backbone, format, arch)
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
        arch=timm_name if format == "timm" else arch,
        kept=kept,
        dropped={reason: sorted(keys) for reason, keys in dropped.items() if keys},
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
    arch: str = "resnet50",
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
    key = json_sha256([file_sha256(path), format, arch, timm_name])[:16]
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "imported"
    out_dir = root / f"{format}-{key}"
    if (out_dir / MODEL_FILE).is_file() and (out_dir / META_FILE).is_file():
        return out_dir
    return import_checkpoint(path, format, out_dir, arch=arch, timm_name=timm_name, overwrite=True)
