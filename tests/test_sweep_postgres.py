"""Distributed sweeps on a real PostgreSQL server: `imgclf sweep --join` workers share one study;
a worker killed mid-trial leaves a FAIL trial (never a lost or forever-RUNNING one) that
`--join --retry-failed` runs again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imgclf.config import DataConfig
from imgclf.data.prepare import prepare
from imgclf.runs.leaderboard import collect
from imgclf.sweep.report import open_study, sweep_runs
from imgclf.sweep.spec import load_sweep
from imgclf.sweep.study import Sweep
from postgres import postgres_server

import factory as fx

TINY = [
    *fx.TINY_MODEL,
    "tracking.mlflow=false",
]


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


@pytest.fixture()
def manifest(tmp_path) -> Path:
    data = fx.make_class_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6,
                                size=(32, 32))  # fmt: skip
    prepare(DataConfig(root=data, manifest=tmp_path / "manifest"), progress=False)
    return tmp_path / "manifest"


def sweep_file(path: Path, manifest: Path, url: str, epochs: int, **fields) -> Path:
    overrides = [f"data.manifest={manifest}", *TINY, f"train.stages=[{{epochs: {epochs}}}]"]
    path.write_text(yaml.safe_dump({"storage": url, "overrides": overrides, **fields}))
    return path


def imgclf(*args, cwd: Path) -> subprocess.Popen:
    """The real command in the background, its output in a file (a pipe could fill and block)."""
    log = cwd / f"imgclf-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "imgclf", *map(str, args)], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no exit in {timeout} s:\n{proc.log.read_text()}") from None
    out = proc.log.read_text()
    assert proc.returncode == 0, out
    return out


def completed_runs(runs: Path, sweep_id: str) -> set[str]:
    rows = collect(runs, warn=lambda *_: None)  # what the leaderboard lists
    ids = {p.name for p in sweep_runs(runs, sweep_id)}
    return {r["id"] for r in rows if r["id"] in ids and r["status"] == "completed"}


def test_two_join_workers_share_one_study_each_trial_once(tmp_path, manifest, pg):
    url = pg.database("share")
    spec = sweep_file(tmp_path / "share.yaml", manifest, url, epochs=2, parameters={
        "model.head.pool": {"values": ["avg", "max", "avgmax"]},
        "model.head.hidden": {"values": [[], [8]]},
    })  # fmt: skip
    finish(imgclf("sweep", spec, "--workers", "0", cwd=tmp_path))  # create and queue only
    workers = [imgclf("sweep", spec, "--join", cwd=tmp_path) for _ in range(2)]
    for w in workers:
        finish(w)
    study = open_study("share", tmp_path / "runs", storage=url)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert sorted(t.user_attrs["key"] for t in trials) == [f"g{i}" for i in range(6)]
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}, "both worked"
    runs = {t.user_attrs["run_id"] for t in trials}
    assert len(runs) == 6
    assert completed_runs(tmp_path / "runs", "share") == runs, "leaderboard == study"
    rows = {r["id"]: r for r in collect(tmp_path / "runs", warn=lambda *_: None)}
    for t in trials:
        assert rows[t.user_attrs["run_id"]]["val_accuracy"] == pytest.approx(t.value)


def test_a_killed_worker_leaves_a_failed_trial_that_retry_completes(tmp_path, manifest, pg):
    url = pg.database("kill")
    spec = sweep_file(
        tmp_path / "kill.yaml", manifest, url, epochs=6,
        heartbeat={"interval": 1, "grace": 3},
        parameters={"model.head.pool": {"values": ["avg", "max", "avgmax"]}},
    )  # fmt: skip
    finish(imgclf("sweep", spec, "--workers", "0", cwd=tmp_path))
    workers = {w.pid: w for w in (imgclf("sweep", spec, "--join", cwd=tmp_path) for _ in range(2))}
    victim = _kill_one_mid_trial(url, workers)
    survivor = next(w for pid, w in workers.items() if pid != victim["pid"])
    finish(survivor)
    assert workers[victim["pid"]].wait(timeout=30) == -signal.SIGKILL
    # The heartbeat stops with the process: after the grace period the trial is FAIL.
    sweep = Sweep.open(load_sweep(spec), storage=url)
    study = open_study("kill", tmp_path / "runs", storage=url)
    deadline = time.monotonic() + 30
    while study.trials[victim["number"]].state.name == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        sweep.fail_stale()
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[victim["number"]] == "FAIL", states
    assert sorted(states.values()) == ["COMPLETE"] * 2 + ["FAIL"]
    summary = json.loads((Path(victim["run"]) / "summary.json").read_text())
    assert summary["status"] == "failed" and "heartbeat" in summary["error"]

    out = finish(imgclf("sweep", spec, "--join", "--retry-failed", cwd=tmp_path))
    assert "1 trial(s) queued" in out
    trials = open_study("kill", tmp_path / "runs", storage=url).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["key"] for t in complete) == ["g0", "g1", "g2"]
    assert [t.state.name for t in trials if t.number == victim["number"]] == ["FAIL"]
    assert len(trials) == 4
    runs = {t.user_attrs["run_id"] for t in complete}
    assert completed_runs(tmp_path / "runs", "kill") == runs
    assert len(sweep_runs(tmp_path / "runs", "kill")) == 4  # 3 completed + the failed one


def _kill_one_mid_trial(url: str, workers: dict[int, subprocess.Popen]) -> dict:
    """Wait until a worker's trial is RUNNING with its run folder on disk, then SIGKILL it."""
    deadline, study = time.monotonic() + 180, open_study("kill", storage=url)
    while time.monotonic() < deadline:
        for t in study.get_trials():
            run, pid = t.user_attrs.get("run"), t.user_attrs.get("pid")
            if t.state.name == "RUNNING" and run and Path(run).is_dir() and pid in workers:
                os.kill(pid, signal.SIGKILL)
                status = json.loads((Path(run) / "summary.json").read_text())["status"]
                assert status == "running", "killed mid-trial"
                return {"pid": pid, "number": t.number, "run": run}
        if any(w.poll() is not None for w in workers.values()):
            raise AssertionError("a worker ended before any trial could be killed")
        time.sleep(0.1)
    raise AssertionError("no trial started in 180 s")


OPENER = """
import sys, time
from imgclf.sweep.runner import run_sweep
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process past its imports: go together
run_sweep(sys.argv[1], workers=0, log=lambda *_: None)
"""


def test_processes_creating_one_new_postgres_study_at_once_queue_each_slot_once(tmp_path, pg):
    # The PostgreSQL twin of the SQLite race in faults/test_concurrent_writers.py: without the
    # study's advisory lock, schema creation collides and slots are queued more than once.
    url = pg.database("race")
    spec = tmp_path / "race.yaml"
    spec.write_text(
        yaml.safe_dump({"storage": url, "parameters": {"seed": {"values": list(range(8))}}})
    )
    start = time.time() + 8  # imports take a few seconds per process
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
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    trials = open_study("race", tmp_path / "runs", storage=url).get_trials()
    assert sorted(t.user_attrs["key"] for t in trials) == [f"g{i}" for i in range(8)]
    assert {t.state.name for t in trials} == {"WAITING"}
    assert not any("duplicate_of" in t.user_attrs for t in trials)
