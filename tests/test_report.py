"""`imgclf report`: self-contained pages for real tiny runs, the comparison page, and a run that
cannot be evaluated."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import load_config
from imgclf.evaluate.report import compare_runs, config_differences, flatten, write_report
from imgclf.workflows.training import train

import factory as fx

# The third name needs escaping in HTML: autoescape must turn it into text.
CLASSES = ("cat", "dog", "r&b <i>x")


def tiny_run(tmp, data, width: int, epochs: int):
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / 'manifest'}",
            "model.name=scratch_cnn",
            "model.pretrained=none",
            "model.scratch.blocks=2",
            f"model.scratch.width={width}",
            "data.image_size=32",
            "train.batch_size=8",
            f"train.stages=[{{epochs: {epochs}, lr: 0.01}}]",
            "tracking.mlflow=false",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reportruns")
    return fx.make_class_folder(tmp / "data", classes=CLASSES, per_class=10, size=(40, 40))


@pytest.fixture(scope="module")
def run_a(data):
    return tiny_run(data.parent, data, 8, 2)


@pytest.fixture(scope="module")
def run_b(data):
    return tiny_run(data.parent, data, 12, 1)


def assert_self_contained(html: str):
    assert "http://" not in html and "https://" not in html
    assert 'src="/' not in html and "<script" not in html
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources, "the page has images"
    for s in sources:
        assert s.startswith("data:") or s.endswith(".html"), s


def test_report_evaluates_first_and_inlines_everything(run_a):
    run = run_a
    path = write_report(run)
    assert path == run / "report.html"
    assert (run / "evaluations" / "test" / "metrics.json").is_file(), "evaluated on test first"
    html = path.read_text()
    assert_self_contained(html)
    assert not re.search(r'href="[^"]*\.html"', html), "a single report links nowhere"
    assert run.name in html and "scratch_cnn" in html
    for img_id in ("curves", "confusion", "confusion-clustered", "reliability", "per-class-f1"):
        assert re.search(rf'<img id="{img_id}" class="plot" src="data:image/png;base64,', html)
    scored = json.loads((run / "evaluations" / "test" / "metrics.json").read_text())["images"]
    thumbs = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,', html)
    assert len(thumbs) == min(12, scored["evaluated"]) > 0
    assert "r&amp;b &lt;i&gt;x" in html and "<i>x" not in html
    assert "model:\n  name: scratch_cnn" in html, "the resolved config is on the page"


def test_comparison_lists_config_differences(run_a, run_b, tmp_path):
    a, b = run_a, run_b
    result = CliRunner().invoke(app, ["report", str(a), str(b), "-o", str(tmp_path / "c.html")])
    assert result.exit_code == 0, result.output
    assert (a / "report.html").is_file() and (b / "report.html").is_file()
    html = (tmp_path / "c.html").read_text()
    assert_self_contained(html)
    rows = dict(re.findall(r"<tr><td>([\w.\[\]]+)</td>(.*?)</tr>", html, re.S))
    assert re.findall(r"<td>([^<]*)</td>", rows["model.scratch.width"]) == ["8", "12"]
    assert re.findall(r"<td>([^<]*)</td>", rows["train.stages[0].epochs"]) == ["2", "1"]
    assert "data.root" not in rows, "equal keys are not listed"
    assert f">{a.name}</a>" in html and f">{b.name}</a>" in html
    assert 'img id="curves"' in html and "F1 (baseline)" in html


def test_flatten_and_config_differences():
    one = {"model": {"name": "x", "hidden": [256]}, "train": {"stages": [{"lr": 0.1}]}}
    two = {"model": {"name": "x", "hidden": [128]}, "train": {"stages": [{"lr": 0.1}, {"lr": 1}]}}
    assert flatten(one) == {
        "model.name": "x",
        "model.hidden": [256],
        "train.stages.length": 1,
        "train.stages[0].lr": 0.1,
    }
    diff = {d["key"]: d["values"] for d in config_differences([one, two])}
    assert diff == {
        "model.hidden": ["[256]", "[128]"],
        "train.stages.length": ["1", "2"],
        "train.stages[1].lr": ["—", "1"],
    }


def test_report_of_a_run_without_weights_still_renders(run_a, tmp_path):
    broken = tmp_path / "runs" / run_a.name
    shutil.copytree(run_a, broken, ignore=shutil.ignore_patterns("evaluations", "report.html"))
    (broken / "model.safetensors").unlink()
    html = write_report(broken).read_text()
    assert "no evaluation: " in html and "model.safetensors" in html
    assert 'img id="curves"' in html
    assert_self_contained(html)
    out = compare_runs([run_a, broken], tmp_path / "cmp.html").read_text()
    assert "model.safetensors" in out
