"""A real run's report opened from disk in headless Chromium: the curves, the confusion matrix and
the top-loss thumbnails render, and the console stays clean. Screenshot: test-artifacts/report.png.
"""

import json
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from imgclf.config import load_config
from imgclf.evaluate.report import write_report
from imgclf.workflows.training import train

import factory as fx

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture
def report(tmp_path):
    data = fx.make_class_folder(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=10)
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp_path / 'runs'}",
            f"data.manifest={tmp_path / 'manifest'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 2, lr: 0.01}]",
            "tracking.mlflow=false",
        ],
    )
    return write_report(train(cfg, progress=False, log=lambda *_: None))


@pytest.fixture
def chromium(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def natural_widths(driver, css: str) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(i => i.naturalWidth)", css
    )


def test_report_renders_in_chromium_from_disk(report, chromium):
    chromium.get(report.resolve().as_uri())
    assert chromium.execute_script("return document.readyState") == "complete"
    assert chromium.title.endswith("imgclf report")
    for css in ("img#curves", "img#confusion", "img#confusion-clustered", "img#per-class-f1"):
        widths = natural_widths(chromium, css)
        assert len(widths) == 1 and widths[0] > 0, css
    thumbs = natural_widths(chromium, "img.thumb")
    assert thumbs and all(w > 0 for w in thumbs), thumbs
    every = natural_widths(chromium, "img")
    assert all(w > 0 for w in every), "an image failed to decode"
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(1280, min(height + 40, 12000))
    ARTIFACTS.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(ARTIFACTS / "report.png"))
    severe = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


@pytest.fixture
def fit_report(tmp_path):
    from imgclf.workflows.fit import FitOptions, fit

    data = fx.make_class_folder(tmp_path / "photos", classes=("ant", "bee"), per_class=12)
    opts = FitOptions(
        data=data,
        budget=30,
        quality="fast",
        models=["scratch_small"],
        runs_dir=tmp_path / "runs",
        fits_dir=tmp_path / "fits",
        progress=False,
        mlflow=False,
    )
    return fit(opts, log=lambda *_: None).folder / "report.html"


def test_the_fit_report_renders_in_chromium_from_disk(fit_report, chromium):
    """`imgclf fit`'s page: the chosen model with its test metrics, the choices, every
    candidate, and each run's learning curves decode. Screenshot: test-artifacts/fit.png."""
    chromium.get(fit_report.resolve().as_uri())
    assert chromium.execute_script("return document.readyState") == "complete"
    assert chromium.title.startswith("fit ")
    text = chromium.find_element("id", "chosen").text
    assert "test accuracy" in text and "why" in text
    assert chromium.find_element("id", "test-accuracy").text not in ("", "—")
    assert len(chromium.find_elements("css selector", "#decisions li")) >= 4
    body = chromium.find_element("tag name", "body").text
    assert "center — 0% of the training images are longer than 1.2:1" in body, body
    assert len(chromium.find_elements("css selector", "#candidates tr")) == 2  # header + 1
    record = json.loads((fit_report.parent / "fit.json").read_text())
    runs = {
        r["run"]
        for c in record["candidates"]
        for r in [c["screen"], c["finetune"], *c.get("rounds", [])]
        if (r or {}).get("run")
    }
    curves = natural_widths(chromium, "#curves img")
    assert runs and len(curves) == len(runs) and all(w > 0 for w in curves), curves
    ARTIFACTS.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(ARTIFACTS / "fit.png"))
    severe = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
