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
        "random_init": False,
        "explainers": {"relax": {"num_masks": 16}},
        "experiments": ["quality", "invariance", "faithfulness", "tradeoff"],
        "samples": {"invariance": 2, "faithfulness": 2},
        "settings": {"quality": {"linear": False, "k": 5}, "faithfulness": {"steps": 4}},
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
