"""Issue 8 "Soak", reduced for CI: a random sweep of 12 tiny trials on 2 worker processes while
the driver SIGKILLs workers at random (4 kills, the first always mid-trial) and restarts them as
`--join --retry-failed` workers until the queue is drained. `soak.check` then requires every
trial complete, failed or pruned; every slot exactly one complete-or-pruned trial; every failed
trial on a killed worker (at most one per kill) with a run folder that never says "completed";
one run folder per started trial; and leaderboard rows equal to the study's runs and values.

Full size, by hand: `python tests/faults/soak.py --trials 50 --workers 2`. A failure prints the
seed; `IMGCLF_SOAK_SEED=N` replays its kill plan.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import soak
import yaml

from imgclf.sweep.runner import run_sweep
from imgclf.sweep.spec import load_sweep
from imgclf.sweep.study import Sweep


@pytest.mark.timeout(600)
def test_a_sweep_loses_and_duplicates_nothing_while_workers_are_killed(tmp_path):
    folder = tmp_path / "soak"
    result = soak.run(folder, trials=12, workers=2, kills=4, seed=soak.env_seed(), timeout=480)
    print(result.figures)
    replay = f"\nreplay: IMGCLF_SOAK_SEED={result.seed}; worker logs in {folder / 'logs'}"
    assert result.problems == [], "\n".join(result.problems) + replay
    figures = result.figures
    assert figures["kills"] >= 3, f"{figures}{replay}"
    assert figures["kills mid-trial"] >= 1, f"{figures}{replay}"
    assert figures["complete"] + figures["pruned"] == 12, f"{figures}{replay}"
    assert figures["failed"] == figures["failed and retried"], f"{figures}{replay}"


def test_a_trial_lost_after_its_run_finished_fails_with_its_run_and_is_queued_once(tmp_path):
    # The window a random kill rarely hits: the run folder already says "completed" (it is not
    # yet named on the trial) when the worker dies, before the study records the result.
    spec = tmp_path / "lost.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "heartbeat": {"interval": 1, "grace": 1},
                "parameters": {"seed": {"values": [0, 1]}},
                "overrides": ["tracking.mlflow=false"],
            }
        )
    )
    run_sweep(spec, workers=0, log=lambda *_: None)
    sweep = Sweep.open(load_sweep(spec), retry=True)
    sweep.load()
    study, trial, _ = sweep.claim()  # one heartbeat, then silence: as if killed
    key = trial.user_attrs["key"]
    run = Path("runs") / f"20260101-000000-lost-t{trial.number}-scratch_cnn-abcdef"
    run.mkdir(parents=True)
    tags = {"sweep": "lost", "trial": str(trial.number)}
    (run / "summary.json").write_text(json.dumps({"status": "completed", "tags": tags}))

    deadline = time.monotonic() + 60
    while study.trials[trial.number].state.name == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        sweep.fail_stale()
    sweep.fail_stale()  # a second look (another worker's) queues nothing more
    trials = study.get_trials()
    assert trials[trial.number].state.name == "FAIL"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed", "a FAIL trial's run is no result"
    assert "heartbeat" in summary["error"] and "ended completed" in summary["error"]
    again = [t for t in trials if t.user_attrs.get("key") == key and t.state.name == "WAITING"]
    assert len(again) == 1
    assert again[0].user_attrs == {"key": key, "sweep": "lost", "retry_of": trial.number}
