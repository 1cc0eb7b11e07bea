"""``sslens explain``: explain image files with a trained model and write maps and figures.

For every image ``<out>/<stem>_<method>.npz`` holds the raw maps (``importance``, ``uncertainty``
where the method has one, ``component_<name>`` per component), the preprocessed image
(``image`` uint8 (H, W, 3) and ``input``, the normalised (3, H, W) float32 the model saw) and
``info``, a JSON string recording the model, the method and its options, and every
preprocessing step. ``<out>/<stem>_<method>.png`` draws the image, each map with a colour bar
in raw values, and its overlay.

Explainer options are matched to the explainer by its signature, so a new registered explainer
needs no change here: ``--layer`` goes to explainers with a ``layer`` option, ``--reference`` to
those whose call takes a ``reference`` (the CAM family), and so on.

Under ``torchrun --nproc_per_node=N -m sslens explain ...`` each process explains every N-th
image and writes its files; rank 0 prints what all of them wrote. Every image is explained in a
call of its own with the same seed (masks and augmented views are drawn anew per call), and
output names come from the whole list, so the files are those of a single process.

>>> explain_images("runs/simclr", ["cat.jpg"], method="gradcam", reference="augmented")  # doctest: +SKIP
[PosixPath('explanations/cat_gradcam.npz'), PosixPath('explanations/cat_gradcam.png')]
"""

from __future__ import annotations

import functools
import inspect
import json
import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.distributed import gather_objects, init_distributed, shard, unshard, world
from sslens.errors import UserError

# Imported for their side effect: each registers its explainers in EXPLAINERS.
from sslens.explain import gradcam, perceptual, relax  # noqa: F401
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.depth import midas_depth_estimator
from sslens.explain.display import save_explanation_png, to_display_image
from sslens.explain.images import check_readable, list_image_files, load_image_tensor

#: Input size for torchvision ImageNet ResNets loaded with ``weights=``.
TORCHVISION_IMAGE_SIZE = (224, 224)

#: Explainer option → the CLI flag that sets it, for error messages.
USER_OPTIONS = {
    "layer": "--layer", "num_masks": "--num-masks", "components": "--components",
    "depth_estimator": "--depth-model",
}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA where available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"Unknown device {device!r} ({error}). Use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {device!r} was asked for but CUDA is not available here. Use --device cpu.")
    return resolved


def load_encoder(
    model: str | None, *, weights: str | None, arch: str | None, output: str, device: torch.device
) -> tuple[nn.Module, dict]:
    """(encoder in eval mode on ``device``, description) of an sslens model or a torchvision ResNet.

    The description holds ``image_size``, ``mean``, ``std`` and what was loaded.
    """
    if weights is not None:
        if model is not None:
            raise UserError("Pass either an sslens model (run or model directory) or --weights, not both.")
        return _load_torchvision(weights, arch, output, device)
    if model is None:
        raise UserError("No model given. Pass an sslens run or model directory, or --weights with --arch.")
    if arch is not None:
        raise UserError("--arch is only used with --weights (a torchvision state dict); an sslens model knows its backbone.")
    from sslens.train.checkpoint import load_model

    method, meta = load_model(model, device)
    try:
        encoder = method.encoder(output)
    except ValueError as error:
        raise UserError(f"--output: {error}") from error
    return encoder.eval(), {
        "model": str(model),
        "method": meta.get("method"),
        "backbone": meta.get("backbone"),
        "output": output,
        "image_size": [int(s) for s in meta["image_size"]],
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        # Imported ImageNet models record their own crop (e.g. 256 → 224); sslens-trained ones
        # were trained on whole images.
        "crop_pct": float(meta.get("crop_pct", 1.0)),
        "interpolation": str(meta.get("interpolation", "bicubic")),
    }


def _load_torchvision(weights: str, arch: str | None, output: str, device: torch.device) -> tuple[nn.Module, dict]:
    from sslens.models import ResNet, create_backbone, load_torchvision_state_dict

    if arch is None:
        raise UserError("--weights needs --arch, the torchvision architecture of the state dict (e.g. resnet50).")
    if output != "pooled":
        raise UserError("A torchvision ResNet has no projection head; use --output pooled with --weights.")
    try:
        backbone = create_backbone(arch)
    except ValueError as error:
        raise UserError(f"--arch: {error}") from error
    if not isinstance(backbone, ResNet):
        raise UserError(f"--arch {arch} is not a ResNet; --weights loads torchvision ResNet state dicts.")
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist. Pass a torchvision state dict file (.pth).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"Cannot load {path} as a state dict with torch.load(weights_only=True): {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    # DataParallel checkpoints prefix every key with "module.".
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        load_torchvision_state_dict(backbone, state)
    except ValueError as error:
        raise UserError(f"{path} does not fit --arch {arch}: {error}") from error
    return backbone.to(device).eval(), {
        "weights": str(path),
        "arch": arch,
        "output": output,
        "image_size": list(TORCHVISION_IMAGE_SIZE),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        # torchvision's ImageNet evaluation transform: resize to 256, centre-crop 224, bilinear.
        "crop_pct": 224 / 256,
        "interpolation": "bilinear",
    }


def check_options(method: str, names: Iterable[str]) -> Callable[..., Explainer]:
    """``method``'s factory, once every option in ``names`` is one it accepts (else a UserError
    naming the command-line flag)."""
    try:
        factory = EXPLAINERS.get(method)
    except ValueError as error:
        raise UserError(f"--method: {error}") from error
    accepted = inspect.signature(factory).parameters
    for name in names:
        if name not in accepted:
            raise UserError(f"{USER_OPTIONS.get(name, name)} does not apply to {method}; leave it out.")
    return factory


def build_explainer(method: str, encoder: nn.Module, options: dict, defaults: dict) -> Explainer:
    """``EXPLAINERS.create(method, encoder, ...)`` with the options its factory accepts.

    ``options`` are set by the user (not None): each must be an option of the explainer.
    ``defaults`` (seed, mean, std) are passed where the explainer takes them.
    """
    factory = check_options(method, options)
    accepted = inspect.signature(factory).parameters
    kwargs = {**{k: v for k, v in defaults.items() if k in accepted}, **options}
    try:
        return factory(encoder, **kwargs)
    except (ValueError, TypeError) as error:
        raise UserError(f"{method}: {error}") from error


def _reference_kwargs(
    explainer: Explainer, method: str, reference: str | None, load: Callable, device: torch.device
) -> tuple[dict, dict]:
    """(call kwargs, record) for ``--reference``: an image, a folder (mean embedding), or "augmented"."""
    wants_reference = "reference" in inspect.signature(explainer.explain).parameters
    if not wants_reference:
        if reference is not None:
            raise UserError(f"--reference does not apply to {method}; leave it out.")
        return {}, {}
    if reference is None:
        raise UserError(
            f"{method} explains the similarity of each image's embedding with a reference embedding: "
            "pass --reference IMAGE, --reference FOLDER (the mean embedding of its images), or "
            "--reference augmented (an augmented view of each image itself)."
        )
    if reference == "augmented":
        return {"reference": "augmented"}, {"reference": "augmented"}
    files = list_image_files([reference])
    tensors = torch.stack([load(f)[0] for f in files]).to(device)
    if Path(reference).is_dir():
        return {"reference_set": tensors}, {"reference_set": [str(f) for f in files]}
    return {"reference": tensors}, {"reference": str(files[0])}


def _unique_stems(files: Sequence[Path]) -> list[str]:
    """File stems, with ``-2``, ``-3``... added where two inputs share one, so no output is overwritten."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return stems


def _maps(method: str, explanation: Explanation, size) -> dict[str, np.ndarray]:
    """Image i=0's maps of input resolution, in display order, keyed by name."""
    maps = {method: explanation.importance[0]}
    if explanation.uncertainty is not None:
        maps["uncertainty"] = explanation.uncertainty[0]
    maps.update({name: value[0] for name, value in explanation.components.items()})
    return {
        name: value.detach().float().cpu().numpy()
        for name, value in maps.items()
        if tuple(value.shape) == tuple(size)
    }


def explain_images(
    model: str | None,
    images: Sequence[str],
    *,
    method: str = "relax",
    out_dir: str | Path = "explanations",
    reference: str | None = None,
    layer: str | None = None,
    components: Sequence[str] | None = None,
    weights: str | None = None,
    arch: str | None = None,
    output: str = "pooled",
    num_masks: int | None = None,
    seed: int = 0,
    device: str = "auto",
    depth_model: str | None = None,
) -> list[Path]:
    """Explain each image file (folders expand to their images, sorted) and write npz + png.

    Args:
        model: an sslens run directory, model directory or checkpoint (see
            :func:`sslens.train.checkpoint.load_model`); None when ``weights`` is given.
        images: image files and/or folders; any size and PIL mode.
        method: a registered explainer ("relax", "perceptual", "gradcam", "gradcam++", ...).
        out_dir: where ``<stem>_<method>.npz`` / ``.png`` go (created).
        reference: for the CAM family, an image file, a folder (its mean embedding), or
            "augmented" (a seeded augmented view of each image).
        layer: CAM layer name ("stem", "layer1" ... "layer4" or a dotted submodule path).
        components: perceptual components to compute.
        weights, arch: a local torchvision ResNet state dict and its architecture ("resnet18",
            "resnet34", "resnet50"), instead of an sslens model; ImageNet normalisation, 224 px.
        output: "pooled" (backbone representation) or "projection" (projection-head output).
        num_masks: masks for RELAX-based methods (default: the explainer's).
        seed: seeds masks and augmented views.
        device: "auto", "cpu", "cuda", ...
        depth_model: a MiDaS model (:data:`~sslens.explain.depth.MIDAS_MODELS`, e.g.
            "MiDaS_small") that estimates depth for the perceptual "depth" component, loaded
            through ``torch.hub``; None: that component is skipped, and the output says so.

    Returns the paths written, npz then png for each image (under torchrun: by all processes).
    Bad input raises :class:`~sslens.errors.UserError` with a message saying what to change.
    """
    torch_device = init_distributed(resolve_device(device))
    current = world()
    if method not in EXPLAINERS:
        raise UserError(f"Unknown method {method!r}. Valid methods: {', '.join(EXPLAINERS.names())}.")
    files = list_image_files(images)
    # Fail before any minutes of explaining, not at the tenth image.
    check_readable(files)
    encoder, source = load_encoder(model, weights=weights, arch=arch, output=output, device=torch_device)
    size, mean, std = source["image_size"], source["mean"], source["std"]
    user_options = {"layer": layer, "num_masks": num_masks, "components": list(components) if components else None}
    user_options = {k: v for k, v in user_options.items() if v is not None}
    factory_options = dict(user_options)
    if depth_model is not None:
        check_options(method, ["depth_estimator"])  # before MiDaS loads, which can take minutes or fail offline
        try:
            factory_options["depth_estimator"] = midas_depth_estimator(depth_model, torch_device)
        except ValueError as error:
            raise UserError(f"--depth-model: {error}") from error
        user_options["depth_model"] = depth_model
    explainer = build_explainer(method, encoder, factory_options, {"seed": seed, "mean": mean, "std": std})
    load = functools.partial(
        load_image_tensor, size=size, mean=mean, std=std,
        crop_pct=source["crop_pct"], interpolation=source["interpolation"],
    )
    call_kwargs, reference_record = _reference_kwargs(explainer, method, reference, load, torch_device)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stems are made unique over the whole list before it is split, so names do not depend on N.
    mine: list[tuple[list[Path], str]] = []  # (paths written, what was done) per image of this rank
    for path, stem in shard(list(zip(files, _unique_stems(files), strict=True)), current):
        tensor, preprocessing = load(path)
        batch = tensor[None].to(torch_device)
        explanation = explainer(batch, **call_kwargs)
        image = to_display_image(batch, mean, std)[0]
        info = {
            "method": method,
            "source": source,
            "options": {**user_options, "seed": seed},
            **reference_record,
            "preprocessing": preprocessing,
            "explainer": explanation.info,
        }
        arrays = {"importance": explanation.importance[0].detach().float().cpu().numpy()}
        if explanation.uncertainty is not None:
            arrays["uncertainty"] = explanation.uncertainty[0].detach().float().cpu().numpy()
        for name, value in explanation.components.items():
            arrays[f"component_{name}"] = value[0].detach().float().cpu().numpy()
        npz_path = out / f"{stem}_{method}.npz"
        np.savez_compressed(
            npz_path, **arrays, image=image, input=tensor.numpy(), info=np.array(json.dumps(info, default=str))
        )
        png_path = save_explanation_png(
            out / f"{stem}_{method}.png", image, _maps(method, explanation, size),
            title=f"{method} · {path.name} · {source.get('model') or source.get('weights')}",
        )
        line = f"{path}: wrote {npz_path} and {png_path}"
        # A skipped component (e.g. depth with no depth source) is said here, not only in the npz.
        line += "".join(f"; skipped {name}: {why}" for name, why in explanation.info.get("skipped", {}).items())
        if "depth" in explanation.info.get("skipped", {}) and depth_model is None:
            line += " (pass --depth-model MiDaS_small to estimate depth with MiDaS)"
        if not current.distributed:
            print(line)
        mine.append(([npz_path, png_path], line))
    done = unshard(gather_objects(mine), len(files))
    if current.distributed and current.is_main:
        for _, line in done:
            print(line)
        print(f"{current.size} processes explained {len(files)} images into {out}")
    return [written for paths, _ in done for written in paths]
