import base64
import functools
import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from sslens.atomic import write_json_atomic
from sslens.evaluate.embedding import effective_perplexity, tsne_embedding
from sslens.report import (
    Section,
    Table,
    bar_chart,
    curves_figure,
    format_cell,
    heatmap_grid,
    invariance_table_figure,
    render_report,
    scatter_figure,
    tsne_figure,
)
from sslens.report import html as report_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


class _Collector(HTMLParser):
    """Collects headings, <img> sources, table row counts, scripts and the visible text."""

    def __init__(self):
        super().__init__()
        self.headings, self.images, self.table_rows, self.scripts = [], [], [], 0
        self._heading, self._in_tbody, self.text = None, False, []

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "h3"):
            self._heading = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "tbody":
            self._in_tbody = True
            self.table_rows.append(0)
        elif tag == "tr" and self._in_tbody:
            self.table_rows[-1] += 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None
        elif tag == "tbody":
            self._in_tbody = False

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data
        self.text.append(data)


@functools.cache
def _figures():
    rng = np.random.default_rng(0)
    coords = {f"SimCLR {EVIL}": (rng.normal(size=(12, 2)), np.arange(12) % 3)}
    tsne_png = tsne_figure(coords, class_names=["cat", EVIL, "dog"])
    curves_png = curves_figure(
        {"deletion": (np.linspace(0, 1, 5), np.linspace(1, 0, 5))}, xlabel="fraction", ylabel="cosine"
    )
    return tsne_png, curves_png


def _sections():
    tsne_png, curves_png = _figures()
    invariance = Table(
        columns=["model", "hflip", "rot15"],
        rows=[["SwAV", (0.5721, 0.1), 0.486], [f"MoCo {EVIL}", (0.6053, 0.02), float("nan")]],
        caption="Table 1. IoU",
    )
    faithfulness = Table(columns=["model", "deletion AUC"], rows=[["SwAV", 0.25], ["MoCo", 0.5], ["SimCLR", 1]])
    return [
        Section("Saliency invariance", "Higher IoU: maps follow the image.", [("t-SNE", tsne_png)], [invariance]),
        Section(f"Faithfulness {EVIL}", "Lower deletion AUC is better.", [("Deletion curves", curves_png)], [faithfulness]),
    ]


def _render(path, sections=None):
    render_report(
        path,
        title="sslens study",
        sections=_sections() if sections is None else sections,
        config={"models": ["simclr", EVIL], "data": {"path": "/tmp/<x>&y"}, "size": (32, 32)},
        environment={"device": "cpu", "seed": 0, "packages": {"torch": "2.x"}},
    )


def test_report_structure_figures_and_tables(tmp_path):
    path = tmp_path / "report.html"
    _render(path)
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    assert parser.headings == [
        "sslens study", "Saliency invariance", f"Faithfulness {EVIL}", "Configuration and environment",
        "Configuration",
    ]
    assert len(parser.images) == 2
    for source in parser.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        png = base64.b64decode(source[len(prefix):], validate=True)
        assert png[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
    # Two data tables plus the environment table (device, seed, packages.torch).
    assert parser.table_rows == [2, 3, 3]
    assert parser.scripts == 0


def test_user_strings_are_escaped(tmp_path):
    path = tmp_path / "report.html"
    _render(path)
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "/tmp/&lt;x&gt;&amp;y" in text
    assert "http" not in text.replace("http-equiv", "")  # no external resources


def test_numbers_are_formatted_consistently(tmp_path):
    path = tmp_path / "report.html"
    _render(path)
    text = path.read_text(encoding="utf-8")
    assert '<td class="num">0.572 ± 0.100</td>' in text
    assert '<td class="num">0.486</td>' in text
    assert '<td class="num">–</td>' in text  # NaN
    assert format_cell(1) == "1" and format_cell(True) == "yes" and format_cell(None) == "–"
    assert format_cell(np.float32(0.12345)) == "0.123"
    estimate = {"mean": 0.662, "ci_low": 0.62, "ci_high": 0.7031, "n": 512, "unit": "test samples"}
    assert format_cell(estimate) == "0.662 [0.620, 0.703]"


def test_a_failing_render_leaves_the_previous_report_byte_identical(tmp_path):
    path = tmp_path / "report.html"
    _render(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="expected PNG bytes"):
        _render(path, sections=[Section("Broken", "x", figures=[("not a png", b"GIF89a...")])])

    class Exploding:
        def tolist(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        render_report(path, title="t", sections=[], config={"bad": Exploding()}, environment={})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_a_failing_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report_html.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _render(path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_json_atomic_converts_tensors_and_nan(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json_atomic(path, {"auc": torch.tensor([0.5, float("nan")]), "shape": (2, 3), "n": np.int64(4)})
    assert json.loads(path.read_text()) == {"auc": [0.5, None], "shape": [2, 3], "n": 4}


def test_table_rows_must_match_columns():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table(columns=["a", "b"], rows=[[1]])


@pytest.mark.parametrize("make", [
    lambda: bar_chart({"SimCLR": {"color": (0.5, 0.4, 0.6), "shape": {"mean": 0.3, "ci_low": 0.25, "ci_high": 0.35}},
                       "MoCo": {"color": (0.4, 0.3, 0.5)}}, reference={"color": 0.1}),
    lambda: scatter_figure({"SimCLR": ((0.6, 0.55, 0.65), (0.5, 0.45, 0.55)), "MoCo": ((0.5, 0.4, 0.6), None)},
                           xlabel="top-1", ylabel="IoU", reference=(0.1, 0.33)),
    lambda: heatmap_grid([
        ("SimCLR", [("image", np.zeros((8, 8, 3), np.uint8), None),
                    ("RELAX", np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0).random((8, 8)))]),
        ("MoCo", [("RELAX", np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8)))]),
    ]),
    lambda: invariance_table_figure({"SwAV": {"hflip": 0.57, "rot15": 0.49}, "MoCo": {"hflip": 0.61}}),
])
def test_figures_return_openable_pngs(make):
    png = make()
    assert png[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(png)) as image:
        assert 300 < image.size[0] <= 1000


def test_figure_is_also_saved_to_a_path(tmp_path):
    target = tmp_path / "curves.png"
    png = curves_figure({"a": ([0, 1], [1, 0])}, xlabel="x", ylabel="y", path=target)
    assert target.read_bytes() == png


def test_heatmap_grid_rejects_a_map_of_the_wrong_size():
    with pytest.raises(ValueError, match="must match image shape"):
        heatmap_grid([("row", [("col", np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4)))])])


def test_tsne_is_deterministic_and_clips_perplexity():
    features = torch.randn(15, 6, generator=torch.Generator().manual_seed(0))
    first = tsne_embedding(features, seed=3, n_iter=30)
    assert first.shape == (15, 2) and first.dtype == np.float64
    assert np.array_equal(first, tsne_embedding(features.numpy(), seed=3, n_iter=30))
    assert not np.array_equal(first, tsne_embedding(features, seed=4, n_iter=30))
    assert effective_perplexity(15, 30) == pytest.approx(14 / 3)
    assert effective_perplexity(1000, 30) == 30
    with pytest.raises(ValueError, match="at least 4 points"):
        tsne_embedding(np.zeros((3, 2)))
    bad = features.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        tsne_embedding(bad)
