"""The real `imgclf` command in a subprocess, as a user types it."""

import json
import os
import subprocess
import sys

from imgclf.data.manifest import read_manifest

import factory as fx


def imgclf(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "imgclf", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_scan_then_split(tmp_path):
    data = fx.make_class_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=10)
    r = imgclf("scan", data, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "20 usable, 0 skipped" in r.stdout
    manifest_dir = tmp_path / "manifests" / "pets"
    report = json.loads((manifest_dir / "scan_report.json").read_text())
    assert report["classes"] == {"cat": 10, "dog": 10}
    r = imgclf("split", manifest_dir, "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = read_manifest(manifest_dir)
    assert m.has_split
    assert m.report["split"]["per_class"]["cat"] == {"train": 7, "val": 2, "test": 1}
    r = imgclf("split", manifest_dir, "--train", "0.9", cwd=tmp_path)
    assert r.returncode == 2 and "sum" in r.stderr


def test_unusable_data_exits_non_zero_naming_the_problem(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    fx.write_jpeg(data / "stray.jpg")
    (data / "empty").mkdir()
    r = imgclf("scan", data, "-o", tmp_path / "m", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    assert "stray.jpg" in r.stdout and "'empty' holds no image files" in r.stdout
    assert "not usable" in r.stderr
    assert (tmp_path / "m" / "manifest.csv").is_file(), "the report is still written"


def test_scan_overrides_and_config_show(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=(12, 12))
    r = imgclf("scan", data, "data.scan.min_side=16", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "too small" in r.stdout
    r = imgclf("config", "show", "data.image_size=64", cwd=tmp_path)
    assert r.returncode == 0 and "image_size: 64" in r.stdout
    r = imgclf("config", "show", "data.imagesize=64", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean data.image_size?" in r.stderr


def test_demo_scans_and_splits_the_digits(tmp_path):
    r = imgclf("demo", "--no-train", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "manifests" / "digits")
    assert len(m.ok_entries) == 1797 and m.has_split
    assert m.labels.names == tuple(f"digit_{i}" for i in range(10))
    counts = m.report["split"]["per_class"]["digit_0"]
    assert sum(counts.values()) == 178 and counts["train"] == round(178 * 0.65)


def test_models_lists_scratch_presets_and_timm(tmp_path):
    r = imgclf("models", "*lite*", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    assert "tf_efficientnet_lite0" in names and "resnet50" not in names
    r = imgclf("models", cwd=tmp_path)
    assert "scratch_cnn" in r.stdout.split() and "resnet50" in r.stdout.split()


def test_train_and_lr_find_from_the_command_line(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=8, size=(32, 32))
    common = [
        f"data.root={data}",
        "model.name=scratch_small",
        "data.image_size=32",
        "train.batch_size=4",
    ]
    r = imgclf("lr-find", *common, "--steps", "30", "-o", tmp_path / "lr.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "suggested lr:" in r.stdout and (tmp_path / "lr.png").stat().st_size > 1000
    r = imgclf("train", *common, "train.stages=[{epochs: 1}]", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").is_file()]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "runs" / "mlflow.db").is_file(), "mirrored to the default MLflow store"
    r = imgclf("train", *common, "train.stages=[{epoks: 1}]", cwd=tmp_path)
    assert r.returncode == 2 and "epoks" in r.stderr


def test_models_marks_the_names_with_packaged_weights(tmp_path):
    r = imgclf("models", "lite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[:-1]}
    assert rows["efficientnet_lite0"] == ["packaged"] and rows["tf_efficientnet_lite2"] == [
        "packaged"
    ]
    assert rows["efficientnet_lite3"] == [] and rows["coat_lite_mini"] == []
    assert "6 with packaged weights" in r.stdout
    r = imgclf("models", "--packaged", cwd=tmp_path)
    assert sorted(r.stdout.split()[:12:2]) == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]


def test_version_and_config_descriptions(tmp_path):
    from imgclf import __version__

    r = imgclf("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"imgclf {__version__}"
    r = imgclf("config", "show", "--describe", "data.image_size=64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert rows["data.image_size"].split()[1] == "64"
    assert "# `imgclf models` lists the choices" in rows["model.name"]
    assert "train.stages[0].lr" in rows and "train.batch_size" in rows
