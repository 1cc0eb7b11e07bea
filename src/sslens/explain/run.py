"""``sslens explain``: explain image files with a trained model and write maps and figures.

For every image ``<out>/<stem>_<method>.npz`` holds the raw maps (``importance``, ``uncertainty``
where the method has one, ``component_<name>`` per component), the preprocessed image
(``image`` uint8 (H, W, 3) and ``input``, the normalised (3, H, W) float32 the model saw) and
``info``, a JSON string recording the model, the method and its options, and every
preprocessing step. ``<out>/<stem>_<method>.png`` draws the image, each map with a colour bar
in raw values, and its overlay.

Explainers are built through the one front door, :func:`sslens.explain.base.create_explainer`,
so a new registered explainer needs no change here: ``--layer`` goes to explainers with a
``layer`` option, ``--reference`` to those whose call takes a ``reference`` (the CAM family),
and a flag an explainer does not take is refused by name. A published checkpoint (``--format``,
or a torchvision state dict with ``--weights``) is imported once into the user cache
(:func:`sslens.published.import_cached`) and explained like any sslens model.

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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslens.data.images import check_readable, list_image_files, load_image_tensor
from sslens.device import resolve_device
from sslens.distributed import (
    broadcast_object,
    gather_objects,
    init_distributed,
    shard,
    unshard,
    world,
)
from sslens.errors import UserError
from sslens.explain.base import Explainer, Explanation, check_explainer_options, create_explainer
from sslens.explain.depth import midas_depth_estimator
from sslens.explain.display import save_explanation_png, to_display_image
from sslens.store import load_model

#: Explainer option → the command-line flag that sets it, for error messages.
FLAGS = {
    "layer": "--layer", "num_masks": "--num-masks", "components": "--components",
    "depth_estimator": "--depth-model",
}


def load_encoder(model: str, *, output: str, device: torch.device) -> tuple[nn.Module, dict]:
    """(encoder in eval mode on ``device``, description) of an sslens model.

    The description holds ``image_size``, ``mean``, ``std``, the resize (``crop_pct``,
    ``interpolation``) the model expects and what was loaded.
    """
    method, meta = load_model(model, device)
    try:
        encoder = method.encoder(output)
    except ValueError as error:
        raise UserError(f"--output: {error}") from error
    source = {
        "model": str(model),
        "method": meta.get("method"),
        "backbone": meta.get("backbone"),
        "output": output,
        "image_size": [int(s) for s in meta["image_size"]],
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        # Imported ImageNet models record their own crop (e.g. 256 → 224); sslens-trained ones
        # were trained on whole images resized as the image loader resizes training data.
        "crop_pct": float(meta.get("crop_pct", 1.0)),
        "interpolation": str(meta.get("interpolation", "bilinear")),
    }
    if "arch" in meta:
        source["arch"] = meta["arch"]
    return encoder.eval(), source


def _published_model(
    model: str | None, weights: str | None, format: str | None, arch: str | None, timm_name: str | None
) -> tuple[str, dict]:
    """The sslens model to explain: ``model`` itself, or the model directory a published
    checkpoint (``format``; ``weights`` = a torchvision state dict) is imported into."""
    if weights is not None:
        if model is not None or format is not None:
            raise UserError("Pass either an sslens model (run or model directory), --format with a checkpoint, or --weights.")
        if arch is None:
            raise UserError("--weights needs --arch, the torchvision architecture of the state dict (e.g. resnet50).")
        model, format = weights, "torchvision"
    if model is None:
        raise UserError("No model given. Pass an sslens run or model directory, or --weights with --arch.")
    if format is None:
        if arch is not None or timm_name is not None:
            raise UserError(
                "--arch and --timm-name describe a published checkpoint (with --format or --weights); "
                "an sslens model knows its backbone."
            )
        return model, {}
    from sslens.published import import_cached

    # Under torchrun rank 0 imports into the shared cache and the others use its folder,
    # rather than all writing the same folder at once.
    imported = broadcast_object(
        str(import_cached(model, format, arch=arch or "resnet50", timm_name=timm_name)) if world().is_main else None
    )
    return imported, {"checkpoint": str(model), "format": format}


def _reference_kwargs(
    explainer: Explainer, method: str, reference: str | None, load: Callable, device: torch.device
) -> tuple[dict, dict]:
    """(call kwargs, record) for ``--reference``: an image, a folder (mean embedding), or "augmented"."""
    wants_reference = "reference" in inspect.signature(explainer.explain).parameters
    if not wants_reference:
        if reference is not None:
            raise UserError(f"--reference does not apply to the {method} explainer; leave it out.")
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
    format: str | None = None,
    arch: str | None = None,
    timm_name: str | None = None,
    output: str = "pooled",
    num_masks: int | None = None,
    seed: int = 0,
    device: str = "auto",
    depth_model: str | None = None,
) -> list[Path]:
    """Explain each image file (folders expand to their images, sorted) and write npz + png.

    Args:
        model: an sslens run directory, model directory or checkpoint (see
            :func:`sslens.store.load_model`), or with ``format`` a published checkpoint file;
            None when ``weights`` is given.
        images: image files and/or folders; any size and PIL mode.
        method: a registered explainer ("relax", "perceptual", "gradcam", "gradcam++", ...).
        out_dir: where ``<stem>_<method>.npz`` / ``.png`` go (created).
        reference: for the CAM family, an image file, a folder (its mean embedding), or
            "augmented" (a seeded augmented view of each image).
        layer: CAM layer name ("stem", "layer1" ... "layer4" or a dotted submodule path).
        components: perceptual components to compute.
        weights: a local torchvision ResNet state dict, the same as ``model=weights,
            format="torchvision"``; ImageNet normalisation, 224 px.
        format, arch, timm_name: the layout of a published checkpoint ``model`` (moco, swav,
            simclr, torchvision, timm; see :func:`sslens.published.import_checkpoint`).
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
    user_options = {"layer": layer, "num_masks": num_masks, "components": list(components) if components else None}
    user_options = {k: v for k, v in user_options.items() if v is not None}
    # Every flag is checked before any file is read or any model loaded.
    check_explainer_options(method, [*user_options, *(["depth_estimator"] if depth_model else [])], flags=FLAGS)
    files = list_image_files(images)
    # Fail before any minutes of explaining, not at the tenth image.
    check_readable(files)
    model, imported = _published_model(model, weights, format, arch, timm_name)
    encoder, source = load_encoder(model, output=output, device=torch_device)
    source.update(imported)
    if weights is not None:
        source["weights"] = str(weights)
    size, mean, std = source["image_size"], source["mean"], source["std"]
    factory_options = dict(user_options)
    if depth_model is not None:
        try:
            factory_options["depth_estimator"] = midas_depth_estimator(depth_model, torch_device)
        except ValueError as error:
            raise UserError(f"--depth-model: {error}") from error
        user_options["depth_model"] = depth_model
    explainer = create_explainer(
        method, encoder, factory_options, context={"seed": seed, "mean": mean, "std": std}, flags=FLAGS
    )
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
