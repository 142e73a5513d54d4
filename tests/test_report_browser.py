"""report.html in a real browser: headless Chromium opens it, every figure decodes, a screenshot is taken.

Needs Debian's chromium (/usr/bin/chromium) and the `playwright` package (which drives the
installed browser; it downloads nothing). CI installs both (see .ci/run); elsewhere the test is
skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from selfinterp import config
from selfinterp.pipeline import Run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which
# this machine's closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    cfg = config.build("simulated", overrides=dict(n_instilled=10, n_native=4, n_train=20, n_eval_trials=40,
                                                   n_native_trials=40, n_reports=3))
    root = tmp_path_factory.mktemp("run")
    Run(cfg, root, progress=False).execute()
    return root / "report.html"


def test_report_renders_every_figure_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            assert len(images) >= 2, images
            assert all(complete and width > 0 for _, complete, width in images), images
            assert "Self-report parsing" in page.inner_text("body")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("SELFINTERP_SCREENSHOT"):  # keep a copy to look at
                shutil.copy(shot, os.environ["SELFINTERP_SCREENSHOT"])
        finally:
            browser.close()
    # A full-page screenshot of the report is larger than the viewport and far from blank.
    import numpy as np
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.height > 900
    assert len(np.unique(np.asarray(img.resize((64, 64))))) > 10
