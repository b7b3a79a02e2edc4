"""The upload page in a real browser: headless Chromium loads / from a real uvicorn, uploads an
image through the file input and reads the top-1 label the page shows."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from imgclf.serve.backend import OnnxBackend
from test_serve import REPO, running, shared_model

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=900,1000",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(run folder, data folder, base URL) of a real server on the run's ONNX export."""
    root = shared_model(tmp_path_factory)
    run = (root / "run").resolve()
    with running(OnnxBackend(run / "export")) as url:
        yield run, root / "data", url


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def upload_through_page(driver, path: Path) -> str:
    """Send a file to the page's file input; wait for the page to finish; return its state."""
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    wait = WebDriverWait(driver, 15)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "busy")
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_upload_page_shows_the_same_top1_as_the_api_and_the_predictor(served, browser, tmp_path):
    from imgclf.predict.predictor import Predictor

    run, data, url = served
    image = sorted((data / "b").glob("*"))[3]
    browser.get(f"{url}/")
    WebDriverWait(browser, 15).until(
        lambda d: "classes" in d.find_element(By.ID, "model-info").text
    )
    assert upload_through_page(browser, image) == "done"
    shown = browser.find_element(By.ID, "top1").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    api = httpx.post(f"{url}/predict", files={"file": (image.name, image.read_bytes())}).json()
    predictor = Predictor.from_run(run)
    expected = predictor.labels[int(predictor.predict_paths([image]).probs[0].argmax())]
    assert shown == api["label"] == expected
    assert [b.get_attribute("data-label") for b in bars] == [t["label"] for t in api["top_k"]]
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "serve.png"))
    browser.get(f"{url}/docs")  # the self-hosted API page works offline too
    WebDriverWait(browser, 15).until(lambda d: "POST /predict/batch" in d.page_source)
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems  # no console errors, no blocked (external) resources
    browser.back()

    # A non-image with an image name: the page shows the server's 415, not a result.
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all")
    assert upload_through_page(browser, fake) == "error"
    assert "415 unsupported media type" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "result").is_displayed()
