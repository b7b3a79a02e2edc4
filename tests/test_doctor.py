"""`imgclf doctor`: a clean setup passes; stale temporary files, corrupt cache entries, corrupt
checkpoints and weights, a broken MLflow store, a full disk and mismatched versions are each
reported with what to do, and --fix removes only imgclf's own stale or corrupt cache files —
never a temporary folder whose image-cache builder is still alive."""

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import load_config
from imgclf.data.image_cache import ImageCache
from imgclf.doctor import check_examples, check_gpu, check_versions
from imgclf.workflows.training import train

import factory as fx

HOUR = 3600


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny tracked run whose head stage filled a feature cache (3 entries)."""
    base = tmp_path_factory.mktemp("doctor")
    data = fx.make_class_folder(
        base / "shapes", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={base / 'runs'}",
            f"data.manifest={base / 'manifests' / 'shapes'}",
            f"train.feature_cache={base / 'cache' / 'features'}",
            *fx.TINY_MODEL,
            "train.features=cache",
            "train.feature_views=2",
            "train.stages=[{trainable: head, epochs: 1}, {trainable: all, epochs: 1}]",
            "tracking.mlflow=true",
        ],
    )
    run = train(cfg, progress=False, log=lambda *_: None)
    return base, run.name


@pytest.fixture
def setup(trained, tmp_path):
    """The trained run, its store, manifests and feature cache copied where doctor looks by
    default (runs/, manifests/ and $IMGCLF_CACHE in the test's working directory)."""
    base, name = trained
    for folder in ("runs", "manifests", "cache"):
        shutil.copytree(base / folder, tmp_path / folder)
    return tmp_path / "runs" / name


def doctor(*args):
    result = CliRunner().invoke(app, ["doctor", "--json", *map(str, args)])
    assert result.exit_code in (0, 1), (result.output, result.exception)
    return result.exit_code, json.loads(result.stdout)


def rows(report, check, status=None):
    return [c for c in report["checks"] if c["check"] == check and status in (None, c["status"])]


def age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_clean_setup_has_no_problems(setup, tmp_path):
    env = {**os.environ, "IMGCLF_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    r = subprocess.run(
        [sys.executable, "-m", "imgclf", "doctor", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] == 0
    assert not [c for c in report["checks"] if c["status"] == "problem"]
    (store,) = rows(report, "mlflow store", "ok")
    assert "intact" in store["detail"] and "1 runs" in store["detail"]
    (cache,) = rows(report, "feature cache", "ok")
    assert cache["detail"].startswith("3 entries verified by sha256")
    (files,) = rows(report, "run files", "ok")
    assert files["detail"].startswith("1 checkpoints (digests match) and 1 weight files load")
    assert rows(report, "temp files")[0]["detail"].startswith("none under")
    # The table for people says the same.
    table = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "no problems" in table.stdout and "verified by sha256" in table.stdout


def test_stale_temp_files_are_removed_by_fix_young_and_user_files_stay(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    stale = [
        run / ".metrics.csv.ab12cd_9.tmp",  # io.atomic_write's temporary file
        tmp_path / "manifests" / "m" / ".manifest.csv.q2w3e4r5.tmp",
        tmp_path / "cache" / "features" / ".0123abcd.zx8cv7bn",  # FeatureCache's mkdtemp folder
    ]
    young = [
        run / ".summary.json.zz9_8y7x.tmp",
        tmp_path
        / "cache"
        / "examples"
        / ".digits-32px.k3j4h5g6",  # its folder is old, its file new
    ]
    user = [
        run / "notes.tmp",
        run / ".keep.abcdefgh.tmp.bak",
        tmp_path / "manifests" / "m" / ".hidden",
        run / ".looks.abcdefgh",  # a folder in a run is never a temporary folder of imgclf's
    ]
    folders = {stale[2], young[1], user[3]}
    for path in stale + young + user:
        target = path / "part" / "x.npy" if path in folders else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * 100)
    for path in stale + user:
        for p in [*path.rglob("*"), path]:
            age(p, 2 * HOUR)
    age(young[1], 2 * HOUR)

    code, report = doctor()
    assert code == 0  # stale temporary files are a warning
    (found,) = rows(report, "temp files", "warn")
    assert {os.path.abspath(p) for p in found["paths"]} == {str(p) for p in stale}
    assert "--fix" in found["fix"]
    (left,) = rows(report, "temp files", "ok")
    assert {os.path.abspath(p) for p in left["paths"]} == {str(p) for p in young}
    assert all(p.exists() for p in stale)  # nothing removed without --fix

    code, report = doctor("--fix", "--stale-minutes", 60)
    assert code == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in young + user)
    assert len(report["removed"]) == 3
    code, report = doctor()
    assert not rows(report, "temp files", "warn")


def test_a_feature_cache_entry_with_a_flipped_byte_is_found_and_removed(setup, tmp_path):
    features = tmp_path / "cache" / "features"
    entries = sorted(p for p in features.iterdir() if p.is_dir())
    assert len(entries) == 3
    meta = json.loads((entries[0] / "meta.json").read_text())
    for name in ("x.npy", "y.npy", "ok.npy"):  # written with the entry
        assert meta["sha256"][name] == hashlib.sha256((entries[0] / name).read_bytes()).hexdigest()
    x = entries[0] / "x.npy"
    data = bytearray(x.read_bytes())
    data[-3] ^= 0x01  # inside the float data: the file still loads, only the hash tells
    x.write_bytes(bytes(data))
    old = entries[1]  # an entry from before digests were recorded
    meta = json.loads((old / "meta.json").read_text())
    del meta["sha256"]
    (old / "meta.json").write_text(json.dumps(meta))

    code, report = doctor()
    assert code == 1 and report["problems"] == 1
    (bad,) = rows(report, "feature cache", "problem")
    assert str(entries[0]) in bad["detail"] and "x.npy does not match" in bad["detail"]
    assert "--fix" in bad["fix"]
    (unverified,) = rows(report, "feature cache", "warn")
    assert "cannot be verified by hash" in unverified["detail"]
    assert rows(report, "feature cache", "ok")[0]["detail"].startswith("1 entries verified")

    code, report = doctor("--fix")
    assert code == 0 and report["removed"] == [f"removed {entries[0]}"]
    assert not entries[0].exists() and old.exists() and entries[2].exists()
    code, report = doctor()
    assert code == 0


def test_corrupt_checkpoint_and_weights_are_named_and_kept(setup, tmp_path):
    checkpoint = setup / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key] + 1e-3  # contents changed, digest kept
    torch.save(state, checkpoint)
    weights = setup / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 64)

    code, report = doctor("--fix")
    assert code == 1
    bad = rows(report, "run files", "problem")
    assert len(bad) == 2
    checkpoint, weights = (p.relative_to(tmp_path) for p in (checkpoint, weights))  # --runs runs
    ckpt = next(c for c in bad if c["paths"] == [str(checkpoint)])
    assert "checksum" in ckpt["detail"] and str(checkpoint) in ckpt["detail"]
    assert "only needed to resume" in ckpt["fix"] and str(weights) in ckpt["fix"]
    best = next(c for c in bad if c["paths"] == [str(weights)])
    assert str(weights) in best["detail"] and "best weights" in best["fix"]
    assert "imgclf train" in best["fix"]
    assert checkpoint.exists() and weights.exists()  # --fix never touches a run folder
    assert report["removed"] == []


def test_a_garbage_mlflow_store_is_a_problem_with_the_fix(setup, tmp_path):
    store = tmp_path / "runs" / "mlflow.db"
    store.write_bytes(b"this is not a database " * 200)
    code, report = doctor()
    assert code == 1
    (bad,) = rows(report, "mlflow store", "problem")
    assert str(store) in bad["detail"] and "not a readable SQLite database" in bad["detail"]
    assert f"mv {store} {store}.broken" in bad["fix"]
    assert f"imgclf mirror {setup.relative_to(tmp_path)}" in bad["fix"]

    store.unlink()  # a real SQLite file that is not an MLflow store
    with sqlite3.connect(store) as con:
        con.execute("CREATE TABLE experiments (id INTEGER)")
    con.close()
    code, report = doctor()
    (bad,) = rows(report, "mlflow store", "problem")
    assert code == 1 and "no table alembic_version" in bad["detail"]


def test_a_server_store_is_not_contacted_and_its_password_not_shown(tmp_path):
    code, report = doctor("--uri", "http://me:s3cret@tracking.invalid:5000")
    (row,) = rows(report, "mlflow store", "ok")
    assert "not checked" in row["detail"] and "s3cret" not in json.dumps(report)
    assert code == 0


def test_too_little_free_disk_names_what_can_go(setup):
    code, report = doctor("--min-free-gb", 10**9)
    assert code == 1
    bad = rows(report, "disk", "problem")
    assert bad and "below --min-free-gb" in bad[0]["detail"]
    assert "feature caches in" in bad[0]["fix"] and "(3 entries" in bad[0]["fix"]
    assert "checkpoints/last.pt of 1 completed runs" in bad[0]["fix"]
    code, report = doctor("--min-free-gb", 0)
    assert code == 0 and not rows(report, "disk", "problem")


def test_versions_pair_rule_and_constraint_drift(tmp_path):
    pins = tmp_path / "constraints.txt"
    pins.write_text("# pinned\ntorch==2.14.1\nnumpy==2.0.0\ncuda-toolkit==13.0.3.0\n")
    base = {"torch": "2.14.1+cpu", "numpy": "2.4.6"}
    installed = {p: "1.0" for p in ("timm", "lightning", "mlflow", "optuna", "onnxruntime")}
    installed |= {"safetensors": "0.8.0", "pillow": "12.0", **base}
    good = check_versions({**installed, "torchvision": "0.29.1"}, pins)
    assert [f.status for f in good if f.check == "torch pair"] == ["ok"]
    (drift,) = [f for f in good if f.check == "constraints"]
    assert drift.status == "warn" and drift.detail.count("pinned") == 1  # +cpu is torch 2.14.1
    assert "numpy 2.4.6 (pinned 2.0.0)" in drift.detail and "pip install -c" in drift.fix
    bad = check_versions({**installed, "torchvision": "0.28.0"}, pins)
    (pair,) = [f for f in bad if f.check == "torch pair"]
    assert pair.status == "problem" and "torchvision 0.29" in pair.detail
    missing = check_versions({"torch": "2.14.1", "torchvision": "0.29.0"}, tmp_path / "none")
    assert missing[0].status == "problem" and "not installed: timm" in missing[0].detail
    real = check_versions()
    assert f"torch {metadata.version('torch')}," in real[0].detail


def test_gpu_check_never_fails():
    (gpu,) = check_gpu()
    assert gpu.status in ("ok", "warn")
    if not torch.cuda.is_available():
        assert "CPU" in gpu.detail
    else:
        assert "cuda:0" in gpu.detail


def test_the_example_data_is_verified_by_its_recorded_digests(tmp_path):
    from imgclf.data.example import digits_folder

    folder = digits_folder(size=8)
    examples = folder.parent
    (ok,) = check_examples(examples)
    assert ok.status == "ok" and "1797 files verified" in ok.detail
    victim = next((folder / "digit_3").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\x00")
    (bad,) = check_examples(examples)
    assert bad.status == "problem" and f"digit_3/{victim.name}" in bad.detail
    code, report = doctor("--fix")
    assert code == 0 and not folder.exists()
    assert not (examples / f"{folder.name}.complete").exists()
    assert rows(report, "example data", "problem")[0]["fixed"]


def build_image_cache(tmp_path, sizes=(32,)):
    """Real decode-once image cache entries (one per size) of six tiny generated images."""
    data = fx.make_class_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3, size=(40, 30))
    rel = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    cache = ImageCache()  # $IMGCLF_CACHE/images: where doctor looks
    built = [
        cache.open_or_build(data, rel, data_version="v1", size=s, mode="disk", workers=0)
        for s in sizes
    ]
    return cache, data, rel, [b.folder for b in built]


def test_image_cache_entries_are_verified_and_a_flipped_byte_is_removed(tmp_path):
    cache, data, rel, (first, second) = build_image_cache(tmp_path, sizes=(32, 24))
    meta = json.loads((first / "meta.json").read_text())
    pixels = (first / "images.u8").read_bytes()
    assert meta["sha256"]["images.u8"] == hashlib.sha256(pixels).hexdigest()
    code, report = doctor()
    assert code == 0
    (ok,) = rows(report, "image cache")
    assert ok["status"] == "ok" and ok["detail"].startswith("2 entries verified by sha256")
    assert "of pixels hashed" in ok["detail"]

    flipped = bytearray(pixels)
    flipped[len(flipped) // 2] ^= 0x01  # same size: read_meta still accepts it, only the hash tells
    (first / "images.u8").write_bytes(bytes(flipped))
    junk = cache.root / ("f" * 24)  # an entry folder without its meta.json
    junk.mkdir()
    (junk / "images.u8").write_bytes(b"\0" * 10)
    code, report = doctor()
    assert code == 1 and report["problems"] == 2
    bad = {c["paths"][0]: c for c in rows(report, "image cache", "problem")}
    assert set(bad) == {str(first), str(junk)}
    assert "images.u8 does not match the sha256" in bad[str(first)]["detail"]
    assert "incomplete" in bad[str(junk)]["detail"] and "no meta.json" in bad[str(junk)]["detail"]
    assert all("--fix" in c["fix"] for c in bad.values())
    assert rows(report, "image cache", "ok")[0]["detail"].startswith("1 entries verified")

    code, report = doctor("--fix")
    assert code == 0
    assert sorted(report["removed"]) == sorted([f"removed {first}", f"removed {junk}"])
    assert not first.exists() and not junk.exists() and second.exists()
    assert (second / "images.u8").is_file()  # the entry folder only
    code, report = doctor()
    assert code == 0 and rows(report, "image cache", "ok")[0]["detail"].startswith("1 entries")
    again = cache.open_or_build(data, rel, data_version="v1", size=32, mode="disk", workers=0)
    assert again.folder == first and again.build_seconds > 0  # decoded again on next use


def test_a_live_image_cache_builders_temp_folder_survives_fix(tmp_path):
    cache, *_ = build_image_cache(tmp_path)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    owners = {
        "live": f"{host}\n{os.getpid()}\n",  # this test process: alive on this host
        "dead": f"{host}\n{finished.pid}\n",
        "other host": f"elsewhere.invalid\n{os.getpid()}\n",  # not checkable: the age rule
    }
    folders = {}
    for i, (name, owner) in enumerate(owners.items()):
        folder = cache.root / f".{'0' * 23}{i}.ab12cd3{i}"  # mkdtemp(prefix=".<key>.")
        folder.mkdir()
        (folder / ".owner").write_text(owner)
        (folder / "images.u8").write_bytes(b"\0" * 1000)
        for p in [*folder.iterdir(), folder]:
            age(p, 2 * HOUR)
        folders[name] = folder

    code, report = doctor()
    assert code == 0 and not rows(report, "image cache", "problem")  # not entries
    (stale,) = rows(report, "temp files", "warn")
    assert {os.path.abspath(p) for p in stale["paths"]} == {
        str(folders["dead"]),
        str(folders["other host"]),
    }
    (kept,) = [c for c in rows(report, "temp files", "ok") if "still running" in c["detail"]]
    assert [os.path.abspath(p) for p in kept["paths"]] == [str(folders["live"])]

    code, report = doctor("--fix", "--stale-minutes", 0)
    assert code == 0
    assert folders["live"].is_dir() and (folders["live"] / "images.u8").is_file()
    assert not folders["dead"].exists() and not folders["other host"].exists()
    assert str(folders["live"]) not in json.dumps(report["removed"])


def test_too_little_free_disk_names_the_image_cache(tmp_path):
    cache, _, _, (entry,) = build_image_cache(tmp_path)
    code, report = doctor("--min-free-gb", 10**9)
    assert code == 1
    (bad,) = [c for c in rows(report, "disk", "problem") if "image caches" in c["fix"]]
    assert f"decoded image caches in {cache.root} (1 entries" in bad["fix"]
    assert f"{entry.name} (" in bad["fix"]
