"""Soak: a sweep of N tiny trials on worker processes that are SIGKILLed at random and restarted
until the queue is drained; then every trial must be complete, failed or pruned — none lost, none
duplicated — and the run folders and the leaderboard must agree with the study (issue 8).

    python tests/faults/soak.py --trials 50 --workers 2             # prints the figures
    python tests/faults/soak.py --trials 12 --kills 4 --seed 1234   # replay a seed
    IMGCLF_SOAK_SEED=1234 python -m pytest tests/faults/test_soak.py -p no:xdist

What runs, in a fresh folder (kept, and printed):
- `imgclf sweep FILE --workers 0` creates the study and queues its N slots: method random over
  the first stage's learning rate and the seed (each slot its own point), 3 epochs of a tiny
  scratch CNN, a median pruner on val_loss (poor points stop after an epoch), heartbeats every
  second with a grace of a few seconds;
- the workers are `imgclf sweep FILE --join --retry-failed` processes. This process supervises
  them: it restarts a dead one while the study still has work that needs a worker (queued trials,
  a slot whose attempts all failed, a RUNNING trial whose worker is gone);
- it is also the killer: kill k comes once at least p_k slots are finished and d_k seconds after
  the previous kill, on a random worker that is inside a trial (3 kills in 4) or on any live
  worker (mid-import, mid-claim, between trials). The seed fixes p_k, d_k and every choice; the
  machine's timing does the rest, so a replay explores the same plan, not the same instants.
Killing stops once every slot is complete or pruned; the workers then run dry and exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the image factory

import factory as fx

SWEEP_ID = "soak"
METRIC = "val_loss"
DONE = ("COMPLETE", "PRUNED")
MID_TRIAL_SHARE = 0.75
POLL_S = 0.3
EXIT_WAIT_S = 120  # after the queue is drained, every worker must exit within this


@dataclass
class Kill:
    at: float  # seconds since the start
    pid: int
    worker: str  # its log's name
    trial: int | None  # the RUNNING trial it held, if any
    mode: str  # "mid-trial" or "any"


@dataclass
class Result:
    seed: int
    folder: Path
    trials: int
    kills: list[Kill] = field(default_factory=list)
    exits: list[tuple[str, int]] = field(default_factory=list)  # (worker log, exit code)
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


def prepare_sweep(folder: Path, trials: int, grace: int) -> Path:
    """A tiny 3-class dataset, scanned and split, and the sweep file over it."""
    from imgclf.config import DataConfig
    from imgclf.data.prepare import prepare

    # Enough images that a trial lasts a few polls of the supervisor on a loaded machine (with
    # 16 per class a trial took about a second and, under the full suite, a soak drained in
    # 18 s with no kill: the killer never saw a worker inside a trial).
    data = fx.make_class_folder(folder / "data", classes=("a", "b", "c"), per_class=48)
    prepare(DataConfig(root=data, manifest=folder / "manifest"), progress=False)
    spec = {
        "id": SWEEP_ID,
        "overrides": [
            f"data.manifest={folder / 'manifest'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 3, lr: 0.01}]",
            "tracking.mlflow=false",
            f"runs_dir={folder / 'runs'}",
        ],
        "method": "random",
        "trials": trials,
        "metric": METRIC,
        "pruner": {"type": "median", "startup_trials": 2},
        "heartbeat": {"interval": 1, "grace": grace},
        "parameters": {
            "train.stages.0.lr": {"low": 2.0e-3, "high": 3.0e-2, "log": True},
            "seed": {"low": 0, "high": 1_000_000},
        },
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def kill_plan(rng: random.Random, trials: int, kills: int) -> list[tuple[int, float, str]]:
    """(finished slots before it, seconds after the previous kill, mode) for each kill; the
    first kill always waits for a worker inside a trial, so every soak fails one."""
    last = max(0, trials * 2 // 3 - 1)  # leave trials to run: the last kill finds one busy
    points = sorted(rng.randint(0, last) for _ in range(kills))
    return [
        (
            p,
            rng.uniform(0.5, 3.0),
            "mid-trial" if i == 0 or rng.random() < MID_TRIAL_SHARE else "any",
        )
        for i, p in enumerate(points)
    ]


class Supervisor:
    """Keeps `n` workers alive while the study needs them, and kills them by the plan."""

    def __init__(self, folder: Path, spec: Path, n: int, rng: random.Random, plan: list) -> None:
        self.folder, self.spec, self.n, self.rng, self.plan = folder, spec, n, rng, plan
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.live: dict[str, subprocess.Popen] = {}
        self.started = 0
        self.kills: list[Kill] = []
        self.exits: list[tuple[str, int]] = []
        self.t0 = time.monotonic()
        self._last_kill = self.t0

    def start_worker(self) -> None:
        name = f"worker-{self.started:03d}"
        self.started += 1
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "imgclf", "sweep", str(self.spec), "--join", "--retry-failed"]
        with open(self.logs / f"{name}.log", "w") as out:
            self.live[name] = subprocess.Popen(
                cmd, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def reap(self) -> None:
        for name, proc in list(self.live.items()):
            if proc.poll() is not None:
                self.exits.append((name, proc.returncode))
                del self.live[name]

    def maybe_kill(self, trials: list, finished: int) -> None:
        if not self.plan:
            return
        after, delay, mode = self.plan[0]
        if finished < after or time.monotonic() - self._last_kill < delay or not self.live:
            return
        busy = {t.user_attrs.get("pid"): t.number for t in trials if t.state.name == "RUNNING"}
        names = sorted(self.live)
        if mode == "mid-trial":
            names = [n for n in names if self.live[n].pid in busy]
            if not names:
                return  # wait for a worker to be inside a trial
        name = self.rng.choice(names)
        proc = self.live[name]
        if proc.poll() is not None:
            return  # it just exited by itself: choose again next time
        proc.send_signal(signal.SIGKILL)  # only ever our own, not yet reaped child
        self._last_kill = time.monotonic()
        at = round(self._last_kill - self.t0, 1)
        self.kills.append(Kill(at, proc.pid, name, busy.get(proc.pid), mode))
        self.plan.pop(0)

    def stop(self) -> None:
        for proc in self.live.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def needs_worker(trials: list, live_pids: set[int], keys: list[str]) -> bool:
    """Queued trials, a RUNNING trial whose worker is gone, or a slot whose attempts all failed."""
    states = [t.state.name for t in trials]
    if "WAITING" in states:
        return True
    if any(t.state.name == "RUNNING" and t.user_attrs.get("pid") not in live_pids for t in trials):
        return True
    alive = {t.user_attrs.get("key") for t in trials if t.state.name != "FAIL"}
    return any(k not in alive for k in keys)


def drained(trials: list, keys: list[str]) -> bool:
    if any(t.state.name in ("RUNNING", "WAITING") for t in trials):
        return False
    done = {t.user_attrs.get("key") for t in trials if t.state.name in DONE}
    return all(k in done for k in keys)


def run(
    folder: Path,
    trials: int = 50,
    workers: int = 2,
    kills: int | None = None,
    seed: int | None = None,
    grace: int = 5,
    timeout: float = 1800.0,
    log=print,
) -> Result:
    """The whole soak in `folder`: prepare, queue, supervise and kill, drain, then `check`."""
    import optuna

    from imgclf.sweep.space import plan
    from imgclf.sweep.spec import load_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    kills = kills if kills is not None else max(3, trials // 6)
    log(f"soak: {trials} trials, {workers} workers, {kills} kills, seed {seed}, in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    spec = prepare_sweep(folder, trials, grace)
    keys = [slot.key for slot in plan(load_sweep(spec))]
    rng = random.Random(seed)
    result = Result(seed=seed, folder=folder, trials=trials)
    t0 = time.monotonic()
    queue = subprocess.run(
        [sys.executable, "-m", "imgclf", "sweep", str(spec), "--workers", "0"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if queue.returncode != 0:
        result.problems.append(f"queueing the study failed:\n{queue.stdout}{queue.stderr}")
        return result
    sup = Supervisor(folder, spec, workers, rng, kill_plan(rng, trials, kills))
    try:
        _supervise(sup, keys, t0 + timeout, result, log)
    finally:
        sup.stop()
        sup.reap()
        result.kills, result.exits = sup.kills, sup.exits
    result.wall_s = round(time.monotonic() - t0, 1)
    check(folder, keys, result)
    return result


def _supervise(sup: Supervisor, keys: list, deadline: float, result: Result, log) -> None:
    """Keep workers alive and kill by the plan until the queue is drained and they all exit."""
    from imgclf.sweep.report import open_study

    study = open_study(SWEEP_ID, sup.folder / "runs")
    for _ in range(sup.n):
        sup.start_worker()
    drained_at = None
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        sup.reap()
        trials = study.get_trials(deepcopy=False)
        if drained_at is None and drained(trials, keys):
            drained_at = time.monotonic()
            log(f"drained after {drained_at - sup.t0:.0f} s, {len(sup.kills)} kills")
        if drained_at is not None:
            if not sup.live:
                return
            if time.monotonic() - drained_at > EXIT_WAIT_S:
                hung = sorted(sup.live)
                result.problems.append(f"{hung} still running {EXIT_WAIT_S} s after the drain")
                return
            continue
        finished = len({t.user_attrs.get("key") for t in trials if t.state.name in DONE})
        before = len(sup.kills)
        sup.maybe_kill(trials, finished)
        if len(sup.kills) > before:
            k = sup.kills[-1]
            where = f"pid {k.pid}, trial {k.trial}, {k.mode}"
            log(f"{k.at:6.1f} s  kill {k.worker} ({where}); {finished}/{len(keys)} slots done")
            sup.reap()
        live_pids = {p.pid for p in sup.live.values()}
        if len(sup.live) < sup.n and needs_worker(trials, live_pids, keys):
            sup.start_worker()
    result.problems.append(f"not drained within the time limit; see {sup.logs}")


def check(folder: Path, keys: list[str], result: Result) -> None:
    """The final consistency check: study, run folders, leaderboard, worker exits and logs."""
    from imgclf.runs.leaderboard import collect
    from imgclf.sweep.report import open_study, sweep_runs

    trials = open_study(SWEEP_ID, folder / "runs").get_trials(deepcopy=False)
    runs = {p.name: p for p in sweep_runs(folder / "runs", SWEEP_ID)}
    problems = result.problems
    problems += _check_study(trials, keys)
    problems += _check_failures(trials, result)
    problems += _check_runs(trials, runs, folder / "runs")
    warned: list[str] = []
    rows = [r for r in collect(folder / "runs", warn=warned.append) if r.get("sweep") == SWEEP_ID]
    problems += _check_leaderboard(trials, runs, rows, warned)
    problems += _check_workers(folder / "logs", result)
    states = [t.state.name for t in trials]
    failed = [t for t in trials if t.state.name == "FAIL"]
    done_keys = {t.user_attrs.get("key") for t in trials if t.state.name in DONE}
    result.figures = {
        "seed": result.seed,
        "trials planned": len(keys),
        "trials in the study": len(trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": len(failed),
        "failed and retried": sum(t.user_attrs.get("key") in done_keys for t in failed),
        "kills": len(result.kills),
        "kills mid-trial": sum(k.trial is not None for k in result.kills),
        "worker processes": len(result.exits),
        "half-written run folders": sum("half-written" in w for w in warned),
        "wall s": result.wall_s,
        "consistent": not problems,
    }


def _check_study(trials: list, keys: list[str]) -> list[str]:
    problems = []
    for t in trials:
        if t.state.name not in ("COMPLETE", "FAIL", "PRUNED"):
            problems.append(f"trial {t.number} is {t.state.name} (lost)")
        if t.user_attrs.get("key") not in keys:
            problems.append(f"trial {t.number} has no planned slot: {t.user_attrs.get('key')}")
    for key in keys:
        done = [t.number for t in trials if t.user_attrs.get("key") == key and t.state.name in DONE]
        if len(done) != 1:
            what = "lost" if not done else "duplicated"
            problems.append(f"slot {key} {what}: complete or pruned trials {done}")
    return problems


def _check_failures(trials: list, result: Result) -> list[str]:
    """Each FAIL trial was on a worker this soak killed, at most one per kill."""
    killed = {k.pid for k in result.kills}
    failed = [t for t in trials if t.state.name == "FAIL"]
    problems = []
    if len(failed) > len(result.kills):
        problems.append(f"{len(failed)} failed trials but only {len(result.kills)} kills")
    per_pid: dict[Any, list[int]] = {}
    for t in failed:
        pid = t.user_attrs.get("pid")
        per_pid.setdefault(pid, []).append(t.number)
        if pid is not None and pid not in killed:
            why = t.user_attrs.get("error") or t.user_attrs.get("duplicate_of", "")
            problems.append(f"trial {t.number} failed on pid {pid}, never killed: {why}")
    problems += [
        f"one killed worker (pid {pid}) left failed trials {numbers}"
        for pid, numbers in per_pid.items()
        if pid is not None and len(numbers) > 1
    ]
    return problems


def _check_runs(trials: list, runs: dict[str, Path], runs_dir: Path) -> list[str]:
    """One run folder per started trial, each tagged with its trial; statuses match the study."""
    problems, owner = [], {}
    by_number = {t.number: t for t in trials}
    expected = {
        "COMPLETE": ("completed",),
        "PRUNED": ("pruned",),
        "FAIL": ("failed", "interrupted"),
    }
    for name, path in runs.items():
        summary = json.loads((path / "summary.json").read_text())
        number = int(summary["tags"]["trial"])
        if number in owner:
            problems.append(f"trial {number} has two run folders: {owner[number]}, {name}")
        owner[number] = name
        t = by_number.get(number)
        if t is None:
            problems.append(f"run {name} names trial {number}, which the study does not have")
            continue
        if summary["status"] not in expected.get(t.state.name, ()):
            problems.append(f"run {name} is {summary['status']}, its trial {t.state.name}")
        if t.user_attrs.get("run_id") not in (None, "", name):
            problems.append(f"trial {number} names run {t.user_attrs['run_id']}, not {name}")
    for t in trials:
        if t.state.name in DONE and t.number not in owner:
            problems.append(f"{t.state.name} trial {t.number} has no run folder")
        if t.user_attrs.get("run_id") and not (runs_dir / t.user_attrs["run_id"]).is_dir():
            problems.append(f"trial {t.number}'s run {t.user_attrs['run_id']} is missing")
    return problems


def _check_leaderboard(trials: list, runs: dict, rows: list, warned: list[str]) -> list[str]:
    """The leaderboard lists the sweep's run folders once each, with the study's values."""
    problems = [w for w in warned if "half-written" not in w]  # a kill mid-create is expected
    ids = [r["id"] for r in rows]
    if sorted(ids) != sorted(runs):
        problems.append(f"leaderboard rows {sorted(ids)} != run folders {sorted(runs)}")
    by_id = {r["id"]: r for r in rows}
    for t in trials:
        row = by_id.get(t.user_attrs.get("run_id") or "")
        if t.state.name == "COMPLETE":
            if row is None or row["status"] != "completed":
                problems.append(f"complete trial {t.number} is not a completed leaderboard row")
            elif row.get(METRIC) is None or abs(row[METRIC] - t.value) > 1e-9:
                shown = row.get(METRIC)
                problems.append(f"trial {t.number}: {METRIC} {t.value}, leaderboard {shown}")
        elif t.state.name == "PRUNED" and (row is None or row["status"] != "pruned"):
            problems.append(f"pruned trial {t.number} is not a pruned leaderboard row")
    return problems


def _check_workers(logs: Path, result: Result) -> list[str]:
    killed = {k.worker for k in result.kills}
    problems = []
    for name, code in result.exits:
        if code != 0 and not (name in killed and code == -signal.SIGKILL):
            tail = (logs / f"{name}.log").read_text()[-2000:]
            problems.append(f"{name} exited {code} without being killed:\n{tail}")
    for path in sorted(logs.glob("*.log")):
        text = path.read_text()
        for bad in ("database is locked", "Traceback"):
            if bad in text:
                problems.append(f"{path.name}: {bad!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kills", type=int, default=None, help="default: max(3, trials // 6)")
    p.add_argument("--seed", type=int, default=None, help="default: $IMGCLF_SOAK_SEED or random")
    p.add_argument("--grace", type=int, default=5, help="heartbeat grace in seconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up")
    p.add_argument("--dir", type=Path, default=None, help="default: a new temporary folder")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else env_seed()
    folder = a.dir or Path(tempfile.mkdtemp(prefix="imgclf-soak-"))
    result = run(folder, a.trials, a.workers, a.kills, seed, a.grace, a.timeout)
    for k in result.kills:
        print(f"kill at {k.at:6.1f} s: {k.worker} pid {k.pid} trial {k.trial} ({k.mode})")
    print(json.dumps(result.figures, indent=2))
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    verdict = "consistent" if not result.problems else "INCONSISTENT"
    print(f"{verdict}; replay with --seed {result.seed}; folder {folder}")
    return 0 if not result.problems else 1


def env_seed() -> int | None:
    value = os.environ.get("IMGCLF_SOAK_SEED")
    return int(value) if value else None


if __name__ == "__main__":
    sys.exit(main())
