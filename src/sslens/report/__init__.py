"""The study's report: figures as PNG bytes, one self-contained HTML file, atomic JSON results."""

from sslens.report.figures import (
    bar_chart,
    curves_figure,
    heatmap_grid,
    invariance_table_figure,
    tsne_figure,
)
from sslens.report.html import (
    Section,
    Table,
    environment_info,
    format_cell,
    render_html,
    render_report,
    write_json_atomic,
)

__all__ = [
    "Section",
    "Table",
    "bar_chart",
    "curves_figure",
    "environment_info",
    "format_cell",
    "heatmap_grid",
    "invariance_table_figure",
    "render_html",
    "render_report",
    "tsne_figure",
    "write_json_atomic",
]
