"""Bokeh against Plotly for the report explorer: file size and time to write a self-contained
page with a 2,000-point scatter whose points show their thumbnail on hover.

Both pages inline their library (no request leaves the page) and carry the same per-point data:
x, y, label and a 32 x 32 PNG thumbnail as a data URI. Bokeh shows the thumbnail in its hover
tool's HTML template; Plotly's hover labels take no images, so its page adds the few lines of
JavaScript a Plotly explorer needs for that (an ``plotly_hover`` handler filling an <img>).

    python benchmarks/explorer_libraries.py [--points 2000] [--repeats 3]

Prints one line per library: bytes of the page, of its one-point page (the inlined library and
frame every report pays), and the median seconds
to build and write it. Results go in docs/BENCHMARKS.md ("Report explorer: which library").
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def thumbnails(count: int, size: int, seed: int) -> list[str]:
    """``count`` PNG data URIs of smooth random ``size`` x ``size`` images (CIFAR-like entropy)."""
    rng = np.random.default_rng(seed)
    uris = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def bokeh_page(x, y, labels, thumbs, path: Path) -> None:
    from bokeh.embed import file_html
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    source = ColumnDataSource({"x": x, "y": y, "label": labels, "thumb": thumbs})
    plot = figure(width=600, height=600, tools="pan,wheel_zoom,box_select,tap,reset")
    plot.scatter("x", "y", source=source, size=5)
    plot.add_tools(HoverTool(tooltips='<div><img src="@thumb" width="64" height="64"><br>@label</div>'))
    path.write_text(file_html(plot, INLINE, "explorer"), encoding="utf-8")


def plotly_page(x, y, labels, thumbs, path: Path) -> None:
    import plotly.graph_objects as go

    figure = go.Figure(go.Scattergl(x=x, y=y, mode="markers", customdata=thumbs, text=labels,
                                    hovertemplate="%{text}<extra></extra>"))
    html = figure.to_html(include_plotlyjs=True, full_html=True, div_id="explorer")
    hover = ('<img id="thumb" width="64" height="64"><script>document.getElementById("explorer")'
             '.on("plotly_hover",e=>{document.getElementById("thumb").src=e.points[0].customdata;});</script>')
    path.write_text(html.replace("</body>", hover + "</body>"), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=args.points).tolist(), rng.normal(size=args.points).tolist()
    labels = [f"class {i % 10}" for i in range(args.points)]
    thumbs = thumbnails(args.points, 32, seed=0)
    thumb_bytes = sum(len(t) for t in thumbs)
    with tempfile.TemporaryDirectory() as folder:
        for name, build in (("bokeh", bokeh_page), ("plotly", plotly_page)):
            path = Path(folder) / f"{name}.html"
            # The page of one point is the library and the page's frame: what every report pays.
            build(x[:1], y[:1], labels[:1], thumbs[:1], path)
            library = path.stat().st_size
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                build(x, y, labels, thumbs, path)
                seconds.append(time.perf_counter() - start)
            size = path.stat().st_size
            print(f"{name}: page {size / 1e6:.2f} MB (one-point page {library / 1e6:.2f} MB, thumbnails "
                  f"{thumb_bytes / 1e6:.2f} MB), build and write {statistics.median(seconds):.2f} s "
                  f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
