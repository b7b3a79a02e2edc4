"""A resumed run from the outside: `imgclf train --resume RUN key=value` and the report page's
training time (docs/RELIABILITY.md F1, F5)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from imgclf.cli import app as cli
from imgclf.config import load_config, resolve, validate
from imgclf.errors import ImgclfError
from imgclf.evaluate.report import compare_runs, write_report

import factory as fx


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run trained to completion (two epochs, a few seconds)."""
    from imgclf.workflows.training import train

    root = tmp_path_factory.mktemp("resume")
    data = fx.make_class_folder(root / "data", classes=("a", "b", "c"), per_class=10, size=(40, 40))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={root / 'runs'}",
            f"data.manifest={root / 'm'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 2, lr: 0.01}]",
            "tracking.mlflow=false",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [*map(str, args)], terminal_width=200)


def test_resume_overrides_apply_on_top_of_the_runs_own_config(finished_run, monkeypatch):
    """RELIABILITY F5: `train --resume RUN key=value` without the config file compares the run's
    own config.yaml plus the override with the saved one: only the overridden key differs."""
    result = invoke("train", "--resume", finished_run, "train.batch_size=7", "--no-progress")
    assert isinstance(result.exception, ImgclfError), result.output
    message = str(result.exception)
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    differences = [line for line in message.splitlines() if line.startswith("  ")]
    assert differences == [f"  train.batch_size: {saved['train']['batch_size']} → 7"], message
    assert "--force" in message

    # With --force the run continues under the saved config plus the override, nothing else.
    import imgclf.workflows.training as run_module

    seen = {}

    def fake_train(cfg, *, resume, force, **_):
        seen["cfg"], seen["force"] = cfg, force
        return resume

    monkeypatch.setattr(run_module, "train", fake_train)
    result = invoke("train", "--resume", finished_run, "train.batch_size=7", "--force")
    assert result.exit_code == 0, result.output
    saved["train"]["batch_size"] = 7
    assert seen["force"] and resolve(seen["cfg"]) == resolve(validate(saved))


def test_resume_with_an_override_equal_to_the_saved_value_resumes(finished_run, tmp_path):
    """RELIABILITY F5: an override that changes nothing is no difference (today it listed a
    dozen differences from the built-in defaults and refused)."""
    run = tmp_path / finished_run.name
    _copy_run(finished_run, run)
    result = invoke("train", "--resume", run, "seed=0", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_report_shows_the_real_training_time_of_a_resumed_run(finished_run, tmp_path):
    """RELIABILITY F1: a run resumed after its last checkpoint (killed while finishing) used to
    record train_seconds for the last process only (0.0 s). The time now adds up over resumes
    (it travels in the checkpoint); run folders written before that still show the epochs'
    time from metrics.csv on the report and comparison pages, never 0.0 s."""
    from imgclf.workflows.training import train

    run = tmp_path / finished_run.name
    _copy_run(finished_run, run)
    train(None, resume=run, progress=False, log=lambda *_: None)
    summary = json.loads((run / "summary.json").read_text())
    epochs = sum(
        float(row.split(",")[-2]) for row in (run / "metrics.csv").read_text().splitlines()[1:]
    )
    assert summary["train_seconds"] >= epochs > 0  # the whole fit, over both processes
    assert _train_time(write_report(run).read_text()) == f"{summary['train_seconds']:.1f}"

    # A folder from before: summary.json with the last process's time only.
    old = tmp_path / "before"
    _copy_run(run, old)
    (old / "summary.json").write_text(json.dumps({**summary, "train_seconds": 0.0}))
    # epochs of a known length: a warm machine trains this tiny run's epochs in under 0.05 s,
    # which the page would rightly show as 0.0
    lines = (old / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("seconds")
    rows = [line.split(",") for line in lines[1:]]
    for row, sec in zip(rows, (1.5, 2.0), strict=True):
        row[col] = str(sec)
    (old / "metrics.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    epochs = 3.5
    shown = _train_time(write_report(old).read_text())
    assert shown == f"{epochs:.1f}" and shown != "0.0"
    compare = compare_runs([finished_run, old], tmp_path / "cmp.html").read_text()
    assert f'<td class="n">{epochs:.1f}</td></tr>' in compare

    # A run trained in one go keeps its own (larger) whole-fit time, without a note.
    from imgclf.evaluate.report import training_time

    assert training_time({"train_seconds": 9.5}, [{"seconds": 4.0}, {"seconds": 5.0}]) == {
        "seconds": 9.5,
        "note": None,
    }
    assert training_time({}, []) == {"seconds": None, "note": None}


def _train_time(html: str) -> str:
    match = re.search(r"<dt>time</dt><dd[^>]*>([^<]*) s", html)
    assert match, "no training time on the page"
    return match.group(1)


def _copy_run(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "evaluations", "report.html"))
