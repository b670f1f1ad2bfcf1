"""Headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run): the run report renders with its
figures, and the web page uploads an image and shows the probabilities, the alert banner and the Grad-CAM overlay.

Skipped only where the system browser is absent. Set MELANOMA_SCREENSHOTS=DIR to keep the screenshots.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import CLASSES, lesion_image, save_image, train_tiny_run, uvicorn_server

from melanoma.runs.run import Run

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium/chromium-driver absent")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1600", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("browser"), per_class=30, epochs=2, bootstrap=100)[1]


def _screenshot(browser, name: str) -> None:
    folder = os.environ.get("MELANOMA_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


def test_report_renders_with_its_figures(browser, run_dir):
    browser.get((run_dir / "report.html").as_uri())
    headings = [h.text for h in browser.find_elements("tag name", "h2")]
    assert any("Results on Test" in h for h in headings) and "Training curves" in headings
    images = browser.find_elements("tag name", "img")
    assert len(images) >= 3
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
    wanted = ("Training curves", "Confusion matrix (Test, all images)", "ROC curves, one vs rest (Test, all images)")
    figures = [img for img in images if img.get_attribute("alt") in wanted]
    assert len(figures) == 3
    _screenshot(browser, "report.png")


def test_page_uploads_an_image_and_shows_the_result(browser, run_dir, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from melanoma.deploy.serve import create_app

    with uvicorn_server(create_app(Run.load(run_dir))) as base:
        browser.get(base + "/")
        assert "not a medical device" in browser.find_element("id", "notice").text
        image = save_image(tmp_path / "lesion.jpg", lesion_image(11, 180))
        browser.find_element("id", "file").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "banner").get_attribute("class"))
        banner = browser.find_element("id", "banner")
        assert banner.get_attribute("class") in ("alert", "clear")
        assert "threshold" in banner.text
        rows = browser.find_elements("css selector", "#bars .row")
        assert sorted(r.find_element("class name", "name").text for r in rows) == sorted(CLASSES)
        overlay = browser.find_element("id", "gradcam")
        assert browser.execute_script("return arguments[0].naturalWidth", overlay) > 0
        _screenshot(browser, "serve_page.png")


def test_page_says_an_out_of_distribution_image_is_not_a_lesion_image(browser, run_dir, tmp_path):
    import numpy as np
    from selenium.webdriver.support.ui import WebDriverWait

    from melanoma.deploy.serve import create_app

    with uvicorn_server(create_app(Run.load(run_dir))) as base:
        browser.get(base + "/")
        image = save_image(tmp_path / "blank.png", np.full((180, 180, 3), 255, dtype=np.uint8))
        browser.find_element("id", "file").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "banner").get_attribute("class"))
        banner = browser.find_element("id", "banner")
        assert banner.get_attribute("class") == "ood"
        assert "does not look like a dermoscopic lesion image" in banner.text
        assert "ALERT" not in banner.text and not browser.find_elements("css selector", "#bars .row")
        assert not browser.find_elements("id", "gradcam")
        _screenshot(browser, "serve_page_ood.png")
