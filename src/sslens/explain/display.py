"""Turning raw explanation maps into pictures: a separate, explicit step after explaining.

Explainers return raw maps (:class:`~sslens.explain.base.Explanation`); nothing there is
rescaled. Here, and only here, maps are normalised for colour, images are de-normalised to
uint8, and figures are drawn. The figure keeps the raw values visible on each colour bar.

>>> heat = normalize_map(np.array([[0.0, 2.0], [4.0, 4.0]]))
>>> heat.tolist()
[[0.0, 0.5], [1.0, 1.0]]
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sslens.data.base import denormalize


def _minmax(maps: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = high - low
    flat = span <= 0
    # A flat map has no structure to show: it becomes zeros instead of 0/0.
    scaled = (np.clip(maps, low, high) - low) / np.where(flat, 1.0, span)
    return np.where(flat, 0.0, scaled)


def _normalize_minmax(maps: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    return _minmax(maps, maps.min(axis=(-2, -1), keepdims=True), maps.max(axis=(-2, -1), keepdims=True))


def _normalize_percentile(maps: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    low, high = np.percentile(maps, percentiles, axis=(-2, -1), keepdims=True)
    return _minmax(maps, low, high)


def _normalize_zscore(maps: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    mean = maps.mean(axis=(-2, -1), keepdims=True)
    std = maps.std(axis=(-2, -1), keepdims=True)
    flat = std <= 0
    return np.where(flat, 0.0, (maps - mean) / np.where(flat, 1.0, std))


NORMALIZATIONS: dict[str, Callable[[np.ndarray, tuple[float, float]], np.ndarray]] = {
    "minmax": _normalize_minmax,
    "percentile": _normalize_percentile,
    "zscore": _normalize_zscore,
}


def normalize_map(
    maps: np.ndarray | torch.Tensor,
    mode: str = "minmax",
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Normalise each map over its last two axes, for display only. (..., H, W) → float32 (..., H, W).

    Modes:
        * "minmax": (m - min) / (max - min), in [0, 1].
        * "percentile": clip to the ``percentiles`` (low, high) of each map, then min-max to
          [0, 1]; a few extreme pixels no longer wash out the rest.
        * "zscore": (m - mean) / std; unbounded, mean 0 and std 1.

    A flat map (max == min, equal percentiles, or std 0) becomes all zeros, never a division by
    zero: it has no structure, and zeros say so. NaN or infinite values raise a ValueError.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalisation {mode!r}. Choose one of: {', '.join(NORMALIZATIONS)}.")
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {percentiles}")
    array = maps.detach().cpu().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    if array.ndim < 2:
        raise ValueError(f"maps must have at least two axes (H, W); got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("The map holds NaN or infinite values; fix the explainer's output before displaying it.")
    return NORMALIZATIONS[mode](array, (low, high)).astype(np.float32)


def to_display_image(images: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images (B, 3, H, W) → uint8 (B, H, W, 3), undoing ``(x - mean) / std``.

    Values are clipped to [0, 1] before scaling by 255 and rounding.
    """
    tensor = torch.as_tensor(images).detach().float().cpu()
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(tensor.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel; got {mean} and {std}")
    pixels = denormalize(tensor, mean, std).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def overlay(image: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped heatmap onto an image: ``(1 - alpha) * image + alpha * cmap(heat)``.

    Args:
        image: uint8 (H, W, 3).
        heat: (H, W) in [0, 1] (see :func:`normalize_map`).
        cmap: a matplotlib colour map name.
        alpha: heatmap weight in [0, 1]; 0 returns the image unchanged.

    Returns uint8 (H, W, 3).
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    heat = np.asarray(heat, dtype=np.float64)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat must be (H, W) = {image.shape[:2]}; got {heat.shape}")
    if not np.isfinite(heat).all() or heat.min() < 0 or heat.max() > 1:
        raise ValueError("heat must lie in [0, 1]; normalise it first with normalize_map(...)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    if cmap not in colormaps:
        raise ValueError(f"Unknown colour map {cmap!r}; use a matplotlib name such as 'jet' or 'viridis'.")
    colours = colormaps[cmap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_explanation_png(
    path: str | os.PathLike,
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    title: str | None = None,
    *,
    reference: np.ndarray | None = None,
    reference_label: str | None = None,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    reference_boxes: Sequence[tuple[float, float, float, float]] = (),
    cmap: str = "jet",
    alpha: float = 0.5,
    normalization: str = "minmax",
) -> Path:
    """Draw the image, every raw map with its colour bar, and each map's overlay; save as PNG.

    Layout: the top row shows the image, then (with ``reference_label``) what it was compared
    with, then one heatmap per entry of ``maps`` in raw values (the colour bar is labelled in
    those values); the bottom row shows each map's overlay on the image, normalised with
    ``normalization``: "minmax" or "percentile" (see :func:`normalize_map`; "zscore" is
    unbounded, and an overlay needs values in [0, 1]). ``image`` is uint8 (H, W, 3); each map is
    (H, W); ``reference`` is a uint8 (h, w, 3) image shown under the title ``reference_label``,
    or None to write ``reference_label`` as a note in its place (e.g. "mean embedding of 12
    images"). ``boxes`` and ``reference_boxes`` (top, left, bottom, right) in px are outlined on
    the image and on the reference by :func:`draw_boxes` (box k of both in the same colour, e.g. a
    correspondence match). ``title`` may span lines (long ones are wrapped). Uses matplotlib's Agg canvas
    directly, so no pyplot state or display is involved. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: pass at least one (H, W) map to draw")
    if normalization not in ("minmax", "percentile"):
        raise ValueError(
            f"normalization must be 'minmax' or 'percentile' for an overlay, which needs values in [0, 1]; "
            f"got {normalization!r}"
        )
    if reference is not None and reference_label is None:
        raise ValueError("reference needs a reference_label saying what it is (e.g. 'reference: dog.jpg')")
    image = np.asarray(image)
    first = 1 if reference_label is None else 2  # the column of the first map
    columns = first + len(maps)
    if title is not None:
        # A panel holds about 28 characters of the title's font: longer lines are wrapped, not cut.
        title = "\n".join(_wrap(line, 28 * columns) for line in title.split("\n"))
    title_lines = 0 if title is None else title.count("\n") + 1
    figure = Figure(figsize=(3.2 * columns, 6.4 + 0.3 * title_lines + 0.2 * (title_lines > 0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, columns, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input")
    draw_boxes(axes[0, 0], boxes)
    if reference_boxes and reference is None:
        raise ValueError("reference_boxes are drawn on the reference: pass the reference image too")
    if reference_label is not None:
        if reference is not None:
            axes[0, 1].imshow(np.asarray(reference))
            axes[0, 1].set_title(_wrap(reference_label))
            draw_boxes(axes[0, 1], reference_boxes)
        else:
            axes[0, 1].text(0.5, 0.5, _wrap(reference_label), ha="center", va="center", transform=axes[0, 1].transAxes)
    for column, (name, raw) in enumerate(maps.items(), start=first):
        raw = np.asarray(raw, dtype=np.float32)
        if raw.shape != image.shape[:2]:
            raise ValueError(f"map {name!r} has shape {raw.shape}; the image is {image.shape[:2]}")
        shown = axes[0, column].imshow(raw, cmap=cmap)
        axes[0, column].set_title(f"{name} (raw)")
        figure.colorbar(shown, ax=axes[0, column], fraction=0.046, pad=0.04)
        axes[1, column].imshow(overlay(image, normalize_map(raw, normalization), cmap=cmap, alpha=alpha))
        axes[1, column].set_title(f"{name} overlay ({normalization})")
    for axis in axes.flat:
        axis.set_axis_off()
    if title is not None:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def draw_boxes(axis, boxes: Sequence[tuple[float, float, float, float]]) -> None:
    """Outline each (top, left, bottom, right) px box on a matplotlib ``axis`` showing an image,
    box k in colour k of matplotlib's cycle (C0 blue, C1 orange, C2 green, ...), so boxes with
    the same index on two images (a region and its match) share a colour."""
    from matplotlib.patches import Rectangle

    for k, (top, left, bottom, right) in enumerate(boxes):
        # Pixel centres sit on integers in imshow, so a cell's edges are half a pixel out.
        axis.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                 edgecolor=f"C{k % 10}", linewidth=1.5))


def _wrap(text: str, width: int = 28) -> str:
    """``text`` broken into lines of at most about ``width`` characters, to fit one panel."""
    return "\n".join(textwrap.wrap(text, width)) or text
