"""One self-contained HTML report: inline CSS, figures as base64 PNG data URIs, and, where a
section has one, an interactive block (:mod:`sslens.report.explorer`) with its inlined scripts.

The file opens offline in any browser and can be mailed as one attachment. Without JavaScript
it is the static report (every figure and table); with it, the interactive blocks appear,
tables marked sortable sort by a click on a header, and rows with a drill-down open the images
behind them. Printing shows the static report. Every string that
comes from the user or the data (titles, captions, model and class names, table cells, config
values, paths) goes through :func:`html.escape`, so a class called ``<script>`` is shown, never
run. Numbers are formatted one way everywhere (:func:`format_cell`): three decimals, an estimate
with its 95% interval as ``mean [low, high]``, and a (mean, std) pair as ``mean ± std``.

The report is written atomically (a temporary file in the same folder, then ``os.replace``): an
error while rendering or writing leaves the previous file byte-identical.

>>> import tempfile, pathlib
>>> table = Table(columns=["model", "IoU"], rows=[["SimCLR", (0.62, 0.05)]], caption="Table 1")
>>> out = pathlib.Path(tempfile.mkdtemp()) / "report.html"
>>> render_report(out, title="Demo", sections=[Section("Invariance", "Higher is better.", tables=[table])],
...               config={"seed": 0}, environment={"device": "cpu"})
>>> "0.620 ± 0.050" in out.read_text()
True
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any

import yaml

from sslens.atomic import atomic_write_bytes, jsonable
from sslens.stats import format_estimate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DECIMALS = 3
REPORTED_PACKAGES = ("sslens", "torch", "torchvision", "kornia", "numpy", "scikit-learn", "openTSNE", "matplotlib")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 960px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
p.aid { background: #f3f6fa; border-left: 4px solid #5b8bd0; padding: .5em .8em; }
nav ol { columns: 2; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, caption { font-size: .92em; color: #444; margin: .3em 0; text-align: left; }
div.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul.notes { background: #f7faf3; border-left: 4px solid #6aa84f; padding: .5em .8em .5em 2em; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: .8em; overflow-x: auto; font-size: .85em; }
footer { margin-top: 3em; font-size: .8em; color: #777; }
.no-js .interactive, .no-js button.drill, .no-js th button.sort, .js th span.no-sort { display: none; }
th button.sort { border: 0; background: none; font: inherit; cursor: pointer; padding: 0; }
th[aria-sort=ascending] button.sort::after { content: " ▲"; }
th[aria-sort=descending] button.sort::after { content: " ▼"; }
button.drill { margin-left: .4em; font-size: .8em; cursor: pointer; }
div.interactive { margin: 1em 0; overflow-x: auto; }
div.controls { margin: .4em 0; }
div.panel, div.gallery { border: 1px solid #ccc; background: #fafafa; padding: .5em .8em; margin: .6em 0; overflow-x: auto; }
div.gallery figure, div.panel figure { display: inline-block; margin: .2em; text-align: center; font-size: .8em; }
div.gallery img, div.panel img, .sslens-tip img { image-rendering: pixelated; }
div.panel td img { width: 64px; height: 64px; }
div.gallery img { width: 48px; height: 48px; cursor: pointer; }
.sslens-tip { max-width: 260px; font-size: 12px; }
@media print { div.table { overflow: visible; } body { max-width: none; }
               .interactive, button.drill, th button.sort, div.gallery { display: none !important; } }
"""


@dataclass
class Drill:
    """The images behind a table row: ``items`` (image name, its value of ``value``) and each
    image's thumbnail ((h, w, 3) uint8), shown sorted by value when the row's button is pressed."""

    title: str
    value: str
    items: list[tuple[str, float | None]]
    thumbnails: dict[str, Any]

    def __post_init__(self) -> None:
        missing = sorted({item for item, _ in self.items} - set(self.thumbnails))
        if missing:
            raise ValueError(f"Drill-down {self.title!r}: no thumbnail for images {missing[:5]}.")


@dataclass
class Table:
    """A table: ``columns`` headers and ``rows`` of cells (see :func:`format_cell`).

    ``sortable`` tables sort by any column when a header is clicked (numbers by their mean);
    ``drill`` gives each row its :class:`Drill` (or None), opened from a button in its first cell.
    """

    columns: list[str]
    rows: list[list]
    caption: str = ""
    sortable: bool = False
    drill: list[Drill | None] | None = None

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"Table {self.caption!r}: row {index} has {len(row)} cells but there are "
                    f"{len(self.columns)} columns {self.columns}."
                )
        if self.drill is not None and len(self.drill) != len(self.rows):
            raise ValueError(f"Table {self.caption!r}: {len(self.drill)} drill-downs for {len(self.rows)} rows.")


@dataclass
class Section:
    """A report section: a title, a one-line reading aid, figures (caption, PNG bytes), tables
    and notes (sentences shown as a list after the tables, e.g. a generated conclusion)."""

    title: str
    reading_aid: str = ""
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: interactive blocks (:class:`sslens.report.explorer.Interactive`), shown after the figures
    interactive: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "\n" in self.reading_aid.strip():
            raise ValueError(f"Section {self.title!r}: the reading aid must be one line.")
        for caption, png in self.figures:
            if not isinstance(png, bytes | bytearray) or not bytes(png[:8]) == PNG_MAGIC:
                raise TypeError(
                    f"Section {self.title!r}, figure {caption!r}: expected PNG bytes (from "
                    f"sslens.report.figures); got {type(png).__name__}."
                )
        for table in self.tables:
            if not isinstance(table, Table):
                raise TypeError(f"Section {self.title!r}: tables must be Table objects; got {type(table).__name__}")


def format_cell(value: Any) -> str:
    """The text of one table cell, not yet escaped.

    floats → 3 decimals; an estimate dict (:meth:`sslens.stats.Estimate.to_dict`) →
    ``"mean [ci_low, ci_high]"``; a (mean, std) pair of numbers → ``"mean ± std"``; NaN and
    None → "–"; bools → "yes"/"no"; ints and strings as they are.
    """
    if value is None:
        return "–"
    if isinstance(value, Mapping) and "mean" in value:
        return format_estimate(value, DECIMALS)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "–" if math.isnan(value) else f"{float(value):.{DECIMALS}f}"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    ):
        return f"{format_cell(value[0])} ± {format_cell(value[1])}"
    return str(value)


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Number | tuple) and not isinstance(value, bool)) or (
        isinstance(value, Mapping) and "mean" in value
    )


def environment_info(*, device: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """Python, platform and package versions (and the device and seed, if given) for a report."""
    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    if device is not None:
        info["device"] = device
    if seed is not None:
        info["seed"] = seed
    info["packages"] = packages
    return info


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def _sort_key(value: Any) -> str:
    """A cell's sort value: the mean of a number or estimate, else its text."""
    if isinstance(value, Mapping) and "mean" in value:
        value = value["mean"]
    elif isinstance(value, tuple):
        value = value[0]
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return repr(float(value))
    return ""


def _render_table(table: Table, drills: list[Drill]) -> str:
    """The table's HTML; each row's drill-down is appended to ``drills`` (the page payload)."""
    esc = html.escape
    if table.sortable:
        head = "".join(f'<th><button class="sort" type="button">{esc(str(c))}</button>'
                       f'<span class="no-sort">{esc(str(c))}</span></th>' for c in table.columns)
    else:
        head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    body = []
    for index, row in enumerate(table.rows):
        cells = []
        for column, value in enumerate(row):
            text = esc(format_cell(value))
            drill = table.drill[index] if table.drill is not None and column == 0 else None
            if drill is not None:
                drills.append(drill)
                text += (f'<button class="drill" type="button" data-drill="{len(drills) - 1}" '
                         f'title="{esc(drill.title, quote=True)}">images</button>')
            number = _is_number(value)
            sort = f' data-sort="{_sort_key(value)}"' if table.sortable and number else ""
            cells.append(f'<td class="num"{sort}>{text}</td>' if number else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    caption = f"<caption>{esc(table.caption)}</caption>" if table.caption else ""
    kind = ' class="sortable"' if table.sortable else ""
    # Wide tables scroll inside their box rather than widening the page on a narrow screen.
    return (f'<div class="table"><table{kind}>{caption}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _render_figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(bytes(png)).decode("ascii")
    text = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{text}">'
        f"<figcaption>{text}</figcaption></figure>"
    )


def _render_section(index: int, section: Section, drills: list[Drill], divs: Mapping[str, str]) -> str:
    parts = [f'<section id="section-{index}"><h2>{html.escape(section.title)}</h2>']
    if section.reading_aid:
        parts.append(f'<p class="aid">{html.escape(section.reading_aid.strip())}</p>')
    parts.extend(block.before + divs[block.kind] + block.after for block in section.interactive)
    parts.extend(_render_figure(caption, png) for caption, png in section.figures)
    parts.extend(_render_table(table, drills) for table in section.tables)
    if section.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in section.notes) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _render_configuration(index: int, config: Mapping[str, Any], environment: Mapping[str, Any]) -> str:
    config_text = yaml.safe_dump(jsonable(config), sort_keys=False, allow_unicode=True)
    environment_table = Table(
        ["key", "value"], [[key, format_cell(value)] for key, value in _flatten(jsonable(environment))], "Environment"
    )
    return "\n".join([
        f'<section id="section-{index}"><h2>Configuration and environment</h2>',
        '<p class="aid">Everything needed to reproduce the numbers above.</p>',
        "<h3>Configuration</h3>",
        f"<pre>{html.escape(config_text)}</pre>",
        _render_table(environment_table, []),
        "</section>",
    ])


def render_html(
    *, title: str, sections: Sequence[Section], config: Mapping[str, Any], environment: Mapping[str, Any]
) -> str:
    """The report as one HTML string (what :func:`render_report` writes)."""
    if not isinstance(title, str) or not title:
        raise ValueError("title must be a non-empty string")
    if isinstance(sections, Section) or not all(isinstance(s, Section) for s in sections):
        raise TypeError("sections must be a list of Section objects")
    if not isinstance(config, Mapping) or not isinstance(environment, Mapping):
        raise TypeError("config and environment must be mappings (e.g. dicts)")
    all_titles = [s.title for s in sections] + ["Configuration and environment"]
    toc = "".join(
        f'<li><a href="#section-{i}">{html.escape(t)}</a></li>' for i, t in enumerate(all_titles, start=1)
    )
    blocks = [block for section in sections for block in section.interactive]
    kinds = [block.kind for block in blocks]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"Interactive blocks need distinct kinds; got {kinds}")
    scripts, divs = "", {}
    if blocks:
        from sslens.report import explorer

        bokeh_script, divs = explorer.embed({block.kind: block.root for block in blocks})
        scripts = f"<script>{explorer.bokeh_library()}</script>\n{bokeh_script}"
    drills: list[Drill] = []
    body = [_render_section(i, s, drills, divs) for i, s in enumerate(sections, start=1)]
    body.append(_render_configuration(len(sections) + 1, config, environment))
    version = html.escape(str(jsonable(environment).get("packages", {}).get("sslens", "")))
    interactive = ""
    if blocks or drills or any(t.sortable for s in sections for t in s.tables):
        interactive = _interactive_scripts(blocks, drills, scripts)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en" class="no-js"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Before anything renders: the JS-only controls appear only where scripts run.
        "<script>document.documentElement.className = 'js';</script>" if interactive else "",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav><ol>{toc}</ol></nav>",
        *body,
        f"<footer>Generated by sslens {version}</footer>",
        interactive,
        "</body></html>",
    ])


def _interactive_scripts(blocks: Sequence[Any], drills: Sequence[Drill], bokeh_scripts: str) -> str:
    """The page payload (JSON, script-safe), BokehJS with the document, and the glue script."""
    from sslens.report.explorer import image_uri, payload_json

    thumbnails: dict[str, str] = {}
    shown = frozenset().union(*(block.thumbnails for block in blocks))
    for drill in drills:
        for item, _ in drill.items:
            if item not in thumbnails and item not in shown:
                thumbnails[item] = image_uri(drill.thumbnails[item])
    payload = {
        "blocks": {block.kind: block.data for block in blocks},
        # A drill-down's thumbnail is taken from the block that shows the image, when one does.
        "drills": [{"title": d.title, "value": d.value, "items": [[item, _finite(v)] for item, v in d.items]}
                   for d in drills],
        "thumbs": thumbnails,
    }
    return "\n".join([
        f'<script type="application/json" id="sslens-data">{payload_json(payload)}</script>',
        bokeh_scripts,
        f"<script>{_glue_script()}</script>",
    ])


def _glue_script() -> str:
    """The page's glue script (``explorer.js``, shipped with the package)."""
    return resources.files("sslens.report").joinpath("explorer.js").read_text(encoding="utf-8")


def _finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 6)


def render_report(
    path: str | os.PathLike,
    *,
    title: str,
    sections: Sequence[Section],
    config: Mapping[str, Any],
    environment: Mapping[str, Any],
) -> None:
    """Render the report and write it to ``path`` atomically (the old file survives any error).

    Args:
        path: the .html file to write; its folder is created if needed.
        title: the report's heading.
        sections: in order; a "Configuration and environment" section is appended.
        config: the run's configuration, shown as YAML.
        environment: versions, device, seed (see :func:`environment_info`).
    """
    document = render_html(title=title, sections=sections, config=config, environment=environment)
    atomic_write_bytes(path, document.encode("utf-8"))
