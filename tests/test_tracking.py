"""MLflow mirroring of real tiny runs, read back through MLflow's own client; concurrent mirrors
into one fresh SQLite store (docs/RELIABILITY.md F8); broken stores only warn; TensorBoard logs
read back with TensorBoard's reader; `imgclf ui` serving HTTP 200 and shutting down without
orphans."""

import csv
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import TrackingConfig, load_config
from imgclf.errors import ImgclfError
from imgclf.runs.tracking import RUN_ID_TAG, mirror_run, store_uri, tensorboard_log
from imgclf.workflows.training import train

import factory as fx

SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real tiny runs trained without tracking (so nothing is mirrored twice); built once
    per session and shared by the xdist workers, which only copy them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with open(root / "tracking-runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "tracking-runs.done").exists():
            shutil.rmtree(root / "tracking-runs", ignore_errors=True)
            _train_two(root / "tracking-runs")
            (root / "tracking-runs.done").touch()
    return sorted((root / "tracking-runs" / "runs").iterdir())


def _train_two(tmp: Path) -> None:
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=10, size=(40, 40))
    for i, stages in enumerate(("[{epochs: 2, lr: 0.01}]", "[{epochs: 3, lr: 0.005}]")):
        cfg = load_config(
            None,
            [
                f"data.root={data}",
                f"runs_dir={tmp / 'runs'}",
                f"data.manifest={tmp / 'm'}",
                *fx.TINY_MODEL,
                f"train.stages={stages}",
                "tracking.mlflow=false",
                f"name=r{i}",
            ],
        )
        train(cfg, progress=False, log=lambda *_: None)


def copy_runs(runs, dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    return [Path(shutil.copytree(r, dest / r.name)) for r in runs]


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mirrored(uri: str) -> list:
    client = client_for(uri)
    exp = client.get_experiment_by_name("imgclf")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_mirror_is_queryable_and_idempotent(runs, tmp_path):
    run, other = copy_runs(runs, tmp_path / "runs")
    logs = []
    mlflow_id = mirror_run(run, TrackingConfig(), tmp_path / "runs", log=logs.append)
    assert mlflow_id and not logs
    uri = store_uri(TrackingConfig(), tmp_path / "runs")
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (found,) = mirrored(uri)
    summary = json.loads((run / "summary.json").read_text())
    assert found.info.run_id == mlflow_id and found.info.status == "FINISHED"
    assert (
        found.data.tags[RUN_ID_TAG] == run.name and found.data.tags["imgclf.status"] == "completed"
    )
    m = found.data.metrics
    assert m["test_accuracy"] == pytest.approx(summary["test"]["test_accuracy"])
    assert m["best_val_loss"] == pytest.approx(summary["val"]["val_loss"])
    assert m["params_total"] == summary["params"]["total"]
    p = found.data.params
    assert (p["model.name"], p["train.batch_size"], p["train.stages.0.lr"]) == (
        "scratch_cnn",
        "8",
        "0.01",
    )
    assert p["model.head.hidden"] == "[]" and p["data.image_size"] == "32"
    client = client_for(uri)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    history = client.get_metric_history(mlflow_id, "val_accuracy")
    assert [(h.step, h.value) for h in history] == [
        (int(r["epoch"]), pytest.approx(float(r["val_accuracy"]))) for r in rows
    ]
    top = {a.path for a in client.list_artifacts(mlflow_id)}
    assert {
        "model.json",
        "summary.json",
        "metrics.csv",
        "config.yaml",
        "plots",
        "predictions",
    } <= top
    assert "checkpoints" not in top
    assert {a.path for a in client.list_artifacts(mlflow_id, "predictions")} == {
        "predictions/val.csv",
        "predictions/test.csv",
    }
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == mlflow_id
    # Mirroring again finds the same MLflow run and adds no duplicate points.
    assert mirror_run(run, TrackingConfig(), tmp_path / "runs", log=logs.append) == mlflow_id
    assert len(mirrored(uri)) == 1 and not logs
    assert len(client.get_metric_history(mlflow_id, "val_accuracy")) == len(rows)
    # `imgclf mirror` both: the first is found again, the second is added.
    result = CliRunner().invoke(app, ["mirror", str(run), str(other)])
    assert result.exit_code == 0 and "mirrored 2 runs" in result.output, result.output
    ids = {r.data.tags[RUN_ID_TAG]: r.info.run_id for r in mirrored(uri)}
    assert ids.keys() == {run.name, other.name} and ids[run.name] == mlflow_id
    result = CliRunner().invoke(app, ["mirror", str(run), "--uri", "nosuchscheme://x"])
    assert isinstance(result.exception, ImgclfError)
    assert "1 of 1 runs were not mirrored" in str(result.exception)


RACER = """
import sys, time
from pathlib import Path
import mlflow.tracking  # imported before the barrier: the race is on the store, not imports
from imgclf.config import TrackingConfig
from imgclf.runs.tracking import mirror_run
me, tmp, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
for k in range(rounds):
    (tmp / f"ready-{k}-{me}").touch()
    while not (tmp / f"go-{k}").exists():
        time.sleep(0.002)
    store = tmp / f"race{k}"
    print("ID", mirror_run(store / sys.argv[4 + k], TrackingConfig(), store), flush=True)
"""


def test_concurrent_mirrors_into_new_stores_all_land(runs, tmp_path):
    """Two processes mirror into one fresh store from the same instant; three times (F8)."""
    rounds = 3
    for k in range(rounds):
        copy_runs(runs, tmp_path / f"race{k}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(i), str(tmp_path), str(rounds)]
            + [run.name for _ in range(rounds)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, run in enumerate(runs)
    ]
    for k in range(rounds):
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{k}-{i}").exists() for i in range(len(procs))):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        (tmp_path / f"go-{k}").touch()
    outputs = [p.communicate(timeout=240) for p in procs]
    for (out, err), p in zip(outputs, procs, strict=True):
        assert p.returncode == 0, err
        assert "warning" not in out + err and "database is locked" not in out + err
        assert len(re.findall(r"^ID [0-9a-f]{32}$", out, re.M)) == rounds, out + err
    for k in range(rounds):
        found = mirrored(store_uri(TrackingConfig(), tmp_path / f"race{k}"))
        assert sorted(r.data.tags[RUN_ID_TAG] for r in found) == sorted(r.name for r in runs)


def test_broken_tracking_only_warns(runs, tmp_path):
    run = copy_runs(runs[:1], tmp_path / "runs")[0]
    for uri in (
        "sqlite:////proc/imgclf-tracking/mlflow.db",  # unwritable, even for root
        f"sqlite:///{run / 'summary.json' / 'x.db'}",  # a file where a folder should be
        "nosuchscheme://nowhere",
        f"http://127.0.0.1:{free_port()}",  # a tracking server that is down
    ):
        t0 = time.monotonic()
        logs = []
        assert mirror_run(run, TrackingConfig(uri=uri), tmp_path / "runs", log=logs.append) is None
        assert len(logs) == 1 and logs[0].startswith("warning: MLflow tracking of")
        assert f"imgclf mirror {run}" in logs[0]
        assert time.monotonic() - t0 < 60  # not MLflow's default four minutes of retries
    assert not (run / "tracking.json").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert mirror_run(run, TrackingConfig(mlflow=False), tmp_path / "runs") is None


def test_tensorboard_logs_scalars_pr_curves_and_images(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_runs(runs[1:], tmp_path / "runs")[0]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    images = torch.randn(6, 3, 16, 16)
    logs = []
    folder = tensorboard_log(
        run, rows, images=images, mean=(0.5,) * 3, std=(0.5,) * 3, log=logs.append
    )
    assert folder == run / "tensorboard" and not logs
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("loss/train")
    assert [(e.step, round(e.value, 5)) for e in loss] == [
        (int(r["epoch"]), round(float(r["train_loss"]), 5)) for r in rows
    ]
    assert {"accuracy/val", "lr", "loss/val"} <= set(acc.Tags()["scalars"])
    assert {"pr_val/a", "pr_val/b", "pr_val/c", "pr_test/a"} <= set(acc.Tags()["tensors"])
    assert acc.Tags()["images"] == ["augmented_train_samples"]
    assert tensorboard_log(tmp_path / "nowhere.txt", rows, images="bad", log=logs.append) is None
    assert logs and logs[0].startswith("warning: TensorBoard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_ui_serves_and_stops_cleanly(runs, tmp_path):
    run = copy_runs(runs[:1], tmp_path / "runs")[0]
    assert mirror_run(run, TrackingConfig(), tmp_path / "runs")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "imgclf",
        "ui",
        "--runs",
        str(tmp_path / "runs"),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        server = int(re.search(r"server pid (\d+)", line)[1])
        deadline, status = time.monotonic() + 150, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search"
        req = urllib.request.Request(api, data=b'{"experiment_ids": ["1"]}', method="POST")
        req.add_header("Content-Type", "application/json")
        body = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert [r["info"]["run_name"] for r in body["runs"]] == [run.name]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while live_in_group(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_in_group(server) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_mirror_shows_progress_only_when_asked(runs, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import imgclf.progress as progress_module

    screen = io.StringIO()
    real = progress_module.progress_bar

    def on_a_terminal(description, total, show, console=None):
        return real(description, total, show, Console(file=screen, force_terminal=True))

    monkeypatch.setattr("imgclf.runs.tracking.progress_bar", on_a_terminal)
    quiet, shown = copy_runs(runs, tmp_path / "runs")
    assert mirror_run(quiet, TrackingConfig(), tmp_path / "runs", progress=False)
    assert screen.getvalue() == ""
    assert mirror_run(shown, TrackingConfig(), tmp_path / "runs", progress=True)
    assert "MLflow: " in screen.getvalue()


def test_ui_opens_the_experiments_runs_table(runs, tmp_path):
    from imgclf.runs.tracking import EXPERIMENT_TAGS, ui_experiment, ui_url

    run = copy_runs(runs[:1], tmp_path / "runs")[0]
    uri = store_uri(TrackingConfig(), tmp_path / "runs")
    assert ui_experiment(uri, "imgclf") is None  # no store yet: the start page
    assert ui_url(5000, None) == "http://127.0.0.1:5000"
    assert mirror_run(run, TrackingConfig(), tmp_path / "runs")
    client = client_for(uri)
    made = client.get_experiment_by_name("imgclf")
    assert made.tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment mirrored before the tag existed gets it when the UI opens it.
    older = client.create_experiment("older")
    assert ui_experiment(uri, "older") == older
    assert client.get_experiment(older).tags == {
        **client.get_experiment(older).tags,
        **EXPERIMENT_TAGS,
    }
    assert "mlflow.experimentKind" in client.get_experiment(older).tags
    url = ui_url(5000, ui_experiment(uri, "imgclf"))
    assert url == f"http://127.0.0.1:5000/#/experiments/{made.experiment_id}/runs"
