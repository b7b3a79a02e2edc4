"""runs/layout.py: the run folder's names and its one reader, with one error policy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.errors import ImgclfError
from imgclf.runs.layout import (
    DATA_JSON,
    MODEL_JSON,
    SUMMARY_JSON,
    RunFileError,
    RunFolder,
    read_metrics,
)


def test_missing_and_corrupt_files_name_the_file_and_the_fix(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(RunFileError, match=f"has no {SUMMARY_JSON}: is it a run folder") as e:
        run.summary()
    assert e.value.missing and isinstance(e.value, ImgclfError)
    (tmp_path / MODEL_JSON).write_text('{"format": 1, "ki')
    with pytest.raises(RunFileError, match=f"cannot read .*{MODEL_JSON}") as e:
        run.model_spec()
    assert not e.value.missing
    (tmp_path / SUMMARY_JSON).write_text("[1, 2]")
    with pytest.raises(RunFileError, match="must hold a JSON object"):
        run.summary()
    (tmp_path / SUMMARY_JSON).write_bytes(b'{"a": "\xff"}')
    with pytest.raises(RunFileError, match="cannot read"):
        run.summary()
    (tmp_path / "config.yaml").write_text("a: [1\n")
    with pytest.raises(RunFileError, match="not valid YAML"):
        run.config()


def test_kind_and_metrics(tmp_path):
    run = RunFolder(tmp_path)
    assert run.kind == "single"  # a training run before model.json exists
    (tmp_path / SUMMARY_JSON).write_text(json.dumps({"kind": "two_stage"}))
    assert run.kind == "two_stage"
    (tmp_path / MODEL_JSON).write_text(json.dumps({"kind": "ensemble"}))
    assert run.kind == "ensemble" and run.definition_file() == tmp_path / "ensemble.json"
    (tmp_path / MODEL_JSON).write_text(json.dumps({"kind": "forest"}))
    with pytest.raises(RunFileError, match="unknown kind 'forest'"):
        _ = run.kind
    assert run.metrics() == [] == read_metrics(tmp_path / "none.csv")
    (tmp_path / "metrics.csv").write_text("epoch,val_loss\n1,0.5\n2,\n")
    rows = run.metrics()
    assert rows[0] == {"epoch": 1.0, "val_loss": 0.5} and rows[1]["val_loss"] != rows[1]["val_loss"]


def test_manifest_dir_one_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    folder = RunFolder(run)
    with pytest.raises(RunFileError, match=f"{run} has no {DATA_JSON}"):
        folder.manifest_dir()
    (run / DATA_JSON).write_text(json.dumps({"data_hash": "x"}))
    with pytest.raises(RunFileError, match=r"names no manifest.*--data FOLDER"):
        folder.manifest_dir()
    (run / DATA_JSON).write_text(json.dumps({"manifest": "m"}))
    with pytest.raises(RunFileError, match=r"the manifest m named in .* is gone; re-create it"):
        folder.manifest_dir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")
    assert folder.manifest_dir() == Path("m")  # from the working directory
    monkeypatch.chdir(run)
    assert folder.manifest_dir() == run.resolve().parent.parent / "m"  # beside the runs folder


def test_layout_and_leaderboard_import_no_torch():
    code = (
        "import sys, imgclf.runs.layout, imgclf.runs.leaderboard\n"
        "print([m for m in ('torch', 'timm', 'safetensors') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
