"""The study's report: figures as PNG bytes and one self-contained HTML file."""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "bar_chart": "sslens.report.figures",
    "curves_figure": "sslens.report.figures",
    "heatmap_grid": "sslens.report.figures",
    "invariance_table_figure": "sslens.report.figures",
    "scatter_figure": "sslens.report.figures",
    "tsne_figure": "sslens.report.figures",
    "Section": "sslens.report.html",
    "Table": "sslens.report.html",
    "environment_info": "sslens.report.html",
    "format_cell": "sslens.report.html",
    "render_html": "sslens.report.html",
    "render_report": "sslens.report.html",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
