"""Report figures: each function draws one matplotlib figure and returns it as PNG bytes.

Matplotlib is imported lazily, and figures are built as bare ``matplotlib.figure.Figure`` objects
rendered by the Agg canvas — never through pyplot — so no display is needed and the caller's
pyplot state (backend, current figure) is left alone. Figures are sized for a ~900 px wide column (9 in at 100 dpi); every heatmap has
a colour bar and every axis a label. Pass ``path`` to also write the PNG to disk.

>>> import numpy as np
>>> png = curves_figure({"deletion": (np.linspace(0, 1, 5), np.linspace(1, 0, 5))},
...                     xlabel="fraction removed", ylabel="cosine similarity", title="Deletion")
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from sslens.explain.display import draw_boxes

DPI = 100
WIDTH_IN = 9.0  # 900 px at DPI


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def colormap(name: str):
    """Matplotlib's colour map ``name`` (matplotlib imported only when a report is drawn)."""
    import matplotlib

    return matplotlib.colormaps[name]


def _to_png(figure, path: str | os.PathLike | None) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    png = buffer.getvalue()
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(png)
    return png


def _array(values, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {array.shape}")
    return array


def tsne_figure(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    title: str = "t-SNE of representations",
    path: str | os.PathLike | None = None,
) -> bytes:
    """One scatter panel per model: ``{model: (coords (N, 2), labels (N,) int)}``, coloured by class."""
    if not panels:
        raise ValueError("tsne_figure needs at least one panel {model_name: (coords, labels)}")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure = _figure(WIDTH_IN, 3.2 * rows + 0.8)
    axes = figure.subplots(rows, columns, squeeze=False)
    colours = colormap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, (model, (coords, labels)) in zip(axes.flat, panels.items(), strict=False):
        coords, labels = _array(coords, "coords", 2), _array(labels, "labels", 1)
        if coords.shape != (len(labels), 2):
            raise ValueError(f"coords for {model!r} must be (N, 2) with N = len(labels); got {coords.shape}")
        for index, name in enumerate(class_names):
            chosen = labels == index
            ax.scatter(coords[chosen, 0], coords[chosen, 1], s=8, color=colours(index % colours.N), label=name)
        ax.set_title(model)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(names), 5), markerscale=2, frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08 + 0.03 * (len(names) // 5), 1, 1))
    return _to_png(figure, path)


def _interval(value) -> tuple[float, float, float]:
    """(mean, low, high) of an estimate dict (:meth:`sslens.stats.Estimate.to_dict`) or a
    (mean, low, high) tuple; NaN where missing."""
    if value is None:
        return (np.nan, np.nan, np.nan)
    if isinstance(value, Mapping):
        value = (value.get("mean"), value.get("ci_low"), value.get("ci_high"))
    mean, low, high = (np.nan if v is None else float(v) for v in value)
    if np.isnan(low) or np.isnan(high):
        low = high = mean
    return (mean, low, high)


def bar_chart(
    estimates: Mapping[str, Mapping[str, object]],
    *,
    ylabel: str = "score",
    xlabel: str = "component",
    title: str = "",
    reference: Mapping[str, float] | None = None,
    reference_label: str = "chance",
    path: str | os.PathLike | None = None,
) -> bytes:
    """Grouped bars with their 95% intervals: ``estimates[model][group]`` is an estimate dict
    (``mean``, ``ci_low``, ``ci_high``) or a (mean, low, high) tuple.

    Groups are on the x axis, one bar per model; a group a model lacks is left empty.
    ``reference[group]`` draws a dashed line across the group (its chance level). The y axis is
    scaled to the data, from 0 (or the lowest value, when negative) to just above the highest
    interval, so small effects are not flattened against a fixed 0–1 axis; the legend sits
    outside the axes, where it hides no bar.
    """
    if not estimates:
        raise ValueError("bar_chart needs at least one model: {model: {group: estimate}}")
    models = list(estimates)
    groups = list(dict.fromkeys(g for per_model in estimates.values() for g in per_model))
    width = 0.8 / len(models)
    figure = _figure(WIDTH_IN, 4.5)
    ax = figure.subplots()
    positions = np.arange(len(groups))
    extremes = [0.0]
    for index, model in enumerate(models):
        values = np.array([_interval(estimates[model].get(g)) for g in groups])
        ax.bar(
            positions + (index - (len(models) - 1) / 2) * width,
            values[:, 0],
            width,
            yerr=np.vstack([values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]]),
            capsize=3,
            label=model,
        )
        extremes += [v for v in values[:, 1:].ravel() if np.isfinite(v)]
    labelled = False
    for position, group in zip(positions, groups, strict=True):
        level = (reference or {}).get(group)
        if level is not None and np.isfinite(level):
            ax.hlines(level, position - 0.45, position + 0.45, colors="black", linestyles="dashed",
                      label=None if labelled else reference_label)
            labelled = True
            extremes.append(level)
    low, high = min(extremes), max(extremes)
    margin = 0.08 * (high - low or 1.0)
    ax.set_ylim(min(0.0, low - margin) if low < 0 else 0.0, high + margin)
    ax.set_xticks(positions, groups, rotation=20 if len(groups) > 5 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _to_png(figure, path)


def scatter_figure(
    points: Mapping[str, tuple[object, object]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    reference: tuple[float | None, float | None] | None = None,
    reference_label: str = "chance",
    path: str | os.PathLike | None = None,
) -> bytes:
    """One labelled point per entry of ``points = {name: (x, y)}``, each coordinate an estimate
    dict or (mean, low, high) tuple drawn with its 95% interval as an error bar. ``reference``
    draws the chance level of each axis as a dashed line (None for an axis without one)."""
    if not points:
        raise ValueError("scatter_figure needs at least one point {name: (x, y)}")
    figure = _figure(WIDTH_IN * 0.75, 4.8)
    ax = figure.subplots()
    for name, (x, y) in points.items():
        (xm, xl, xh), (ym, yl, yh) = _interval(x), _interval(y)
        ax.errorbar([xm], [ym], xerr=[[xm - xl], [xh - xm]], yerr=[[ym - yl], [yh - ym]], fmt="o", capsize=4)
        ax.annotate(name, (xm, ym), xytext=(6, 6), textcoords="offset points", fontsize=9)
    if reference is not None:
        if reference[0] is not None:
            ax.axvline(reference[0], color="grey", linestyle="dashed", label=f"{reference_label} ({xlabel})")
        if reference[1] is not None:
            ax.axhline(reference[1], color="grey", linestyle="dotted", label=f"{reference_label} ({ylabel})")
        ax.legend(frameon=False, fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _to_png(figure, path)


def heatmap_grid(
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray | None]]]],
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    path: str | os.PathLike | None = None,
) -> bytes:
    """Images with overlaid maps: ``rows = [(row_title, [(col_title, image uint8 (H, W, 3), map (H, W) or None)])]``.

    Each map is drawn with its own colour scale and colour bar (raw values, not rescaled), over
    its image at transparency ``alpha``; a cell with ``None`` shows the image alone. A cell may
    add a fourth element, boxes ``[(top, left, bottom, right) in px]``: box k is outlined in
    colour k of matplotlib's cycle, so boxes with the same index in two cells (a region of one
    image and where the other image matches it) share their colour.
    """
    if not rows or not all(cells for _, cells in rows):
        raise ValueError("heatmap_grid needs at least one row, and every row needs at least one cell")
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    columns = max(len(cells) for _, cells in rows)
    cell_in = min(WIDTH_IN / columns, 2.6)
    figure = _figure(cell_in * columns, cell_in * len(rows) * 0.95)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row_axes, (row_title, cells) in zip(axes, rows, strict=True):
        for index, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if index >= len(cells):
                ax.axis("off")
                continue
            column_title, image, heat, *boxes = cells[index]
            image = _array(image, "image", 3)
            if image.dtype != np.uint8 or image.shape[-1] != 3:
                raise ValueError(f"images must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
            ax.imshow(image)
            # Every cell gets a colour-bar slot, left empty without a map, so all images align.
            colorbar_axes = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.04)
            if heat is None:
                colorbar_axes.axis("off")
            else:
                heat = _array(heat, "map", 2)
                if heat.shape != image.shape[:2]:
                    raise ValueError(f"map shape {heat.shape} must match image shape {image.shape[:2]}")
                shown = ax.imshow(heat, cmap=cmap, alpha=alpha)
                figure.colorbar(shown, cax=colorbar_axes)
            draw_boxes(ax, boxes[0] if boxes else ())
            ax.set_title(column_title, fontsize=9)
            if index == 0:
                ax.set_ylabel(row_title, fontsize=9)
    figure.tight_layout()
    return _to_png(figure, path)


def curves_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> bytes:
    """One line per entry of ``curves = {name: (x, y)}`` (e.g. deletion/insertion curves)."""
    if not curves:
        raise ValueError("curves_figure needs at least one curve {name: (x, y)}")
    figure = _figure(WIDTH_IN * 0.75, 4.2)
    ax = figure.subplots()
    for name, (x, y) in curves.items():
        x, y = _array(x, "x", 1), _array(y, "y", 1)
        if x.shape != y.shape:
            raise ValueError(f"x and y of curve {name!r} differ in length: {x.shape} vs {y.shape}")
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _to_png(figure, path)


def invariance_table_figure(
    table: Mapping[str, Mapping[str, float]],
    *,
    title: str = "Saliency invariance (IoU)",
    path: str | os.PathLike | None = None,
) -> bytes:
    """Models × augmentations heatmap of ``table[model][augmentation]`` scores in [0, 1], annotated."""
    if not table:
        raise ValueError("invariance_table_figure needs {model: {augmentation: score}}")
    models = list(table)
    augmentations = list(dict.fromkeys(a for row in table.values() for a in row))
    values = np.array([[table[m].get(a, np.nan) for a in augmentations] for m in models], dtype=float)
    figure = _figure(WIDTH_IN * 0.7, 1.0 + 0.6 * len(models))
    ax = figure.subplots()
    shown = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    figure.colorbar(shown, ax=ax, label="IoU")
    ax.set_xticks(range(len(augmentations)), augmentations)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("augmentation")
    ax.set_ylabel("model")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, "–" if np.isnan(value) else f"{value:.3f}", ha="center", va="center",
                color="white" if value < 0.6 else "black")
    ax.set_title(title)
    return _to_png(figure, path)
