"""Sweeps on tiny scratch runs: grid with two worker processes, list, random, Optuna + pruning,
warm start, the packaged example, the report, and the errors a user can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from imgclf.config import DataConfig, TrainConfig
from imgclf.configs import config_path
from imgclf.data.prepare import prepare
from imgclf.errors import ImgclfError
from imgclf.sweep.report import open_study, sweep_runs, trial_rows, write_sweep_report
from imgclf.sweep.runner import run_sweep
from imgclf.sweep.space import base_tree, check_space, decode, plan, trial_config
from imgclf.sweep.spec import load_sweep, sweep_folder, validate_sweep
from imgclf.sweep.study import Sweep

import factory as fx

TINY = [
    *fx.TINY_MODEL,
    "train.stages=[{epochs: 2, lr: 0.01}]",
    "tracking.mlflow=false",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A scanned and split 3-class folder of 6 images per class, shared by every sweep here."""
    root = tmp_path_factory.mktemp("sweepdata")
    data = fx.make_class_folder(root / "data", classes=("a", "b", "c"), per_class=6, size=(32, 32))
    prepare(DataConfig(root=data, manifest=root / "manifest"), progress=False)
    return root / "manifest"


def write_sweep(path: Path, manifest: Path, **fields) -> Path:
    overrides = [f"data.manifest={manifest}", *TINY, *fields.pop("overrides", [])]
    path.write_text(yaml.safe_dump({"overrides": overrides, **fields}, sort_keys=False))
    return path


def quiet(*_):
    pass


def by_state(study) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in study.get_trials():
        out.setdefault(t.state.name, []).append(t)
    return out


def imgclf(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "imgclf", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_grid_with_two_worker_processes_runs_each_point_once(tmp_path, manifest):
    spec = write_sweep(
        tmp_path / "heads.yaml",
        manifest,
        parameters={
            "model.head.pool": {"values": ["avg", "max"]},
            "model.head.hidden": {"values": [[], [8]]},
        },
    )
    r = imgclf("sweep", spec, "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    study = open_study("heads", tmp_path / "runs")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.user_attrs["key"] for t in trials) == ["g0", "g1", "g2", "g3"]
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers took trials"
    runs = sweep_runs(tmp_path / "runs", "heads")
    assert runs == [Path(t.user_attrs["run"]) for t in trials], "one run folder per trial, in order"
    seen = set()
    for t, run in zip(trials, runs, strict=True):
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert summary["tags"] == {"sweep": "heads", "trial": str(t.number)}
        assert summary["status"] == "completed"
        assert t.value == pytest.approx(summary["val"]["val_accuracy"])
        head = config["model"]["head"]
        hidden = json.dumps(head["hidden"], separators=(",", ":"))
        assert t.params == {"model.head.pool": head["pool"], "model.head.hidden": hidden}
        seen.add((head["pool"], tuple(head["hidden"])))
    assert seen == {("avg", ()), ("avg", (8,)), ("max", ()), ("max", (8,))}
    assert "trials" in r.stdout and "report --sweep heads" in r.stdout
    os.chdir(tmp_path)  # the sweep file's runs_dir is relative, as the CLI saw it
    run_sweep(spec, workers=1, log=quiet)  # a re-run continues: nothing left to do
    assert len(open_study("heads", tmp_path / "runs").get_trials()) == 4
    assert len(sweep_runs(tmp_path / "runs", "heads")) == 4
    page = write_sweep_report("heads", tmp_path / "runs").read_text()
    assert page.count("data:image/png;base64,") == 4, "history, parameters, importances, curves"
    assert "http://" not in page and "https://" not in page
    best = max(trials, key=lambda t: t.value)
    assert f"Best trial: {best.number}" in page
    # The same through the commands users type: the report and the leaderboard of one sweep.
    cli = [sys.executable, "-m", "imgclf"]
    r = subprocess.run(
        [*cli, "report", "--sweep", "heads", "--runs-dir", "runs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "sweeps/heads/report.html" in r.stdout, r.stderr
    # One door: `sweep-report` is an alias of `report --sweep` that says where to go.
    alias = subprocess.run(
        [*cli, "sweep-report", "heads", "--runs", "runs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alias.returncode == 0 and alias.stdout == r.stdout, alias.stderr
    assert "use: imgclf report --sweep heads" in alias.stderr
    r = subprocess.run(
        [*cli, "leaderboard", "--sweep", "heads", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(row["id"] for row in json.loads(r.stdout)) == sorted(
        p.name for p in sweep_runs(tmp_path / "runs", "heads")
    )
    assert "skipped" not in r.stderr, "runs/sweeps and the MLflow store are not runs"


def test_list_variants_then_a_warm_start_sweep_over_a_stage_lr(tmp_path, manifest):
    spec = write_sweep(
        tmp_path / "variants.yaml",
        manifest,
        method="list",
        variants=[
            {"name": "narrow", "overrides": ["model.scratch.width=4"]},
            {"name": "wide", "overrides": ["model.scratch.width=12", "seed=3"]},
        ],
    )
    sweep = run_sweep(spec, log=quiet)
    rows = trial_rows(sweep.study())
    assert [(r["key"], r["state"], r["params"]) for r in rows] == [
        ("narrow", "COMPLETE", {"variant": "narrow"}),
        ("wide", "COMPLETE", {"variant": "wide"}),
    ]
    wide = Path(rows[1]["run"])
    config = yaml.safe_load((wide / "config.yaml").read_text())
    assert (config["model"]["scratch"]["width"], config["seed"]) == (12, 3)

    warm = tmp_path / "warm.yaml"
    warm.write_text(
        yaml.safe_dump(
            {
                "init_from": str(wide),  # no base: the source run's own config, with new stages
                "overrides": ["train.stages=[{epochs: 1, lr: 0.001, trainable: head}]"],
                "parameters": {"train.stages.0.lr": {"values": [0.001, 0.01]}},
            }
        )
    )
    sweep = run_sweep(warm, log=quiet)
    rows = trial_rows(sweep.study())
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for r, lr in zip(rows, (0.001, 0.01), strict=True):
        config = yaml.safe_load((Path(r["run"]) / "config.yaml").read_text())
        assert config["model"]["init_from"] == str(wide.resolve())
        assert config["model"]["scratch"]["width"] == 12
        assert config["train"]["stages"][0]["lr"] == lr
        assert config["train"]["stages"][0]["trainable"] == "head"
        assert config["tags"] == {"sweep": "warm", "trial": str(r["number"])}


def test_random_points_are_seeded_and_a_longer_sweep_extends_a_shorter_one():
    def spec(trials, seed=0):
        return validate_sweep(
            {
                "method": "random",
                "trials": trials,
                "seed": seed,
                "id": "r",
                "parameters": {
                    "train.stages.0.lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
                    "train.batch_size": {"low": 4, "high": 64},
                    "model.head.hidden": {"values": [[], [16], [32, 16]]},
                },
            }
        )

    three = plan(spec(3))
    assert three == plan(spec(3)), "same seed, same points"
    assert plan(spec(5))[:3] == three
    assert plan(spec(3, seed=1)) != three
    assert [s.key for s in three] == ["r0", "r1", "r2"]
    for s in three:
        assert 1e-4 <= s.params["train.stages.0.lr"] <= 1e-1
        assert isinstance(s.params["train.batch_size"], int)
        assert s.params["model.head.hidden"] in ("[]", "[16]", "[32,16]")
    tree = base_tree(spec(3))
    config = trial_config(tree, spec(3), {"model.head.hidden": [32, 16]}, 7)
    assert config.model.head.hidden == [32, 16] and config.name == "r-t7"


def test_optuna_with_a_median_pruner_prunes_the_bad_trial(tmp_path, manifest):
    spec = write_sweep(
        tmp_path / "tpe.yaml",
        manifest,
        method="optuna",
        trials=2,
        metric="val_loss",
        pruner={"type": "median", "startup_trials": 1},
        parameters={"train.stages.0.lr": {"low": 1.0e-4, "high": 3.0, "log": True}},
        # A good point first, then one whose loss after one epoch is far above the median.
        enqueue=[{"train.stages.0.lr": 0.01}, {"train.stages.0.lr": 2.0}],
    )
    sweep = run_sweep(spec, log=quiet)
    study = sweep.study()
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    good, bad = study.get_trials()
    assert (good.state.name, bad.state.name) == ("COMPLETE", "PRUNED")
    assert bad.params == {"train.stages.0.lr": 2.0}
    summary = json.loads((Path(bad.user_attrs["run"]) / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["epochs"] == 1
    assert list(bad.intermediate_values) == [1]
    assert json.loads((Path(good.user_attrs["run"]) / "summary.json").read_text())["epochs"] == 2


def test_packaged_digits_heads_sweep_is_a_grid_of_8_that_runs(tmp_path, manifest):
    spec = load_sweep(config_path("sweep_digits_heads"))
    assert (spec.id, spec.method, len(plan(spec))) == ("digits-heads", "grid", 8)
    if "features" not in TrainConfig.model_fields:  # cached features are not wired in yet
        spec = spec.model_copy(
            update={"overrides": [o for o in spec.overrides if not o.startswith("train.features")]}
        )
    tree = base_tree(spec, [f"data.manifest={manifest}"])
    check_space(tree, spec)
    configs = [
        trial_config(tree, spec, decode(spec, s.params), i) for i, s in enumerate(plan(spec))
    ]
    assert all(c.model.name == "efficientnet_lite0" for c in configs)
    assert all(s.trainable == "head" for c in configs for s in c.train.stages)
    assert (
        len(
            {(c.model.head.pool, tuple(c.model.head.hidden), c.model.head.dropout) for c in configs}
        )
        == 8
    )
    # Run it with a scratch backbone (the packaged Lite0 is for the digits demo).
    scratch = [o for o in TINY if not o.startswith("train.stages")]
    own = tmp_path / "heads8.yaml"
    own.write_text(yaml.safe_dump({**spec.model_dump(mode="json"), "id": "heads8"}))
    run_sweep(own, [f"data.manifest={manifest}", *scratch, "train.stages.0.epochs=1"], log=quiet)
    runs = sweep_runs(tmp_path / "runs", "heads8")
    assert len(runs) == 8
    assert all(json.loads((r / "summary.json").read_text())["status"] == "completed" for r in runs)


def test_sweep_file_mistakes_are_named_with_the_fix(tmp_path, manifest):
    with pytest.raises(ImgclfError, match=r"methd: unknown key; did you mean method\?"):
        validate_sweep({"methd": "grid"})
    with pytest.raises(
        ImgclfError,
        match=r"model.head.pool.valuse: unknown key; did you mean "
        r"parameters.model.head.pool.values\?",
    ):
        validate_sweep({"parameters": {"model.head.pool": {"valuse": ["avg"]}}})
    with pytest.raises(ImgclfError, match="a grid needs values: for every parameter"):
        validate_sweep({"parameters": {"train.stages.0.lr": {"low": 0.1, "high": 1}}})
    with pytest.raises(ImgclfError, match="method random needs trials"):
        validate_sweep({"method": "random", "parameters": {"seed": {"values": [1, 2]}}})
    with pytest.raises(ImgclfError, match="did you mean val_accuracy"):
        validate_sweep({"metric": "val_acc", "parameters": {"seed": {"values": [1]}}})

    def opened(parameters):
        spec = write_sweep(tmp_path / "bad.yaml", manifest, parameters=parameters)
        return Sweep.open(load_sweep(spec))

    with pytest.raises(
        ImgclfError,
        match=r"model.head.pol is not a config key; did you mean "
        r"model.head.pool\?",
    ):
        opened({"model.head.pol": {"values": ["avg"]}})
    with pytest.raises(ImgclfError, match=r"train.stages.2.lr: train.stages has 1 item\(s\)"):
        opened({"train.stages.2.lr": {"values": [0.1]}})
    with pytest.raises(ImgclfError, match=r"model.head.pool"):
        opened({"model.head.pool": {"values": ["avg", "median"]}})  # not a pooling
    assert not (tmp_path / "runs").exists(), "nothing ran"
    r = imgclf("sweep", write_sweep(tmp_path / "bad.yaml", manifest, mehtod="grid"), cwd=tmp_path)
    assert r.returncode == 2 and "did you mean method?" in r.stderr
    r = imgclf("sweep", tmp_path / "nope.yaml", "--join", cwd=tmp_path)
    assert r.returncode == 2 and "nope.yaml does not exist" in r.stderr


CLAIMER = """
import json, sys
from imgclf.sweep.spec import load_sweep
from imgclf.sweep.study import Sweep, tell
sweep = Sweep.open(load_sweep(sys.argv[1]))
sweep.load()
claimed = []
while (got := sweep.claim()) is not None:
    study, trial, _ = got
    claimed.append(trial.number)
    tell(study, trial, values=0.0)
print(json.dumps(claimed))
"""


def test_parallel_claims_on_sqlite_take_each_trial_exactly_once(tmp_path):
    # Python's sqlite3 reads outside a transaction: without the claim lock, processes racing
    # for the queue claim the same trial (seen here in most runs of 3 × 60 claims).
    spec = tmp_path / "claims.yaml"
    spec.write_text(yaml.safe_dump({"parameters": {"seed": {"values": list(range(60))}}}))
    run_sweep(spec, workers=0, log=quiet)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(spec)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(3)
    ]
    claimed = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    numbers = sorted(n for c in claimed for n in c)
    assert numbers == list(range(60)), claimed


def test_join_needs_an_existing_study_and_a_changed_space_is_refused(tmp_path, manifest):
    spec = write_sweep(
        tmp_path / "s.yaml", manifest, parameters={"model.head.pool": {"values": ["avg", "max"]}}
    )
    with pytest.raises(ImgclfError, match="no sweep s in sqlite"):
        run_sweep(spec, join=True, log=quiet)
    run_sweep(spec, workers=0, log=quiet)  # queue only
    study = open_study("s", "runs")
    assert [t.state.name for t in study.get_trials()] == ["WAITING", "WAITING"]
    assert (sweep_folder("runs", "s") / "sweep.json").is_file()
    write_sweep(
        tmp_path / "s.yaml", manifest, parameters={"model.head.pool": {"values": ["avg", "avgmax"]}}
    )
    with pytest.raises(ImgclfError, match="another search space"):
        run_sweep(spec, log=quiet)
