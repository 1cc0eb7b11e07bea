"""The report in a real browser (headless Chromium through Playwright): it opens from file://
with no console error and no request leaving the page, user strings never run as script, and it
fits a 1400-px and a 700-px window without sideways scrolling.

Needs Debian's ``chromium`` (``.ci/run`` installs it; ``playwright install`` downloads a browser
and cannot run here). Without one the tests skip with the reason, except under ``CI=true``,
where a missing browser fails them.
"""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from sslens.study.config import load_study_config
from sslens.study.run import run_study

PAYLOAD = "</script><script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>"


def _browser_path() -> str | None:
    return os.environ.get("SSLENS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _launch(playwright):
    path = _browser_path()
    if path is None:
        reason = "no Chromium: apt-get install -y chromium (or set SSLENS_CHROMIUM to a Chromium binary)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    # Root in a container has no user namespace for Chromium's sandbox.
    return playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A tiny study over an image folder whose path and class name carry a script payload."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "<img src=x onerror=alert(1)>"  # no "/": a folder name cannot hold one
    for split in ("train", "test"):
        for k, name in enumerate(("cat", "<b onmouseover=alert(1)>dog")):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (32, 32), (40 * k + 3 * i, 100, 200 - 5 * i)).save(folder / f"{i}.png")
    config = {
        "title": PAYLOAD, "device": "cpu",
        "dataset": {"name": "imagefolder", "data_dir": str(data), "image_size": 32},
        "models": [{"name": "simclr", "method": "simclr", "backbone": "resnet-tiny", "epochs": 1, "batch_size": 8,
                    "optimizer": "adam", "lr": 2e-3, "warmup_epochs": 0, "max_steps": 2}],
        "random_init": True,
        "explainers": {"relax": {"num_masks": 16}, "perceptual": {"num_masks": 8}},
        "experiments": ["quality", "tsne", "explorer", "invariance", "faithfulness", "perceptual", "tradeoff"],
        "samples": {"tsne": 16, "invariance": 2, "faithfulness": 3, "perceptual": 2},
        "settings": {"quality": {"linear": False, "k": 5}, "faithfulness": {"steps": 4},
                     "tsne": {"n_iter": 50}, "perceptual": {"components": ["color", "shape"]}},
    }
    outcome = run_study(load_study_config(None, config), root / "study", progress=False)
    return outcome.report


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright()


def test_the_report_opens_offline_without_errors_and_runs_no_user_string(report):
    with _sync_playwright() as playwright:
        browser = _launch(playwright)
        page = browser.new_page()
        errors, requests, dialogs = [], [], []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert page.title() == PAYLOAD  # shown as text, whole
        assert page.evaluate("window.__pwned") is None and dialogs == []
        assert errors == []
        # The page itself and its inlined images (data: URIs); nothing else is fetched.
        assert [url for url in requests if not url.startswith("data:")] == [report.as_uri()]
        assert page.locator("h1").inner_text() == PAYLOAD
        # The data folder's name is shown in the configuration as text, not parsed as a tag.
        assert "<img src=x onerror=alert(1)>" in page.locator("body").inner_text()
        assert page.locator("img[src=x]").count() == 0
        browser.close()


@pytest.mark.parametrize("width", [1400, 700])
def test_the_report_fits_the_window_without_sideways_scrolling(report, width, tmp_path):
    with _sync_playwright() as playwright:
        browser = _launch(playwright)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(report.as_uri())
        page.screenshot(path=str(tmp_path / f"report-{width}.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # The trade-off table is wider than 700 px: it scrolls inside its own box instead.
        table = page.locator("div.table").first
        assert table.evaluate("e => getComputedStyle(e).overflowX") == "auto"
        browser.close()


#: Viewport coordinates of a point of an explorer plot, after scrolling the plot into view.
_POINT = """([plot, row]) => {
  const found = [];
  const walk = (view) => { if (!view) return; if (view.model && view.model.name === plot) found.push(view);
                           for (const child of view.child_views || []) walk(child); };
  for (const view of Object.values(Bokeh.index)) walk(view);
  const view = found[0];
  const key = plot.replace("explorer-plot-", "");
  const data = Bokeh.documents[0].get_model_by_name("explorer-points").data;
  view.canvas_view.el.scrollIntoView({block: "center"});
  const box = view.canvas_view.el.getBoundingClientRect();
  return [box.left + view.frame.x_scale.compute(data["x_" + key][row]),
          box.top + view.frame.y_scale.compute(data["y_" + key][row])];
}"""


def _open(playwright, report, **context):
    browser = _launch(playwright)
    page = browser.new_page(**context)
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    return browser, page, errors


def test_the_explorer_hovers_pins_recolours_and_sorts(report, tmp_path):
    with _sync_playwright() as playwright:
        browser, page, errors = _open(playwright, report, viewport={"width": 1400, "height": 900})
        started = page.evaluate("performance.now()")
        page.wait_for_function("typeof window.sslensPin === 'function'")
        page.wait_for_function("Object.keys(Bokeh.index).length > 0")
        print(f"first render after {page.evaluate('performance.now()') - started:.0f} ms")
        points = page.evaluate("Bokeh.documents[0].get_model_by_name('explorer-points').data.item.length")
        assert points == 16  # the t-SNE sample
        # Row 0 is the first image of the study's order, so an explained one (outlined).
        x, y = page.evaluate(_POINT, ["explorer-plot-m0_o0", 0])
        page.mouse.move(x, y)
        tip = page.locator(".sslens-tip").first
        tip.wait_for(state="visible")
        assert tip.locator("img").get_attribute("src").startswith("data:image/webp;base64,")
        text = tip.inner_text()
        assert "neighbours:" in text and "invariance IoU" in text and "explained" in text
        page.mouse.click(x, y)
        panel = page.locator("div.panel")
        panel.locator("table.maps").wait_for()
        # Every model's maps of that image, side by side: a row per model, a map per explainer output.
        models = panel.locator("tbody th").all_inner_texts()
        assert models == ["simclr", "random-init"]
        headers = panel.locator("thead th").all_inner_texts()
        for kind in ("RELAX", "RELAX uncertainty", "Grad-CAM", "perceptual: color", "perceptual: shape"):
            assert kind in headers
        maps = panel.locator("tbody td img[src^='data:image/webp']")
        assert maps.count() == 2 * 5 + 2 * 5  # five maps and five neighbours per model
        # The same image is selected in every plot (one shared source).
        assert page.evaluate("Bokeh.documents[0].get_model_by_name('explorer-points').selected.indices") == [0]
        # Colour by a per-image metric: the colours change and unmeasured images are grey.
        before = page.evaluate("Bokeh.documents[0].get_model_by_name('explorer-points').data.color_m0.slice()")
        page.select_option("select.color-by", "invariance IoU")
        after = page.evaluate("Bokeh.documents[0].get_model_by_name('explorer-points').data.color_m0.slice()")
        assert after != before and after.count("#c8c8c8") == points - 2  # 2 images measured invariance
        assert "not measured" in page.locator(".legend").inner_text()
        # Sort the trade-off table by kNN top-1 (after the model and its learning principle), both ways.
        table = page.locator("table.sortable")
        header = table.locator("th button.sort").nth(2)
        values = lambda: [float(v) if v else None for v in  # noqa: E731
                          table.locator("tbody tr").evaluate_all("rows => rows.map(r => r.cells[2].dataset.sort)")]
        header.click()
        ascending = values()
        assert ascending == sorted(ascending)
        header.click()
        assert values() == sorted(ascending, reverse=True)
        # A table row's drill-down lists the images behind it; clicking one pins it.
        page.locator("button.drill").first.click()
        gallery = page.locator("div.gallery").first
        assert gallery.locator("img").count() == 2
        gallery.locator("img").first.click()
        assert page.evaluate("Bokeh.documents[0].get_model_by_name('explorer-points').selected.indices") in ([0], [1])
        # The trade-off scatter's axes follow the selects.
        page.select_option("select.axis-y", index=0)
        label = page.evaluate("Bokeh.documents[0].get_model_by_name('tradeoff-y-axis').axis_label")
        assert label == page.locator("select.axis-y option").first.inner_text()
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        assert page.evaluate("window.__pwned") is None
        assert errors == []
        browser.close()


def test_without_javascript_and_in_print_the_static_report_remains(report):
    with _sync_playwright() as playwright:
        browser, page, errors = _open(playwright, report, java_script_enabled=False)
        assert page.locator("div.interactive").first.is_hidden()
        assert page.locator("button.drill").first.is_hidden()
        figures = page.locator("figure img[src^='data:image/png']")
        assert figures.count() >= 5 and all(figures.nth(i).is_visible() for i in range(figures.count()))
        browser.close()
        browser, page, errors = _open(playwright, report)
        page.emulate_media(media="print")
        assert page.locator("div.interactive").first.is_hidden()
        assert page.locator("figure img").first.is_visible()
        assert errors == []
        browser.close()
