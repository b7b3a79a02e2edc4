"""docs/RELIABILITY.md F8: two trainings and two sweep processes, started together, write one
runs folder and one MLflow store. Nothing is lost or duplicated and no "database is locked"
surfaces.

The two sweep processes are the same `imgclf sweep FILE` command typed twice at once (each runs
trials itself): both create the new study, both queue its slots, both claim trials.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from imgclf.config import DataConfig
from imgclf.data.prepare import prepare
from imgclf.runs.leaderboard import collect
from imgclf.runs.tracking import RUN_ID_TAG
from imgclf.sweep.report import open_study

import factory as fx

DEADLINE_S = 480  # all four processes together: 30-70 s on 2 shared cores
GRID = {"seed": {"values": [0, 1, 2, 3]}}


@pytest.mark.timeout(600)
def test_two_trainings_and_two_sweeps_share_runs_folder_and_mlflow_store(tmp_path):
    data = fx.make_class_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6)
    prepare(DataConfig(root=data, manifest=tmp_path / "manifest"), progress=False)
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    common = [
        f"data.manifest={tmp_path / 'manifest'}",
        *fx.TINY_MODEL,
        "train.stages=[{epochs: 1, lr: 0.01}]",
        f"runs_dir={runs}",
        "tracking.mlflow=true",
        f"tracking.uri={uri}",
    ]
    spec = tmp_path / "f8.yaml"
    spec.write_text(yaml.safe_dump({"overrides": common, "parameters": GRID}))

    procs = {
        "train-a": start(["train", *common, "name=a", "--no-progress"], tmp_path),
        "train-b": start(["train", *common, "name=b", "--no-progress"], tmp_path),
        "sweep-1": start(["sweep", spec], tmp_path),
        "sweep-2": start(["sweep", spec], tmp_path),
    }
    outputs = finish_all(procs)
    for name, out in outputs.items():
        assert "database is locked" not in out, f"{name}:\n{out}"
        assert "warning" not in out.lower(), f"{name}:\n{out}"  # e.g. "MLflow tracking … failed"
        assert "Traceback" not in out, f"{name}:\n{out}"

    # Every run folder complete; run ids unique and the ones the processes reported.
    folders = sorted(p for p in runs.iterdir() if p.name != "sweeps")
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in folders}
    assert len(folders) == 2 + len(GRID["seed"]["values"]), [p.name for p in folders]
    assert all(s["status"] == "completed" for s in summaries.values()), summaries
    assert all(s["run_id"] == name for name, s in summaries.items())
    assert all((p / "model.safetensors").is_file() for p in folders)
    reported = [re.findall(r"run folder: (\S+)", outputs[n]) for n in ("train-a", "train-b")]
    trained = {name for name, s in summaries.items() if not s["tags"]}
    assert sorted(Path(p).name for found in reported for p in found) == sorted(trained)
    assert {yaml.safe_load((runs / n / "config.yaml").read_text())["name"] for n in trained} == {
        "a",
        "b",
    }, "each training wrote its own folder"

    # The study: every grid point exactly once, by one of the two processes, no failures.
    trials = open_study("f8", runs).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.number, t.state) for t in trials]
    assert sorted(t.user_attrs["key"] for t in trials) == ["g0", "g1", "g2", "g3"]
    swept = {name for name, s in summaries.items() if s["tags"].get("sweep") == "f8"}
    assert {t.user_attrs["run_id"] for t in trials} == swept

    # MLflow: one run per run folder, found by its imgclf.run_id tag; none missing or doubled.
    mirrored = mlflow_runs(uri)
    assert Counter(r.data.tags.get(RUN_ID_TAG) for r in mirrored) == Counter(list(summaries))
    by_id = {r.data.tags[RUN_ID_TAG]: r for r in mirrored}
    for p in folders:
        tracking = json.loads((p / "tracking.json").read_text())
        assert tracking["mlflow_run_id"] == by_id[p.name].info.run_id
        assert by_id[p.name].info.status == "FINISHED"

    # The leaderboard: every run exactly once, nothing skipped.
    warnings: list[str] = []
    rows = collect(runs, warn=warnings.append)
    assert Counter(r["id"] for r in rows) == Counter(list(summaries))
    assert warnings == []


def start(args: list, cwd: Path) -> subprocess.Popen:
    """The real command in the background, its output in a file (a pipe could fill and block)."""
    log = cwd / f"{args[0]}-{time.monotonic_ns()}.log"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgclf", *map(str, args)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish_all(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Wait for every process (one shared deadline); all must exit 0. Their outputs."""
    deadline = time.monotonic() + DEADLINE_S
    try:
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not exit in {DEADLINE_S} s") from None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = {name: proc.log.read_text() for name, proc in procs.items()}  # type: ignore[attr-defined]
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{outputs[name]}"
    return outputs


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments], max_results=1000)


OPENER = """
import sys, time
from imgclf.sweep.runner import run_sweep
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process past its imports: go together
run_sweep(sys.argv[1], workers=0, log=lambda *_: None)
"""


def test_sweep_processes_creating_one_new_study_at_once_all_open_it_and_queue_once(tmp_path):
    # Without the study's file lock: "table studies already exists" or "UNIQUE constraint
    # failed: alembic_version.version_num" in one process, and every slot queued 2-4 times (the
    # twins later fail as duplicates), in each of 3 tries.
    spec = tmp_path / "race.yaml"
    spec.write_text(yaml.safe_dump({"parameters": {"seed": {"values": list(range(8))}}}))
    start = time.time() + 8  # imports take a few seconds per process on 2 busy cores
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(spec), str(start)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=DEADLINE_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    trials = open_study("race", tmp_path / "runs").get_trials()
    assert sorted(t.user_attrs["key"] for t in trials) == [f"g{i}" for i in range(8)]
    assert {t.state.name for t in trials} == {"WAITING"}
