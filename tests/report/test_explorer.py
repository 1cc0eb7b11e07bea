"""The explorer's building blocks: script-safe payloads, deterministic Bokeh output that leaves
user strings alone, one colour scale per map kind across models, and input checks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sslens.report.explorer import (
    EmbeddingView,
    ExplorerData,
    _map_payload,
    embedding_explorer,
    payload_json,
    tradeoff_scatter,
)
from sslens.report.html import Drill, Section, Table, render_html

LOOKALIKES = ["p1001", "p1006", "0b5f6a5e-8a0f-4a1e-9a57-2f7c2d0e4b11"]  # a Bokeh id, a uuid


def _data(count: int = 6, seed: int = 0) -> ExplorerData:
    rng = np.random.default_rng(seed)
    labels = [LOOKALIKES[i % 3] for i in range(count)]
    views = [EmbeddingView(model, output, rng.normal(size=(count, 2)), np.roll(np.arange(count), 1)[:, None])
             for model in ("a", "b") for output in ("pooled", "projection")]
    maps = {"0": {model: {"RELAX": rng.random((4, 4)) * scale} for model, scale in (("a", 1.0), ("b", 3.0))}}
    metrics = {"IoU": {"a": np.r_[0.5, np.full(count - 1, np.nan)], "b": np.linspace(0, 1, count)}}
    return ExplorerData([str(i) for i in range(count)], labels, rng.integers(0, 255, (count, 8, 8, 3), dtype=np.uint8),
                        views, metrics, maps, {"IoU": "higher is better"})


def _page() -> str:
    explorer = embedding_explorer(_data())
    scatter = tradeoff_scatter(["a", "b"], {"top-1": [{"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}, None],
                                            "IoU": [{"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4},
                                                    {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2}]},
                               x="top-1", y="IoU")
    table = Table(["model", "IoU"], [["a", 0.5]], sortable=True,
                  drill=[Drill("a", "IoU", [("0", 0.5)], {"0": np.zeros((8, 8, 3), np.uint8)})])
    return render_html(title="t", sections=[Section("S", interactive=[explorer, scatter], tables=[table])],
                       config={}, environment={})


def test_the_same_input_gives_the_same_bytes_whatever_bokeh_made_before():
    first = _page()
    # Bokeh's id counter has moved on and new uuid4s are drawn: the page must not change.
    assert _page() == first
    assert not re.search(r'"id":"p\d+"', first)


def test_user_strings_that_look_like_bokeh_ids_are_left_alone():
    page = _page()
    for lookalike in LOOKALIKES:
        assert lookalike in page


def test_the_payload_cannot_close_its_script_element():
    payload = {"name": "</script><script>alert(1)</script>", "amp": "a&b", "line": "\u2028"}
    text = payload_json(payload)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == payload


def test_a_map_kind_shares_one_colour_scale_across_models():
    data = _data()
    payload = _map_payload(data)["0"]
    values = np.concatenate([data.maps["0"][m]["RELAX"].ravel() for m in ("a", "b")])
    for model in ("a", "b"):
        name, uri, low, high = payload[model][0]
        assert (name, low, high) == ("RELAX", float(values.min()), float(values.max()))
        assert uri.startswith("data:image/webp;base64,")


def test_explorer_data_is_checked_when_built():
    data = _data()
    with pytest.raises(ValueError, match="one label and one thumbnail per item"):
        ExplorerData(data.items, data.labels[:-1], data.thumbnails, data.views)
    with pytest.raises(ValueError, match="coords must be"):
        ExplorerData(data.items, data.labels, data.thumbnails, [EmbeddingView("a", "pooled", np.zeros((2, 2)), np.zeros((2, 1)))])
    with pytest.raises(ValueError, match="not points"):
        ExplorerData(data.items, data.labels, data.thumbnails, data.views, maps={"99": {}})
    with pytest.raises(ValueError, match="no thumbnail"):
        Drill("row", "IoU", [("7", 0.1)], {})
    with pytest.raises(ValueError, match="drill-downs for"):
        Table(["a"], [[1], [2]], drill=[None])


def test_large_images_are_shrunk_to_their_display_size():
    import base64
    import io

    from PIL import Image

    from sslens.report.explorer import MAP_PIXELS, THUMBNAIL_PIXELS, image_uri, map_uri

    def size(uri: str) -> tuple[int, int]:
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size

    assert size(image_uri(np.zeros((224, 112, 3), np.uint8))) == (THUMBNAIL_PIXELS // 2, THUMBNAIL_PIXELS)
    assert size(map_uri(np.random.default_rng(0).random((224, 224)), 0.0, 1.0)) == (MAP_PIXELS, MAP_PIXELS)
    assert size(image_uri(np.zeros((32, 32, 3), np.uint8))) == (32, 32)  # small ones stay as they are
