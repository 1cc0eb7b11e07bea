"""One self-contained HTML report: inline CSS, figures as base64 PNG data URIs, no JavaScript.

The file opens offline in any browser and can be mailed as one attachment. Every string that
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
from importlib import metadata
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
@media print { div.table { overflow: visible; } body { max-width: none; } }
"""


@dataclass
class Table:
    """A table: ``columns`` headers and ``rows`` of cells (see :func:`format_cell`)."""

    columns: list[str]
    rows: list[list]
    caption: str = ""

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"Table {self.caption!r}: row {index} has {len(row)} cells but there are "
                    f"{len(self.columns)} columns {self.columns}."
                )


@dataclass
class Section:
    """A report section: a title, a one-line reading aid, figures (caption, PNG bytes), tables
    and notes (sentences shown as a list after the tables, e.g. a generated conclusion)."""

    title: str
    reading_aid: str = ""
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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


def _render_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{esc(format_cell(v))}</td>' if _is_number(v) else f"<td>{esc(format_cell(v))}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{esc(table.caption)}</caption>" if table.caption else ""
    # Wide tables scroll inside their box rather than widening the page on a narrow screen.
    return f'<div class="table"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _render_figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(bytes(png)).decode("ascii")
    text = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{text}">'
        f"<figcaption>{text}</figcaption></figure>"
    )


def _render_section(index: int, section: Section) -> str:
    parts = [f'<section id="section-{index}"><h2>{html.escape(section.title)}</h2>']
    if section.reading_aid:
        parts.append(f'<p class="aid">{html.escape(section.reading_aid.strip())}</p>')
    parts.extend(_render_figure(caption, png) for caption, png in section.figures)
    parts.extend(_render_table(table) for table in section.tables)
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
        _render_table(environment_table),
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
    body = [_render_section(i, s) for i, s in enumerate(sections, start=1)]
    body.append(_render_configuration(len(sections) + 1, config, environment))
    version = html.escape(str(jsonable(environment).get("packages", {}).get("sslens", "")))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav><ol>{toc}</ol></nav>",
        *body,
        f"<footer>Generated by sslens {version}</footer>",
        "</body></html>",
    ])


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
