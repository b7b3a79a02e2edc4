"""A split saved in a manifest is kept by every later step (issue 14): re-scans and training
with `data.root` on the same folder re-apply it, a config that contradicts it is an error naming
both, two sources never share a manifest folder, and `scan --labels` fixes a tree's label order.
Also `imgclf train FOLDER --model … --epochs …`."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from imgclf.config import ScanConfig, SplitConfig, load_config
from imgclf.data.manifest import read_manifest
from imgclf.data.prepare import prepare, rescan, split_and_save
from imgclf.errors import ImgclfError

import factory as fx

SCAN = ScanConfig(workers=1)
SAVED = SplitConfig(train=0.6, val=0.2, test=0.2, seed=0)  # 6/2/2 per class of 10
MANIFEST = Path("manifests/shapes")  # tests run in tmp_path (conftest)
TINY = [*fx.TINY_MODEL, "tracking.mlflow=false", "train.stages=[{epochs: 1}]"]


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(tmp_path / "shapes", ("a", "b", "c"), per_class=10, size=(40, 40))


def split_counts(manifest) -> Counter:
    return Counter(e.split for e in manifest.ok_entries)


def scanned_and_split(data) -> None:
    rescan(data, MANIFEST, SCAN, progress=False)
    split_and_save(MANIFEST, SAVED)


def test_training_on_the_same_folder_keeps_the_saved_split(data, tmp_path):
    scanned_and_split(data)
    from imgclf.workflows.training import train

    cfg = load_config(None, [f"data.root={data}", f"runs_dir={tmp_path / 'runs'}", *TINY])
    run = train(cfg, progress=False, log=lambda *_: None)
    split = json.loads((run / "data.json").read_text())["split"]
    # The config's defaults (0.65 / 0.2 / 0.15) would give 7 / 2 / 1 per class.
    assert split["a"] == {"train": 6, "val": 2, "test": 2}
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["split"]
    assert (recorded["train"], recorded["test"]) == (0.6, 0.2), "config.yaml names the split used"
    assert split_counts(read_manifest(MANIFEST)) == {"train": 18, "val": 6, "test": 6}


def test_a_rescan_keeps_the_saved_split(data):
    scanned_and_split(data)
    before = {e.path: e.split for e in read_manifest(MANIFEST).entries}
    manifest, notes = rescan(data, MANIFEST, SCAN, progress=False)
    assert {e.path: e.split for e in manifest.entries} == before
    assert any("kept (train=0.6 val=0.2 test=0.2 seed=0)" in n for n in notes)
    assert read_manifest(MANIFEST).report["split"]["fractions"]["train"] == 0.6


def test_a_config_that_contradicts_the_saved_split_is_an_error_naming_both(data):
    scanned_and_split(data)
    cfg = load_config(None, [f"data.root={data}", "data.split={train: 0.65, val: 0.2, test: 0.15}"])
    with pytest.raises(ImgclfError) as e:
        prepare(cfg.data, progress=False)
    msg = str(e.value)
    assert "train=0.6 val=0.2 test=0.2 seed=0" in msg and "train=0.65 val=0.2 test=0.15" in msg
    assert "data.split.resplit=true" in msg and "data.manifest=" in msg
    assert split_counts(read_manifest(MANIFEST))["train"] == 18, "nothing was re-split"
    seed = load_config(None, [f"data.manifest={MANIFEST}", "data.split.seed=1"])
    with pytest.raises(ImgclfError, match=r"data\.split\.seed"):
        prepare(seed.data, progress=False)


def test_keys_left_at_their_defaults_never_contradict_a_saved_split(data):
    scanned_and_split(data)
    # An indexed override used to fill in every default, making them all look set.
    for extra in ([], ["train.stages.0.lr=0.1"], ["data.split.train=0.6", "data.split.val=0.2",
                                                  "data.split.test=0.2"]):  # fmt: skip
        cfg = load_config(None, [f"data.root={data}", *extra])
        manifest, _ = prepare(cfg.data, progress=False)
        assert split_counts(manifest)["train"] == 18 and cfg.data.split.train == 0.6


def test_resplit_replaces_the_saved_split(data):
    scanned_and_split(data)
    cfg = load_config(None, [f"data.root={data}", "data.split.resplit=true"])  # default fractions
    manifest, _ = prepare(cfg.data, progress=False)
    assert split_counts(manifest) == {"train": 21, "val": 6, "test": 3}
    assert read_manifest(MANIFEST).report["split"]["fractions"]["train"] == 0.65
    again = load_config(None, [f"data.root={data}"])  # the new split is now the saved one
    assert split_counts(prepare(again.data, progress=False)[0])["train"] == 21


def test_the_split_command_refuses_other_fractions_without_force(data):
    scanned_and_split(data)
    split_and_save(MANIFEST, SAVED)  # the same settings: kept, no error
    with pytest.raises(ImgclfError, match=r"already split \(train=0.6 .*--force"):
        split_and_save(MANIFEST, SplitConfig())
    manifest, _ = split_and_save(MANIFEST, SplitConfig(), force=True)
    assert split_counts(manifest)["train"] == 21


def test_a_folder_and_a_csv_of_the_same_name_never_share_a_manifest(tmp_path):
    folder = fx.make_class_folder(tmp_path / "data" / "nat11", ("a", "b"), per_class=3)
    table = tmp_path / "data" / "nat11.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([f"nat11/{c}/{c}_{i}.png", c] for c in "ab" for i in range(3))
    rescan(folder, Path("manifests/nat11"), SCAN, progress=False)
    with pytest.raises(ImgclfError) as e:
        rescan(table, Path("manifests/nat11"), SCAN, progress=False)
    msg = str(e.value)
    assert str(folder) in msg and str(table) in msg and "manifests/nat11-csv" in msg
    assert read_manifest("manifests/nat11").source == "folder", "the folder's manifest is intact"
    with pytest.raises(ImgclfError, match=r"data\.manifest=manifests/nat11-csv"):
        prepare(load_config(None, [f"data.root={table}"]).data, progress=False)
    # Named on purpose (-o / data.manifest): replaced, and said so.
    manifest, notes = rescan(table, Path("manifests/nat11"), SCAN, progress=False, named=True)
    assert manifest.source == "csv" and any("replaced the manifest of" in n for n in notes)


def test_labels_file_fixes_the_order_of_a_class_folder_tree(data):
    order = ["c", "a", "b"]
    m, _ = rescan(data, MANIFEST, SCAN, labels=order, progress=False)
    assert m.usable and m.labels.names == ("c", "a", "b")
    again, notes = rescan(data, MANIFEST, SCAN, progress=False)  # train's re-scan: no --labels
    assert again.labels.names == ("c", "a", "b") and any("label order kept" in n for n in notes)
    bad, _ = scan_labels(data, ["c", "a"], "other")
    assert any("missing from the label list: ['b']" in e for e in bad.errors)
    bad, _ = scan_labels(data, ["c", "a", "b", "zebra"], "other2")
    assert any("no class folder" in e and "'zebra'" in e for e in bad.errors)
    with pytest.raises(ImgclfError, match="more than once"):
        scan_labels(data, ["a", "a", "b", "c"], "other3")


def scan_labels(data, labels, out):
    return rescan(data, Path(out), SCAN, labels=labels, progress=False, named=True)


def imgclf(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "imgclf", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_scan_labels_option_on_a_folder(data, tmp_path):
    (tmp_path / "labels.txt").write_text("c\nb\na\n")
    r = imgclf("scan", data, "--labels", "labels.txt", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / MANIFEST).labels.names == ("c", "b", "a")
    (tmp_path / "labels.txt").write_text("c\nb\n")
    r = imgclf("scan", data, "--labels", "labels.txt", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "missing from the label list: ['a']" in r.stdout


def test_train_a_folder_with_shortcuts(data, tmp_path):
    r = imgclf("train", data, "--model", "efficientnet_lite0", "--epochs", "3",
               "--image-size", "32", "train.batch_size=8", "tracking.mlflow=false",
               "--no-progress", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (tmp_path / "runs").iterdir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "efficientnet_lite0" and cfg["data"]["image_size"] == 32
    assert cfg["data"]["root"] == str(data) and cfg["train"]["stages"][0]["epochs"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    with open(run / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_epochs_shortcut_refuses_a_config_of_several_stages(tmp_path):
    from typer.testing import CliRunner

    from imgclf.cli import app

    two = "train.stages=[{epochs: 1}, {epochs: 2}]"
    result = CliRunner().invoke(app, ["train", str(tmp_path), two, "--epochs", "3"])
    assert isinstance(result.exception, ImgclfError)
    assert "train.stages.N.epochs" in str(result.exception)
