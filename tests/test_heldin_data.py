"""benchmarks/heldin_data.py's class-folder writing on a generated tree (no apt, no network), and
benchmarks/fit_heldin.py's linear probe on a tiny manifest and its reading of `imgclf fit`."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import factory as fx

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # fit_heldin imports heldin_data by this name
    spec.loader.exec_module(module)
    return module


hd = _load("heldin_data")
fh = _load("fit_heldin")


def _package(root: Path) -> Path:
    """A fake usr/share/openclipart/png with two classes and the cases the writer handles."""
    png = root / "png"
    fx.write_png(png / "cats" / "x.png", seed=1)
    fx.write_png(png / "cats" / "sub" / "dir" / "y z.png", seed=2)
    (png / "cats" / "sub" / "copy.png").write_bytes((png / "cats" / "x.png").read_bytes())
    fx.write_png(png / "cats" / "a_b.png", seed=5)
    fx.write_png(png / "cats" / "a" / "b.png", seed=6)  # flattens to a_b.png too
    fx.write_png(png / "cats" / "shared.png", seed=3)
    fx.write_png(png / "dogs" / "shared.png", seed=3)  # same bytes, other class: dropped
    fx.write_png(png / "dogs" / "a.png", seed=4)
    (png / "dogs" / "inner").mkdir()
    os.symlink("../a.png", png / "dogs" / "inner" / "link.png")  # a duplicate in its class
    fx.write_png(root / "outside.png", seed=7)
    os.symlink(root / "outside.png", png / "dogs" / "out.png")  # leaves the package: not read
    (png / "dogs" / "readme.txt").write_text("not an image")
    (png / "other").mkdir()
    fx.write_png(png / "other" / "o.png", seed=8)  # a category that is not a class
    return png


def test_tree_is_flattened_deduplicated_and_written_atomically(tmp_path):
    png = _package(tmp_path)
    plan = hd.plan(png, ("cats", "dogs"))
    dest = tmp_path / "cache" / "datasets" / "toy"
    hd.write_tree(plan, dest, {"png_root": str(png)})

    cats = sorted(p.name for p in (dest / "cats").iterdir())
    digest = plan.digests["cats/a_b.png"]
    assert plan.digests[f"cats/{cats[1]}"] != digest  # the second a_b.png got its hash suffix
    assert cats == ["a_b.png", cats[1], "sub_copy.png", "sub_dir_y_z.png"]
    assert cats[1].startswith("a_b_") and len(cats[1]) == len("a_b_12345678.png")
    assert sorted(p.name for p in (dest / "dogs").iterdir()) == ["a.png"]
    assert (dest / "cats" / "sub_copy.png").read_bytes() == (png / "cats" / "x.png").read_bytes()
    assert plan.within_class_duplicates == {"cats": 1, "dogs": 1}
    assert plan.cross_class_dropped == {"cats": 1, "dogs": 1}
    assert plan.cross_class_groups == [["cats/shared.png", "dogs/shared.png"]]
    assert plan.outside_links == [str(png / "dogs" / "out.png")]

    record = json.loads(hd.marker_path(dest).read_text())
    assert record["classes"] == {"cats": 4, "dogs": 1}
    assert set(record["sha256"]) == {f"cats/{n}" for n in cats} | {"dogs/a.png"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["toy", "toy.complete"]
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode

    # The same input gives the same names; a failed rebuild leaves the old tree and no temp.
    assert hd.plan(png, ("cats", "dogs")).files == plan.files
    plan.files["dogs"].append(("ghost.png", tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError):
        hd.write_tree(plan, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["toy", "toy.complete"]
    assert sorted(p.name for p in (dest / "dogs").iterdir()) == ["a.png"]


def test_fetch_is_a_no_op_once_complete_and_says_what_to_run_without_apt(
    tmp_path, monkeypatch, capsys
):
    png = _package(tmp_path)
    monkeypatch.setattr(hd, "CLASSES", ("cats", "dogs"))
    dest = hd.fetch(png_root=png)
    assert dest == tmp_path / "cache" / "datasets" / "openclipart9"  # $IMGCLF_CACHE
    assert "5 images in 2 classes" in capsys.readouterr().out
    monkeypatch.setattr(hd.shutil, "which", lambda _: None)  # apt is never reached
    assert hd.fetch() == dest and "already at" in capsys.readouterr().out
    with pytest.raises(hd.FetchError, match="apt-get download openclipart-png"):
        hd.fetch(force=True)
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "openclipart9",
        "openclipart9.complete",
    ]


def test_safe_names():
    assert hd.safe_name("sub/dir/x.png") == "sub_dir_x.png"
    assert hd.safe_name("a b/é+c.PNG") == "a_b__c.png"
    assert hd.safe_name(".hidden.png") == "hidden.png"
    assert hd.safe_name("-x/y.png") == "x_y.png"


def test_fit_tail_and_time_budget_are_read_as_the_contract_says():
    lines = ["epoch 3 …", "chosen: runs/ensemble-1", "test_accuracy: 0.9123",
             "balanced_accuracy: 0.8876", ""]  # fmt: skip
    assert fh.parse_fit_tail(lines) == {
        "chosen": "runs/ensemble-1",
        "accuracy": 0.9123,
        "balanced_accuracy": 0.8876,
    }
    with pytest.raises(fh.BenchError, match="last three lines"):
        fh.parse_fit_tail(lines[:-2])
    with pytest.raises(fh.BenchError, match="not a number"):
        fh.parse_fit_tail(["chosen: r", "test_accuracy: high", "balanced_accuracy: 0.5"])
    assert fh.parse_duration("30m") == 1800 and fh.parse_duration("1h30m") == 5400
    assert fh.parse_duration("90s") == 90 and fh.parse_duration("2.5h") == 9000
    with pytest.raises(fh.BenchError, match="30m"):
        fh.parse_duration("30")


def test_linear_probe_reads_the_manifest_split(tmp_path):
    from imgclf.config import ScanConfig, SplitConfig
    from imgclf.data.prepare import split_and_save
    from imgclf.data.scan import scan_to

    for c, tint in enumerate(["red", "green", "blue"]):
        for i in range(8):
            fx.write_png(tmp_path / "data" / tint / f"{i}.png", size=(40, 32), seed=(c, i))
    manifest = tmp_path / "manifests" / "data"
    scan_to(tmp_path / "data", manifest, ScanConfig(workers=1), progress=False)
    split_and_save(manifest, SplitConfig(train=0.5, val=0.25, test=0.25))

    result = fh.linear_probe(manifest, batch_size=16, image_size=64, progress=False)
    assert result["images"] == {"train": 12, "val": 6, "test": 6}
    assert 0 <= result["balanced_accuracy"] <= 1 and 0 <= result["accuracy"] <= 1
    assert result["C"] in fh.C_GRID and result["unreadable"] == 0
    assert result["preprocessing"]["input_size"] == 64


def test_run_fit_passes_the_manifest_and_budget_and_reads_the_tail(tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"
    fake.write_text(
        '#!/bin/sh\necho "$@" > args.txt\necho "fitting …"\necho "chosen: $PWD/runs/best"\n'
        'echo "test_accuracy: 0.9100"\necho "balanced_accuracy: 0.8800"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(fh.sys, "executable", str(fake))
    (tmp_path / "work").mkdir()
    result = fh.run_fit(Path("manifests/m"), tmp_path / "work", "2m")
    assert result["chosen"] == f"{tmp_path / 'work'}/runs/best"
    assert (result["accuracy"], result["balanced_accuracy"]) == (0.91, 0.88)
    args = (tmp_path / "work" / "args.txt").read_text().split()
    assert args == ["-m", "imgclf", "fit", str(tmp_path / "manifests" / "m"), "--quality",
                    "good", "--time", "2m"]  # fmt: skip
