"""``sslens explain``: explain image files with a trained model and write maps and figures.

For every image ``<out>/<stem>_<method><options>.npz`` holds the raw maps (``importance``,
``uncertainty`` where the method has one, ``component_<name>`` per component, e.g. perceptual
components or CLS attention's heads), the preprocessed image (``image`` uint8 (H, W, 3) and
``input``, the normalised (3, H, W) float32 the model saw), for an explainer against an image or
an augmented view the ``reference_image`` uint8 (H, W, 3), for correspondence the reference's own
map ``reference_importance`` (H, W), and ``info``, a JSON string recording the model, the method
and its options, every preprocessing step (with ``centre_crop`` saying what a centre crop cut
off), the reference (or COCOA's ``corpus`` and ``foil`` files) and the explainer's own record
(correspondence's ``matches``, ``grid`` and ``reference_grid`` among it).
``<out>/<stem>_<method><options>.png`` draws the image, the reference and its cosine similarity
(or a note naming COCOA's corpus and foil), each map with a colour bar in raw values, and its
overlay; for correspondence the reference panel is the reference overlaid with its map, and the
best matched cells are outlined in one colour per match on both images.

``<options>`` names what changes the map, each only when it is not the default, so default runs
keep the name ``<stem>_<method>``: ``_layer3`` (``--layer``), ``_ref-dog`` / ``_refset-dogs``
(``--reference`` an image / a folder; ``augmented`` adds nothing), ``_corpus-dogs_foil-random``
(``--corpus`` / ``--foil``: a folder's name or an image's stem, ``+2`` for two more paths) and
``_projection`` (``--output``). Existing files are never replaced without ``overwrite``
(``--overwrite``), and that is checked before anything is explained.

Bad files do not stop a run: an unreadable image, reference, corpus or foil file (empty,
truncated, not an image, a decompression bomb, which is never decoded) is skipped with an :class:`~sslens.errors.SslensWarning` naming
it and why, the rest is explained, and a :class:`~sslens.errors.UserError` comes only when
nothing could be (or at the first bad file with ``strict``, ``--strict``). A model whose
weights or embeddings are NaN is a UserError; one that ignores its input gets a warning
(:func:`sslens.models.health.degenerate_encoder_warning`), as does a run estimated to take very long
(:data:`MANY_MASKS`, :data:`LONG_RUN_S`). On a terminal a progress bar shows each image's
masks done, masks/s and ETA; elsewhere a line per image says what was written and how long it took.

Explainers are built through the one front door, :func:`sslens.explain.base.create_explainer`,
so a new registered explainer needs no change here: ``--layer`` goes to explainers with a
``layer`` option, ``--reference`` to those whose call takes a ``reference`` (the CAM family,
gradient-weighted attention, correspondence), ``--corpus`` and ``--foil`` to those whose call
takes a ``corpus`` (COCOA), a ``progress`` callback to those whose call takes one (the masking
explainers), and a flag an explainer does not take is refused by name. Two refusals know their
explainers: the attention explainers (:mod:`sslens.explain.attention`) of a model without a
Vision Transformer, and a reference folder for correspondence, which pairs feature maps of two
images and so has no use for a mean embedding. A published checkpoint (``--format``, or a
torchvision state dict with ``--weights``) is imported once into the user cache
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
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslens.data.images import (
    check_readable,
    list_image_files,
    load_image_tensor,
    unreadable_reason,
)
from sslens.device import resolve_device
from sslens.distributed import (
    broadcast_object,
    gather_objects,
    init_distributed,
    shard,
    unshard,
    world,
)
from sslens.errors import SslensWarning, UserError
from sslens.explain import attention
from sslens.explain.base import (
    EXPLAINERS,
    Explainer,
    Explanation,
    check_explainer_options,
    create_explainer,
    explainer_options,
)
from sslens.explain.correspondence import Correspondence, cell_boxes
from sslens.explain.depth import midas_depth_estimator
from sslens.explain.display import normalize_map, overlay, save_explanation_png, to_display_image
from sslens.models.health import degenerate_encoder_warning
from sslens.store import META_FILE, load_model

#: Explainer option → the command-line flag that sets it, for error messages.
FLAGS = {
    "layer": "--layer", "num_masks": "--num-masks", "components": "--components",
    "depth_estimator": "--depth-model",
}

#: Masks per image above which a run is warned about whatever its speed: maps change little
#: beyond a few thousand (RELAX's default is 3000).
MANY_MASKS = 100_000

#: A run estimated (from its first forward passes) to take longer than this, in seconds, is
#: warned about, with how to make it shorter.
LONG_RUN_S = 3600.0

#: Unreadable files named in one warning; the rest are counted.
WARN_LIMIT = 10

#: The component that maps the reference image, not the explained one (correspondence's map of
#: image B, a symmetric CAM's map of its reference): saved as ``reference_importance``.
REFERENCE_MAP = "reference"


def _warn(message: str) -> None:
    warnings.warn(message, SslensWarning, stacklevel=2)


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
        model, format = weights, "torchvision"
    if model is None:
        raise UserError("No model given. Pass an sslens run or model directory, or --weights STATE_DICT.")
    if format is None:
        if arch is not None or timm_name is not None:
            raise UserError(
                "--arch and --timm-name describe a published checkpoint (with --format or --weights); "
                "an sslens model knows its backbone."
            )
        _check_not_published(Path(model))
        return model, {}
    from sslens.published import import_cached

    # Under torchrun rank 0 imports into the shared cache and the others use its folder,
    # rather than all writing the same folder at once.
    imported = broadcast_object(
        str(import_cached(model, format, arch=arch, timm_name=timm_name)) if world().is_main else None
    )
    return imported, {"checkpoint": str(model), "format": format}


def _check_not_published(path: Path) -> None:
    """A UserError suggesting ``--format`` for a file that is not an sslens model (a published
    checkpoint given without ``--format``); nothing for anything else."""
    sslens_file = path.suffix == ".safetensors" and (path.parent / META_FILE).is_file()
    if not path.is_file() or sslens_file:
        return
    from sslens import published

    guess = published.guess_format_of_file(path)
    if guess is not None:
        extra = " --timm-name NAME" if guess == "timm" else ""
        raise UserError(
            f"{path} looks like a published {guess} checkpoint, not an sslens model. Explain it with "
            f"`sslens explain {path} --format {guess}{extra} --image IMAGE ...`; it is imported once "
            "into the user cache (~/.cache/sslens/imported)."
        )
    if path.suffix == ".safetensors":
        return  # an sslens weights file without its meta.json: load_model says so
    raise UserError(
        f"{path} is not an sslens model (a run or model directory, or a model.safetensors with its "
        f"{META_FILE}). If it is a published checkpoint, name its layout with --format "
        f"({', '.join(sorted(published.CHECKPOINT_FORMATS))}), e.g. `sslens explain {path} --format moco "
        "--image IMAGE ...`."
    )


def _readable(files: list[Path], what: str, strict: bool, quiet: bool) -> list[Path]:
    """The files of ``files`` that :func:`unreadable_reason` passes; the others are named in one
    warning (unless ``quiet``). With ``strict``, or when none passes, a UserError instead."""
    if strict:
        check_readable(files)
        return files
    reasons = {path: unreadable_reason(path) for path in files}
    bad = {path: reason for path, reason in reasons.items() if reason is not None}
    if len(bad) == len(files):
        if len(files) == 1:
            check_readable(files)  # the one file's own message
        listed = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:WARN_LIMIT])
        raise UserError(f"None of the {len(files)} {what} is a readable image: {listed}. Pass readable image files.")
    if bad and not quiet:
        shown = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:WARN_LIMIT])
        more = f"; and {len(bad) - WARN_LIMIT} more" if len(bad) > WARN_LIMIT else ""
        _warn(
            f"Skipping {len(bad)} of the {len(files)} {what} that cannot be read: {shown}{more}. "
            "Pass --strict to stop at the first unreadable file instead."
        )
    return [path for path in files if path not in bad]


def _no_image(batch: torch.Tensor) -> None:
    """What the figure draws of a reference that is no single image (a folder, or none)."""
    return None


def _decoded(files: list[Path], what: str, load: Callable, strict: bool) -> dict[Path, torch.Tensor]:
    """{path: its normalised (3, H, W) input} of ``files`` (readable by :func:`_readable`), each
    decoded by ``load``; one that fails to decode is skipped with a warning naming ``what`` it is
    (a UserError with ``strict``, for a single file, or if none is left)."""
    loaded = {}
    for path in files:
        try:
            loaded[path] = load(path)[0]
        except UserError as error:
            if strict or len(files) == 1:
                raise
            _warn(f"Skipping the {what} {path}: {error}")
    if not loaded:
        raise UserError(f"None of the {what}s could be read; pass readable image files or a folder of them.")
    return loaded


def _reference_kwargs(
    explainer: Explainer, method: str, reference: str | None, files: list[Path], load: Callable,
    device: torch.device, strict: bool,
) -> tuple[dict, dict, Callable[[torch.Tensor], torch.Tensor | None], str | None]:
    """(call kwargs, record, shown, label) for ``--reference``: an image, a folder (mean
    embedding) or "augmented". ``files`` are its readable image files; one that fails to decode
    is skipped with a warning (a UserError with ``strict`` or if none is left). The figure draws
    ``shown(batch)``, the (…, 3, H, W) reference input of the explained (1, 3, H, W) ``batch``
    (None for a folder), under ``label`` (None: no reference)."""
    wants_reference = "reference" in inspect.signature(explainer.explain).parameters
    if not wants_reference:
        if reference is not None:
            raise UserError(f"--reference does not apply to the {method} explainer; leave it out.")
        return {}, {}, _no_image, None
    pairs = isinstance(explainer, Correspondence)
    if reference is None:
        folder = "" if pairs else "--reference FOLDER (the mean embedding of its images), "
        raise UserError(
            f"{method} explains the similarity of each image's embedding with a reference embedding: "
            f"pass --reference IMAGE, {folder}or --reference augmented (an augmented view of each image itself)."
        )
    if pairs and Path(reference).is_dir():
        raise UserError(
            f"--reference {reference} is a folder, and {method} pairs the feature map of each image with "
            "that of one reference image (a folder's mean embedding has no feature map to match): pass "
            "--reference IMAGE, or --reference augmented (an augmented view of each image itself)."
        )
    if reference == "augmented":
        view = functools.partial(_augmented_view, explainer)
        return {"reference": "augmented"}, {"reference": "augmented"}, view, "reference: augmented view"
    loaded = _decoded(files, "reference image", load, strict)
    tensors = torch.stack(list(loaded.values())).to(device)
    if Path(reference).is_dir():
        label = f"reference: mean embedding of {len(loaded)} image{'s' * (len(loaded) > 1)} in {reference}"
        return {"reference_set": tensors}, {"reference_set": [str(f) for f in loaded]}, _no_image, label
    return {"reference": tensors}, {"reference": str(files[0])}, lambda batch: tensors[0], f"reference: {files[0].name}"


def _corpus_kwargs(
    explainer: Explainer, method: str, sets: dict[str, tuple[Sequence[str] | None, list[Path]]],
    load: Callable, device: torch.device, strict: bool,
) -> tuple[dict, dict, str | None]:
    """(call kwargs, record, label) for ``--corpus`` and ``--foil``, COCOA's two image sets.

    ``sets`` maps "corpus" and "foil" to (the paths the user gave or None, their readable image
    files); each set becomes an (N, 3, H, W) tensor of inputs (a file that fails to decode is
    skipped with a warning, a UserError with ``strict`` or if none is left). ``label`` names the
    sets for the figure (None: the explainer takes none).
    """
    given = [name for name, (paths, _) in sets.items() if paths]
    if "corpus" not in inspect.signature(explainer.explain).parameters:
        if given:
            raise UserError(f"--{given[0]} does not apply to the {method} explainer; leave it out.")
        return {}, {}, None
    missing = [f"--{name} FOLDER_OR_IMAGE" for name in sets if name not in given]
    if missing:
        raise UserError(
            f"{method} explains how much more similar each image's embedding is to a corpus of images than to "
            f"a foil set (COCOA's contrastive corpus similarity): pass {' and '.join(missing)} (--corpus e.g. "
            "images of the explained image's class, --foil e.g. random images of other classes; each is "
            "repeatable, and a folder gives all its images)."
        )
    kwargs, record, parts = {}, {}, []
    for name, (paths, files) in sets.items():
        loaded = _decoded(files, f"{name} image", load, strict)
        kwargs[name] = torch.stack(list(loaded.values())).to(device)
        record[name] = [str(f) for f in loaded]
        parts.append(f"{name}: {len(loaded)} image{'s' * (len(loaded) > 1)} in {', '.join(paths)}")
    return kwargs, record, " · ".join(parts)


def _check_attention_model(method: str, encoder: nn.Module, source: dict) -> None:
    """A UserError for an explainer of :mod:`sslens.explain.attention`, each of which reads the
    attention of a timm Vision Transformer, asked to explain a model without one."""
    if getattr(EXPLAINERS.get(method), "__module__", None) != attention.__name__:
        return
    try:
        attention.find_vision_transformer(encoder)
    except ValueError as error:
        raise UserError(
            f"The {method} explainer needs a Vision Transformer, and {source.get('checkpoint') or source['model']} has a "
            f"{source.get('backbone')} backbone. {error} Explain a ViT: an sslens model trained with a timm "
            "ViT backbone (backbone: timm, backbone_options: {model_name: vit_...}), or a published timm "
            "checkpoint with --format timm --timm-name vit_... (e.g. vit_small_patch16_224)."
        ) from None


def _unique_stems(files: Sequence[Path]) -> list[str]:
    """File stems, with ``-2``, ``-3``... added where two inputs share one, so no output is overwritten."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return stems


def output_suffix(
    layer: str | None, reference: str | None, output: str, *,
    corpus: Sequence[str] | None = None, foil: Sequence[str] | None = None,
) -> str:
    """The part of an output name after ``<stem>_<method>``: the options that change the map, each
    only when it is not the default, so a default run's files keep the name ``<stem>_<method>``.

    >>> output_suffix("layer3", "refs/dog.jpg", "projection"), output_suffix(None, "augmented", "pooled")
    ('_layer3_ref-dog_projection', '')
    >>> output_suffix(None, None, "pooled", corpus=["dogs/a.jpg", "dogs/b.jpg"], foil=["random.png"])
    '_corpus-a+1_foil-random'
    """
    parts = []
    if layer is not None:
        parts.append(layer if layer.startswith("layer") else f"layer-{layer}")
    if reference is not None and reference != "augmented":
        path = Path(reference)
        parts.append(f"refset-{path.resolve().name}" if path.is_dir() else f"ref-{path.stem}")
    for name, paths in (("corpus", corpus), ("foil", foil)):
        if paths:
            first = Path(paths[0])
            more = f"+{len(paths) - 1}" if len(paths) > 1 else ""
            parts.append(f"{name}-{first.resolve().name if first.is_dir() else first.stem}{more}")
    if output != "pooled":
        parts.append(output)
    # Only characters that are safe in a file name on every system.
    return "".join(f"_{re.sub(r'[^A-Za-z0-9.+-]+', '-', part)}" for part in parts)


def _check_outputs(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """A UserError when ``out`` is a file, or (without ``overwrite``) one of the outputs exists."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the maps and figures (it is created if missing).")
    existing = [out / name for name in names if (out / name).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the files this run writes)" if len(existing) > 1 else ""
        raise UserError(
            f"{existing[0]} already exists{more}. Pass --overwrite to replace it, or --out another folder."
        )


def _maps(method: str, explanation: Explanation, size) -> dict[str, np.ndarray]:
    """Image i=0's maps of input resolution, in display order, keyed by name; not the reference's
    map (:data:`REFERENCE_MAP`), which is drawn on the reference."""
    maps = {method: explanation.importance[0]}
    if explanation.uncertainty is not None:
        maps["uncertainty"] = explanation.uncertainty[0]
    maps.update({name: value[0] for name, value in explanation.components.items() if name != REFERENCE_MAP})
    return {
        name: value.detach().float().cpu().numpy()
        for name, value in maps.items()
        if tuple(value.shape) == tuple(size)
    }


def centre_crop_note(preprocessing: dict) -> str | None:
    """What the centre crop of :func:`~sslens.data.images.resize_center_crop` cut off, in the
    original image's pixels (width × height), or None when it kept the whole image.

    ``preprocessing`` is the record of :func:`~sslens.data.images.load_image_tensor`; the crop box
    (``input_size``) is mapped back through the one resize factor it was made with.

    >>> centre_crop_note({"original_size": [480, 640], "input_size": [224, 224], "crop_pct": 1.0})
    'centre-cropped 640×480 → 480×480 before resizing to 224×224'
    """
    height, width = preprocessing["original_size"]
    input_h, input_w = preprocessing["input_size"]
    crop_pct = preprocessing["crop_pct"]
    scale = max(input_h / crop_pct / height, input_w / crop_pct / width)
    kept_h, kept_w = min(height, round(input_h / scale)), min(width, round(input_w / scale))
    if (kept_h, kept_w) == (height, width):
        return None
    return f"centre-cropped {width}×{height} → {kept_w}×{kept_h} before resizing to {input_w}×{input_h}"


def _augmented_view(explainer: Explainer, batch: torch.Tensor) -> torch.Tensor | None:
    """(1, 3, H, W) the view a CAM's ``reference="augmented"`` compares ``batch`` with; None for an
    explainer without augmented views."""
    views = getattr(explainer, "augmented_views", None)
    return None if views is None else views(batch).cpu()


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def long_run_warning(num_masks: int, masks_per_s: float, num_images: int, device: str) -> str | None:
    """A warning for ``num_images`` images of ``num_masks`` masks at ``masks_per_s`` when the
    masks are more than :data:`MANY_MASKS` or the run longer than :data:`LONG_RUN_S`; else None."""
    per_image = num_masks / max(masks_per_s, 1e-9)
    total = per_image * num_images
    if num_masks <= MANY_MASKS and total <= LONG_RUN_S:
        return None
    lead = f"--num-masks {num_masks:,} is far more than a map needs" if num_masks > MANY_MASKS else "This run is long"
    estimate = f"about {_duration(per_image)} per image at {masks_per_s:,.0f} masks/s (measured on the first passes)"
    if num_images > 1:
        estimate += f", {_duration(total)} for the {num_images} images"
    faster = ", or --device cuda on a machine with a GPU" if device == "cpu" else ""
    return (
        f"{lead}: {estimate}. Maps change little beyond a few thousand masks (the default is 3000): "
        f"pass a smaller --num-masks{faster} to finish sooner."
    )


class _Progress:
    """What ``sslens explain`` shows while it works: on a terminal (``bar="auto"``) a rich bar over
    the images and one per image (masks done, masks/s, ETA); elsewhere nothing until an image is
    done, then a line (``lines=False``: no lines, which rank 0 of a torchrun launch prints for
    all ranks at the end). ``quiet``: nothing at all (the other ranks).

    Once, on the first image, the masks/s of its first forward passes give the estimate of
    :func:`long_run_warning` for the ``num_images`` images of this process.
    """

    def __init__(self, num_images: int, *, bar: bool | str, quiet: bool, lines: bool, device: str):
        self.quiet, self.lines = quiet, lines
        self.use_bar = not quiet and (sys.stdout.isatty() if bar == "auto" else bool(bar))
        self.num_images, self.device = num_images, device
        self._bar = self._images = self._task = None
        self._estimated = False  # the long-run estimate is made once, on the first image
        self._name, self._started, self._first_pass = "", 0.0, None
        #: The current image's total masks, as its explainer reported them (None: it reports none).
        self.masks: int | None = None

    def __enter__(self) -> _Progress:
        if self.use_bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(file=sys.stdout),
            )
            self._bar.start()
            self._images = self._bar.add_task("[bold]explain", total=self.num_images, unit="images", rate="")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def start(self, name: str) -> Callable[[int, int], None]:
        """Start image ``name``; returns the explainer's ``progress(done, total)`` callback."""
        self._name, self._started, self._first_pass = name, time.perf_counter(), None
        self.masks = None
        return self._masks

    def _masks(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.masks = total
        if done == 0:
            self._started = now  # masks/s from the first pass on, not the explainer's set-up
        elif not self._estimated and self._first_pass is None:
            self._first_pass = (done, now)
        elif not self._estimated:
            # The second pass on: the first carries one-off costs (cuDNN autotuning, caches).
            first_done, first_time = self._first_pass
            self._estimated = True
            rate = (done - first_done) / max(now - first_time, 1e-9)
            warning = None if self.quiet else long_run_warning(total, rate, self.num_images, self.device)
            if warning is not None:
                _warn(warning)
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task(self._name, total=total, unit="masks", rate="")
        rate = done / max(now - self._started, 1e-9)
        self._bar.update(self._task, completed=done, total=total, rate=f"{rate:,.0f}/s" if done else "")

    def finish(self, line: str) -> None:
        """Image done: its bar goes, ``line`` is shown."""
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = None
            self._bar.advance(self._images)
        if self.lines:
            self.message(line)


def explain_images(
    model: str | None,
    images: Sequence[str],
    *,
    method: str = "relax",
    out_dir: str | Path = "explanations",
    reference: str | None = None,
    corpus: str | Sequence[str] | None = None,
    foil: str | Sequence[str] | None = None,
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
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | str = "auto",
) -> list[Path]:
    """Explain each image file (folders expand to their images, sorted) and write npz + png.

    Args:
        model: an sslens run directory, model directory or checkpoint (see
            :func:`sslens.store.load_model`), or with ``format`` a published checkpoint file;
            None when ``weights`` is given.
        images: image files and/or folders; any size and PIL mode.
        method: a registered explainer ("relax", "perceptual", "gradcam", "gradcam++",
            "labelfree-ig", "cocoa-masking", "rollout", "correspondence", ...).
        out_dir: where ``<stem>_<method><options>.npz`` / ``.png`` go (created; see the module
            docstring for ``<options>``).
        reference: for the CAM family and gradient-weighted attention, an image file, a folder
            (its mean embedding), or "augmented" (a seeded augmented view of each image); for
            correspondence an image file or "augmented".
        corpus, foil: for COCOA, an image file or folder, or a list of them: the corpus the explained images are
            compared with (e.g. images of their class) and the foil they are contrasted with
            (e.g. random images); loaded and preprocessed as the explained images.
        layer: CAM or correspondence layer name ("stem", "layer1" ... "layer4", a ViT block, or a
            dotted submodule path).
        components: perceptual components to compute.
        weights: a local torchvision ResNet state dict, the same as ``model=weights,
            format="torchvision"``; ImageNet normalisation, 224 px.
        format, arch, timm_name: the layout of a published checkpoint ``model`` (moco, swav,
            simclr, byol, barlowtwins, vicreg, dino, torchvision, timm; see :func:`sslens.published.import_checkpoint`).
        output: "pooled" (backbone representation) or "projection" (projection-head output).
        num_masks: masks for RELAX-based methods and cocoa-masking (default: the explainer's).
        seed: seeds masks and augmented views (recorded for explainers that take one).
        device: "auto", "cpu", "cuda", ...
        depth_model: a MiDaS model (:data:`~sslens.explain.depth.MIDAS_MODELS`, e.g.
            "MiDaS_small") that estimates depth for the perceptual "depth" component, loaded
            through ``torch.hub``; None: that component is skipped, and the output says so.
        overwrite: replace output files that exist (otherwise a UserError before any work).
        strict: an unreadable image, reference, corpus or foil file is a UserError at once, instead of
            being skipped with a warning.
        progress: a progress bar (True), lines per image (False), or a bar on a terminal only.

    Returns the paths written, npz then png for each explained image (under torchrun: by all
    processes). Bad input raises :class:`~sslens.errors.UserError` with a message saying what to
    change; problems worked around are :class:`~sslens.errors.SslensWarning`s.
    """
    torch_device = init_distributed(resolve_device(device))
    current = world()
    user_options = {"layer": layer, "num_masks": num_masks, "components": list(components) if components else None}
    user_options = {k: v for k, v in user_options.items() if v is not None}
    # Every flag, file and output name is checked before any model is loaded or image explained.
    check_explainer_options(method, [*user_options, *(["depth_estimator"] if depth_model else [])], flags=FLAGS)
    if progress not in (True, False, "auto"):
        raise UserError(f"progress must be True, False or 'auto'; got {progress!r}")
    out = Path(out_dir)
    files = _readable(list_image_files(images), "images", strict, quiet=not current.is_main)
    reference_files = []
    if reference is not None and reference != "augmented":
        reference_files = _readable(list_image_files([reference]), "reference images", strict, quiet=not current.is_main)
    sets = {}  # COCOA's: name → (the paths given or None, their readable image files)
    for name, paths in (("corpus", corpus), ("foil", foil)):
        # One path may come as a string (Python callers), which is no list of paths to iterate.
        paths = [str(paths)] if isinstance(paths, (str, Path)) else paths
        readable = _readable(list_image_files(paths), f"{name} images", strict, quiet=not current.is_main) if paths else []
        sets[name] = (paths, readable)
    corpus, foil = sets["corpus"][0], sets["foil"][0]
    suffix = output_suffix(layer, reference, output, corpus=corpus, foil=foil)
    # Stems are made unique over the whole list before it is split, so names do not depend on N.
    names = [f"{stem}_{method}{suffix}" for stem in _unique_stems(files)]
    # Rank 0 looks, before any rank writes, so every rank gets the same answer.
    problem = None
    if current.is_main:
        try:
            _check_outputs(out, [f"{name}{ext}" for name in names for ext in (".npz", ".png")], overwrite)
        except UserError as error:
            problem = str(error)
    if (problem := broadcast_object(problem)) is not None:
        raise UserError(problem)

    model, imported = _published_model(model, weights, format, arch, timm_name)
    encoder, source = load_encoder(model, output=output, device=torch_device)
    source.update(imported)
    if weights is not None:
        source["weights"] = str(weights)
    size, mean, std = source["image_size"], source["mean"], source["std"]
    _check_attention_model(method, encoder, source)
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
    call_kwargs, reference_record, shown_reference, reference_label = _reference_kwargs(
        explainer, method, reference, reference_files, load, torch_device, strict
    )
    set_kwargs, set_record, set_label = _corpus_kwargs(explainer, method, sets, load, torch_device, strict)
    call_kwargs, record = call_kwargs | set_kwargs, reference_record | set_record
    reference_label = " · ".join(label for label in (reference_label, set_label) if label) or None
    # A deterministic explainer (label-free, attention) takes no seed, and none is recorded for it.
    options = {**user_options, **({"seed": seed} if "seed" in explainer_options(method) else {})}
    reports_masks = "progress" in inspect.signature(explainer.explain).parameters

    out.mkdir(parents=True, exist_ok=True)
    mine: list[tuple[list[Path], str]] = []  # (paths written, what was done) per image of this rank
    checked = False
    share = shard(list(zip(files, names, strict=True)), current)
    display = _Progress(
        len(share), bar=progress, quiet=not current.is_main, lines=not current.distributed, device=torch_device.type
    )
    with display:
        for path, name in share:
            try:
                tensor, preprocessing = load(path)
            except UserError as error:
                if strict:
                    raise
                _warn(f"Skipping {path}: {error}")
                mine.append(([], f"{path}: skipped ({error})"))
                display.finish(mine[-1][1])
                continue
            batch = tensor[None].to(torch_device)
            if not checked:
                checked = True
                warning = degenerate_encoder_warning(encoder, batch)
                if warning is not None and current.is_main:
                    _warn(warning)
            callback = display.start(path.name)
            started = time.perf_counter()
            explanation = explainer(batch, **call_kwargs, **({"progress": callback} if reports_masks else {}))
            seconds = time.perf_counter() - started
            paths, line = _write(
                out / name, path, method, explanation, batch, tensor, preprocessing, source, size,
                info={"method": method, "source": source, "options": options, **record},
                reference=shown_reference(batch), reference_label=reference_label,
            )
            # Explainers without a progress callback (cocoa-masking) still record the masks they used.
            masks = explanation.info.get("num_masks_used", [display.masks if reports_masks else None])[0]
            line += (
                f" ({masks:,} masks in {_duration(seconds)}, {masks / seconds:,.0f} masks/s)" if masks
                else f" (in {_duration(seconds)})"
            )
            # A skipped component (e.g. depth with no depth source) is said here, not only in the npz.
            line += "".join(f"; skipped {c}: {why}" for c, why in explanation.info.get("skipped", {}).items())
            if "depth" in explanation.info.get("skipped", {}) and depth_model is None:
                line += " (pass --depth-model MiDaS_small to estimate depth with MiDaS)"
            mine.append((paths, line))
            display.finish(line)
    done = unshard(gather_objects(mine), len(files))
    if not any(paths for paths, _ in done):
        raise UserError(
            f"None of the {len(files)} images could be explained: {'; '.join(line for _, line in done[:WARN_LIMIT])}."
        )
    if current.distributed and current.is_main:
        for _, line in done:
            print(line)
        print(f"{current.size} processes explained {len(files)} images into {out}")
    return [written for paths, _ in done for written in paths]


def _write(
    base: Path, path: Path, method: str, explanation: Explanation, batch: torch.Tensor, tensor: torch.Tensor,
    preprocessing: dict, source: dict, size, *, info: dict, reference: torch.Tensor | None,
    reference_label: str | None,
) -> tuple[list[Path], str]:
    """Write ``base``.npz and ``base``.png of one image: ([npz, png], the line saying so).

    ``reference``: the reference's normalised (…, 3, H, W) input, recorded and drawn; its figure
    panel and the title say ``reference_label`` and the cosine similarity (for a CAM). The
    reference's own map (component :data:`REFERENCE_MAP`, correspondence's) is saved as
    ``reference_importance`` and drawn over the reference, and correspondence's best matches are
    outlined on both images.
    """
    mean, std = source["mean"], source["std"]
    image = to_display_image(batch, mean, std)[0]
    info = {**info, "preprocessing": preprocessing, "explainer": explanation.info}
    crop = centre_crop_note(preprocessing)
    if crop is not None:
        info["centre_crop"] = crop
    arrays = {"importance": explanation.importance[0].detach().float().cpu().numpy()}
    if explanation.uncertainty is not None:
        arrays["uncertainty"] = explanation.uncertainty[0].detach().float().cpu().numpy()
    for name, value in explanation.components.items():
        key = "reference_importance" if name == REFERENCE_MAP else f"component_{name}"
        arrays[key] = value[0].detach().float().cpu().numpy()
    if reference is not None:
        reference = to_display_image(reference.reshape(1, *reference.shape[-3:]), mean, std)[0]
        arrays["reference_image"] = reference
    npz_path = base.with_name(f"{base.name}.npz")
    np.savez_compressed(
        npz_path, **arrays, image=image, input=tensor.numpy(), info=np.array(json.dumps(info, default=str))
    )
    details = []
    if reference_label is not None:
        similarity = explanation.info.get("similarity")
        details.append(reference_label + (f" · cosine similarity {similarity[0]:.3f}" if similarity else ""))
    shown_reference, panel_label, boxes, reference_boxes = reference, reference_label, [], []
    if reference is not None and "reference_importance" in arrays:
        shown_reference = overlay(reference, normalize_map(arrays["reference_importance"]))
        panel_label = f"{reference_label}, overlaid with its {method} map (minmax)"
        matches = explanation.info.get("matches")
        if matches and matches[0]:
            info = explanation.info
            boxes = cell_boxes([m["cell"] for m in matches[0]], info["grid"], image.shape[:2])
            reference_boxes = cell_boxes([m["reference_cell"] for m in matches[0]], info["reference_grid"],
                                         reference.shape[:2])
            details.append(f"outlined: the {len(matches[0])} best matched cell pairs, one colour per pair "
                           "(strongest first: blue, orange, green, ...)")
    if crop is not None:
        details.append(crop)
    title = f"{method} · {path.name} · {source.get('model') or source.get('weights')}"
    png_path = save_explanation_png(
        base.with_name(f"{base.name}.png"), image, _maps(method, explanation, size),
        title="\n".join([title, *details]),
        reference=shown_reference, reference_label=panel_label, boxes=boxes, reference_boxes=reference_boxes,
    )
    return [npz_path, png_path], f"{path}: wrote {npz_path} and {png_path}"

