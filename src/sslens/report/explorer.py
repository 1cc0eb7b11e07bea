"""The report's interactive parts: linked embedding views with every model's maps of an image,
and the trade-off scatter with axes to choose, drawn with Bokeh and inlined into the report.

Bokeh draws the plots (standalone, its one core library inlined: no widgets bundle, no server);
the small glue script of :mod:`sslens.report.html` links them to plain HTML controls: the colour
``<select>``, the axis ``<select>``\\ s and the pinned detail panel. Every plot of the explorer
shares one ``ColumnDataSource``, one row per image, so a selection in one model's plot is the
same rows, highlighted, in every other plot.

What is drawn where:

* **Points** (one row per image): its thumbnail (hover), label, for each embedding view the t-SNE
  coordinates and the labels of its nearest neighbours in the representation, each model's
  per-image metrics (hover, and colouring), and whether it is an explained image (a dark outline).
* **Payload** (JSON in the page, read by the glue script): each explained image's maps for every
  model as compact images, the metric values for colouring, and the thumbnails of images that
  are not points (e.g. a drill-down's ground-truth images).

Maps are raw (:class:`~sslens.explain.base.Explanation`) until here; this is the display step:
each map kind of an image is colour-mapped on one scale shared by all models (the range is in its
caption), so a map is compared across models on the same colours.

Bokeh gives every object an id from a process-wide counter and every document and root element a
random uuid4; both are made deterministic here (:func:`_deterministic`), so the same study writes
the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sslens.report.figures import colormap

#: Thumbnails and maps are stored as lossy WebP, no larger than they are shown (the browser
#: scales them up): a map is 5.5x smaller than as PNG (docs/BENCHMARKS.md, "Report explorer").
IMAGE_FORMAT = "WEBP"
IMAGE_QUALITY = 75
THUMBNAIL_PIXELS = 48
MAP_PIXELS = 64
MAP_COLORMAP = "inferno"
#: The metric colour scale (a colour-blind-safe sequential palette); NaN (not measured) is grey.
METRIC_COLORMAP = "viridis"
NOT_MEASURED = "#c8c8c8"

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class EmbeddingView:
    """One model's 2-D embedding of the points: ``coords`` (N, 2) and ``neighbours`` (N, k)
    row indices of each point's nearest neighbours in the representation, nearest first."""

    model: str
    output: str
    coords: np.ndarray
    neighbours: np.ndarray


@dataclass
class ExplorerData:
    """What the embedding explorer shows.

    Attributes:
        items: a stable name per point (e.g. the test index), N of them.
        labels: the class name of each point.
        thumbnails: (N, h, w, 3) uint8 images of the points.
        views: every model's embedding view(s), in display order.
        metrics: ``{metric: {model: (N,) float}}`` per-image values, NaN where not measured.
        maps: ``{item: {model: {map name: (H, W) float}}}`` raw maps of the explained images.
        notes: ``{metric: sentence}``, what each metric means (shown in the colour legend).
    """

    items: list[str]
    labels: list[str]
    thumbnails: np.ndarray
    views: list[EmbeddingView]
    metrics: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count = len(self.items)
        if len(self.labels) != count or len(self.thumbnails) != count:
            raise ValueError(
                f"ExplorerData needs one label and one thumbnail per item: {count} items, "
                f"{len(self.labels)} labels, {len(self.thumbnails)} thumbnails."
            )
        for view in self.views:
            if np.shape(view.coords) != (count, 2) or len(view.neighbours) != count:
                raise ValueError(
                    f"View {view.model}/{view.output}: coords must be ({count}, 2) and neighbours "
                    f"({count}, k); got {np.shape(view.coords)} and {np.shape(view.neighbours)}."
                )
        for metric, per_model in self.metrics.items():
            for model, values in per_model.items():
                if np.shape(values) != (count,):
                    raise ValueError(f"Metric {metric!r} of {model!r}: expected ({count},) values; got {np.shape(values)}.")
        unknown = sorted(set(self.maps) - set(self.items))
        if unknown:
            raise ValueError(f"Maps given for items that are not points: {unknown[:5]}.")


@dataclass
class Interactive:
    """An interactive block of a section: a Bokeh ``root`` (embedded with the page's other
    roots in one Bokeh document), trusted markup ``before`` and ``after`` it (built here, every
    user string escaped), and the JSON ``data`` its glue code reads, under ``kind`` in the page's
    payload."""

    kind: str
    root: object
    before: str
    after: str
    data: dict
    #: images whose thumbnails the block already holds (the page's drill-downs reuse them)
    thumbnails: frozenset[str] = frozenset()


def image_uri(pixels: np.ndarray, largest: int = THUMBNAIL_PIXELS) -> str:
    """(h, w, 3) uint8 → a ``data:`` URI of a compact image, shrunk to at most ``largest``
    pixels a side."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if max(image.size) > largest:
        image.thumbnail((largest, largest), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMAT, quality=IMAGE_QUALITY, method=4)
    return f"data:image/{IMAGE_FORMAT.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def map_uri(values: np.ndarray, low: float, high: float) -> str:
    """(H, W) raw map → a ``data:`` URI, colour-mapped linearly from ``low`` to ``high``."""
    span = high - low if high > low else 1.0
    scaled = np.clip((np.asarray(values, dtype=np.float64) - low) / span, 0.0, 1.0)
    rgb = colormap(MAP_COLORMAP)(np.nan_to_num(scaled))[..., :3]
    return image_uri(np.round(rgb * 255).astype(np.uint8), MAP_PIXELS)


def _hex(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(round(c * 255)) for c in rgba[:3]))


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per class, in first-seen order of the sorted class list (as the static t-SNE)."""
    names = sorted(set(labels))
    cmap = colormap("tab10" if len(names) <= 10 else "tab20")
    return {name: _hex(cmap(i % cmap.N)) for i, name in enumerate(names)}


def _metric_text(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _map_payload(data: ExplorerData) -> dict:
    """``{item: {model: [[name, uri, low, high], ...]}}``: each map kind of an image shares one
    colour scale across the models (its range), so colours compare across models."""
    payload = {}
    order = {item: row for row, item in enumerate(data.items)}
    for item in sorted(data.maps, key=order.__getitem__):
        per_model = data.maps[item]
        kinds = list(dict.fromkeys(kind for maps in per_model.values() for kind in maps))
        scales = {}
        for kind in kinds:
            values = np.concatenate([np.ravel(maps[kind]) for maps in per_model.values() if kind in maps])
            values = values[np.isfinite(values)]
            scales[kind] = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        payload[item] = {
            model: [[kind, map_uri(maps[kind], *scales[kind]), *scales[kind]] for kind in kinds if kind in maps]
            for model, maps in per_model.items()
        }
    return payload


def embedding_explorer(data: ExplorerData, *, name: str = "explorer") -> Interactive:
    """The linked t-SNE grid (a row per model, a column per output), its controls and panel."""
    from bokeh.layouts import gridplot
    from bokeh.models import (
        BoxSelectTool,
        ColumnDataSource,
        CustomJS,
        HoverTool,
        LassoSelectTool,
        TapTool,
    )
    from bokeh.plotting import figure

    models = list(dict.fromkeys(view.model for view in data.views))
    outputs = list(dict.fromkeys(view.output for view in data.views))
    # Column names by position: two model names may differ only in characters a name drops.
    model_key = {model: f"m{i}" for i, model in enumerate(models)}
    view_key = {(v.model, v.output): f"{model_key[v.model]}_o{outputs.index(v.output)}" for v in data.views}
    colors = label_colors(data.labels)
    explained = set(data.maps)
    columns: dict[str, list] = {
        "item": list(data.items),
        "label": list(data.labels),
        "thumb": [image_uri(t) for t in data.thumbnails],
        "explained": ["explained: click for every model's maps" if i in explained else "" for i in data.items],
        "line": ["#111111" if i in explained else "#ffffff" for i in data.items],
        "size": [9 if i in explained else 6 for i in data.items],
    }
    for model in models:
        columns[f"color_{model_key[model]}"] = [colors[label] for label in data.labels]
        columns[f"tip_{model_key[model]}"] = [
            " · ".join(f"{metric} {_metric_text(float(per_model[model][row]))}"
                       for metric, per_model in data.metrics.items() if model in per_model) or "–"
            for row in range(len(data.items))
        ]
    for view in data.views:
        key = view_key[view.model, view.output]
        columns[f"x_{key}"] = np.asarray(view.coords[:, 0], dtype=np.float64).round(4).tolist()
        columns[f"y_{key}"] = np.asarray(view.coords[:, 1], dtype=np.float64).round(4).tolist()
        columns[f"nb_{key}"] = [", ".join(data.labels[j] for j in row) for row in np.asarray(view.neighbours)]
    source = ColumnDataSource(columns, name=f"{name}-points")
    plots = []
    for view in data.views:
        key = view_key[view.model, view.output]
        plot = figure(
            width=300, height=280, title=f"{view.model} · {view.output}", tools="pan,wheel_zoom,reset",
            toolbar_location="above", name=f"{name}-plot-{key}",
        )
        renderer = plot.scatter(
            f"x_{key}", f"y_{key}", source=source, size="size", fill_color=f"color_{model_key[view.model]}",
            line_color="line", line_width=1.2, fill_alpha=0.85, nonselection_fill_alpha=0.12,
            nonselection_line_alpha=0.12, name=f"{name}-renderer-{key}",
        )
        tooltip = (
            '<div class="sslens-tip"><img src="@thumb" alt="" width="64" height="64">'
            "<div><b>@label</b> · image @item</div>"
            f"<div>neighbours: @nb_{key}</div><div>@tip_{model_key[view.model]}</div><div>@explained</div></div>"
        )
        plot.add_tools(HoverTool(renderers=[renderer], tooltips=tooltip), TapTool(renderers=[renderer]),
                       BoxSelectTool(renderers=[renderer]), LassoSelectTool(renderers=[renderer]))
        plot.xaxis.visible = plot.yaxis.visible = False
        plot.grid.visible = False
        plots.append(plot)
    source.selected.js_on_change("indices", CustomJS(code="window.sslensPin && window.sslensPin(cb_obj.indices);"))
    grid = gridplot(plots, ncols=len(outputs), toolbar_location=None, merge_tools=False)
    metrics = {
        metric: {model: [None if not math.isfinite(v) else round(float(v), 6) for v in values]
                 for model, values in per_model.items()}
        for metric, per_model in data.metrics.items()
    }
    palette = [_hex(colormap(METRIC_COLORMAP)(i / 255)) for i in range(256)]
    payload = {
        "source": f"{name}-points", "models": models, "columns": model_key, "labels": colors, "metrics": metrics,
        # Each image's nearest neighbours in each model's first view, for the pinned panel.
        "neighbours": {v.model: np.asarray(v.neighbours).tolist() for v in data.views if v.output == outputs[0]},
        "notes": data.notes, "maps": _map_payload(data), "palette": palette, "missing": NOT_MEASURED,
    }

    options = "".join(f'<option value="{html.escape(m, quote=True)}">{html.escape(m)}</option>' for m in data.metrics)
    before = (
        f'<div class="interactive" data-explorer="{html.escape(name, quote=True)}">'
        '<div class="controls"><label>Colour by <select class="color-by">'
        f'<option value="">label</option>{options}</select></label> <span class="legend"></span></div>'
    )
    after = (
        '<div class="panel" aria-live="polite"><p>Click a point to pin its maps here; an outlined '
        "point is an explained image.</p></div></div>"
    )
    return Interactive(name, grid, before, after, payload, frozenset(data.items))


def tradeoff_scatter(
    models: Sequence[str], metrics: Mapping[str, Sequence[Mapping | None]], *, x: str, y: str,
    name: str = "tradeoff",
) -> Interactive:
    """An interactive trade-off scatter: one point per model, axes chosen from ``metrics``
    (``{metric: [estimate dict or None per model]}``), each point labelled with its model and
    drawn with both intervals."""
    from bokeh.models import ColumnDataSource, LabelSet, Whisker
    from bokeh.plotting import figure

    def parts(metric: str) -> dict[str, list]:
        values = metrics[metric]
        pick = lambda key: [None if v is None or v.get(key) is None else float(v[key]) for v in values]  # noqa: E731
        return {"mean": pick("mean"), "lo": pick("ci_low"), "hi": pick("ci_high")}

    table = {metric: parts(metric) for metric in metrics}
    nan = lambda values: [math.nan if v is None else v for v in values]  # noqa: E731
    source = ColumnDataSource({
        "model": list(models),
        "x": nan(table[x]["mean"]), "x_lo": nan(table[x]["lo"]), "x_hi": nan(table[x]["hi"]),
        "y": nan(table[y]["mean"]), "y_lo": nan(table[y]["lo"]), "y_hi": nan(table[y]["hi"]),
    }, name=f"{name}-source")
    plot = figure(width=640, height=420, tools="pan,wheel_zoom,reset", name=f"{name}-plot",
                  x_axis_label=x, y_axis_label=y, sizing_mode="scale_width", max_width=640)
    plot.xaxis.name, plot.yaxis.name = f"{name}-x-axis", f"{name}-y-axis"
    plot.scatter("x", "y", source=source, size=10, color="#1f77b4")
    # Invisible corners of the intervals, so the axes' automatic ranges include the whiskers.
    for corner in ("lo", "hi"):
        plot.scatter(f"x_{corner}", f"y_{corner}", source=source, alpha=0)
    plot.add_layout(Whisker(source=source, base="y", lower="x_lo", upper="x_hi", dimension="width"))
    plot.add_layout(Whisker(source=source, base="x", lower="y_lo", upper="y_hi", dimension="height"))
    plot.add_layout(LabelSet(x="x", y="y", text="model", source=source, x_offset=6, y_offset=6))
    select = lambda role, chosen: "".join(  # noqa: E731
        f'<option value="{html.escape(m, quote=True)}"{" selected" if m == chosen else ""}>{html.escape(m)}</option>'
        for m in metrics
    )
    before = (
        f'<div class="interactive" data-tradeoff="{html.escape(name, quote=True)}"><div class="controls">'
        f'<label>x <select class="axis-x">{select("x", x)}</select></label> '
        f'<label>y <select class="axis-y">{select("y", y)}</select></label></div>'
    )
    data = {"source": f"{name}-source", "axes": [f"{name}-x-axis", f"{name}-y-axis"], "metrics": table}
    return Interactive(name, plot, before, "</div>", data)


def embed(roots: Mapping[str, object]) -> tuple[str, dict[str, str]]:
    """One Bokeh document for all of the page's ``roots``: its ``<script>`` and each root's
    ``<div>`` by name, with deterministic ids (:func:`_deterministic`)."""
    from bokeh.embed import components

    script, divs = components(dict(roots))
    joined = _deterministic("\n".join([script, *(divs[name] for name in roots)]))
    parts = joined.split("\n")
    # components' divs are one line each, after the script.
    return "\n".join(parts[: -len(roots)]), dict(zip(roots, parts[-len(roots):], strict=True))


def _deterministic(markup: str) -> str:
    """Bokeh's ids renumbered in order of first appearance: its object ids come from a
    process-wide counter and its document and element ids are random uuid4s.

    Ids are renamed only where Bokeh writes them — ``"id":"…"`` in the document JSON (inside
    which a user string's quotes are escaped, so it cannot form this context), the divs' ``id``
    and ``data-root-id``, the document's key and the parsed ``render_items`` — so a user string
    that happens to look like an id is left as it is.
    """
    renamed: dict[str, str] = {}

    def new_id(old: str) -> str:
        return renamed.setdefault(old, f"sslens-bk-{len(renamed)}")

    def sub(pattern: str, text: str) -> str:
        return re.sub(pattern, lambda m: m.group(1) + new_id(m.group(2)) + m.group(3), text)

    markup = sub(r'(docs_json = \'\{")(' + _UUID.pattern + r')(")', markup)
    markup = sub(r'("id":")(p\d+)(")', markup)
    markup = sub(r'(<div id=")([^"]+)(")', markup)
    markup = sub(r'(data-root-id=")(p\d+)(")', markup)

    def items(match: re.Match) -> str:
        render_items = json.loads(match.group(2))
        for item in render_items:
            item["docid"] = new_id(item["docid"])
            item["roots"] = {new_id(k): new_id(v) for k, v in item["roots"].items()}
            item["root_ids"] = [new_id(k) for k in item["root_ids"]]
        return match.group(1) + json.dumps(render_items, separators=(",", ":")) + match.group(3)

    return re.sub(r"(const render_items = )(\[.*?\])(;\n)", items, markup)


def payload_json(payload: Mapping) -> str:
    """``payload`` as JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and
    ``&`` are written as ``\\u`` escapes, so no string can close the script element."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def bokeh_library() -> str:
    """BokehJS's core library, to inline once in the page."""
    from bokeh.resources import Resources

    return "\n".join(Resources(mode="inline", components=["bokeh"]).js_raw)
