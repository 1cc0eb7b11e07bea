"""Size, time to write and time to first render of the interactive report.

A synthetic study of ``--points`` t-SNE points per view (4 models × pooled and projection), with
thumbnails of the shapes world's test images, and ``--explained`` of them explained with four
maps per model (importance, uncertainty, Grad-CAM, a perceptual map: smooth random fields, which
compress like real maps). Optionally a finished study's ``report.html`` (``--report``) is opened
too. Time to first render: from navigation start to the first Bokeh view existing, in headless
Chromium (Debian's ``chromium``), the median of ``--repeats`` loads.

    python benchmarks/report_size.py --points 2000 --explained 256 --report sslens-demo/report.html
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sslens.data.base import load_split
from sslens.report.explorer import EmbeddingView, ExplorerData, embedding_explorer, tradeoff_scatter
from sslens.report.html import Section, Table, render_html

MODELS = ("simclr", "moco", "swav", "random-init")
MAPS = ("RELAX", "RELAX uncertainty", "Grad-CAM", "perceptual: color")


def synthetic_page(points: int, explained: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    data = load_split("synthetic", "test", data_dir=None, image_size=32, options={"num_images": points}, device="cpu")
    thumbnails = data.images.numpy()
    labels = [data.class_names[int(label)] for label in data.labels]
    views = [EmbeddingView(m, o, rng.normal(size=(points, 2)) * 20, rng.integers(0, points, (points, 5)))
             for m in MODELS for o in ("pooled", "projection")]
    smooth = lambda: torch.nn.functional.interpolate(  # noqa: E731
        torch.from_numpy(rng.random((1, 1, 6, 6))), size=(32, 32), mode="bicubic", align_corners=False)[0, 0].numpy()
    maps = {str(i): {m: {kind: smooth() for kind in MAPS} for m in MODELS} for i in range(explained)}
    metrics = {name: {m: np.where(np.arange(points) < explained, rng.random(points), np.nan) for m in MODELS}
               for name in ("invariance IoU", "deletion AUC − random (RELAX)", "pointing game (RELAX)", "uncertainty (RELAX)")}
    explorer = embedding_explorer(ExplorerData([str(i) for i in range(points)], labels, thumbnails, views, metrics, maps))
    estimates = {name: [{"mean": float(v), "ci_low": float(v) - 0.05, "ci_high": float(v) + 0.05} for v in rng.random(4)]
                 for name in ("kNN top-1", "invariance IoU", "deletion gap")}
    scatter = tradeoff_scatter(list(MODELS), estimates, x="kNN top-1", y="invariance IoU")
    table = Table(["model", *estimates], [[m, *[estimates[k][i] for k in estimates]] for i, m in enumerate(MODELS)],
                  sortable=True)
    return render_html(title="synthetic", sections=[Section("Explorer", interactive=[explorer]),
                                                    Section("Trade-off", tables=[table], interactive=[scatter])],
                       config={}, environment={})


def first_render_ms(path: Path, repeats: int) -> float | None:
    browser_path = shutil.which("chromium")
    if browser_path is None:
        return None
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(path.resolve().as_uri())
            page.wait_for_function("window.Bokeh && Object.keys(Bokeh.index).length > 0", timeout=120_000)
            times.append(page.evaluate("performance.now()"))
            page.close()
        browser.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--explained", type=int, nargs="+", default=[256])
    parser.add_argument("--report", type=Path, nargs="*", default=[], help="finished reports to open too")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| report | size (MB) | time to write (s) | first render (ms, median) |\n|---|---|---|---|")
    folder = Path(tempfile.mkdtemp())
    for explained in args.explained:
        started = time.perf_counter()
        page = synthetic_page(args.points, explained)
        path = folder / f"synthetic-{explained}.html"
        path.write_text(page, encoding="utf-8")
        seconds = time.perf_counter() - started
        render = first_render_ms(path, args.repeats)
        print(f"| synthetic: {args.points} points × 8 views, {explained} explained × 4 maps × 4 models | "
              f"{path.stat().st_size / 1e6:.2f} | {seconds:.1f} | {render if render is None else round(render)} |")
    for report in args.report:
        render = first_render_ms(report, args.repeats)
        print(f"| {report} | {report.stat().st_size / 1e6:.2f} | (see the study's log) | "
              f"{render if render is None else round(render)} |")


if __name__ == "__main__":
    main()
