"""The leaderboard on real tiny run folders (completed, two-stage, diverged, interrupted) next to
foreign and half-written entries: rows, formats, sorting, --top, --where, and the CLI."""

import csv
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.runs.leaderboard import (
    collect,
    column_names,
    leaderboard,
    parse_where,
    read_run,
    sort_rows,
)
from imgclf.workflows.training import train

import factory as fx

TINY = [
    *fx.TINY_MODEL,
    "tracking.mlflow=false",
]


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test session and shared by the xdist workers (read-only use)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            (root / f"{name}.done").touch()
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder: 3 real runs, an interrupted copy, and things that are not runs."""
    root = shared_dir(tmp_path_factory, "leaderboard-runs", _build_runs)
    made = {k: root / "runs" / v for k, v in json.loads((root / "made.json").read_text()).items()}
    return root / "runs", made


def _build_runs(tmp: Path) -> None:
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=10, size=(40, 40))
    common = [f"data.root={data}", f"runs_dir={tmp / 'runs'}", f"data.manifest={tmp / 'm'}", *TINY]
    made = {}
    for name, extra in {
        "one": ["train.stages=[{epochs: 2, lr: 0.01}]", "train.augment.preset=light"],
        "two": [
            "train.stages=[{epochs: 1, lr: 0.02, trainable: head}, {epochs: 1, lr: 0.001}]",
            "train.imbalance=weighted_loss",
        ],
    }.items():
        cfg = load_config(None, [*common, f"name={name}", *extra])
        made[name] = train(cfg, progress=False, log=lambda *_: None)
    bad = [
        "name=boom",
        "train.stages=[{epochs: 2, lr: 1.0e+12, schedule: constant, optimizer: sgd}]",
    ]
    with pytest.raises(ImgclfError):
        train(load_config(None, [*common, *bad]), progress=False, log=lambda *_: None)
    root = tmp / "runs"
    made["boom"] = next(p for p in root.iterdir() if "boom" in p.name)
    # An interrupted run: a copy of a real one whose summary says so (the trainer's own Ctrl-C
    # path is tested with the trainer); its error text checks HTML escaping.
    stopped = root / "20990101-000000-stopped-scratch_cnn-aaaaaa"
    shutil.copytree(made["one"], stopped)
    summary = json.loads((stopped / "summary.json").read_text())
    summary.update(status="interrupted", error="<b>Ctrl-C</b> & saved", val={"val_accuracy": 0.25})
    (stopped / "summary.json").write_text(json.dumps(summary))
    made["stopped"] = stopped
    # An evaluation of run "two", as `imgclf evaluate` writes it.
    ev = made["two"] / "evaluations" / "test"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"summary": {"recall_weighted": 0.123}}))
    # Not runs: a plain file, a half-written folder, broken JSON, a foreign folder, the store.
    (root / "notes.txt").write_text("hello")
    (root / "half").mkdir()
    (root / "half" / "config.yaml").write_text((made["one"] / "config.yaml").read_text())
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text('{"status": "compl')
    (root / "broken" / "config.yaml").write_text("a: 1\n")
    (root / "photos").mkdir()
    (root / "odd").mkdir()
    (root / "odd" / "summary.json").write_text('{"status": "completed", "best": [1]}')
    (root / "odd" / "config.yaml").write_text("model: 5\ntrain: [1, 2]\n")
    (root / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    (root / ".DS_Store").write_bytes(b"\x00")
    (tmp / "made.json").write_text(json.dumps({k: v.name for k, v in made.items()}))


def by_id(rows):
    return {r["id"]: r for r in rows}


def test_rows_statuses_and_skipped_entries(runs):
    root, made = runs
    warnings = []
    rows = by_id(collect(root, warnings.append))
    assert set(rows) == {p.name for p in made.values()}
    assert [rows[made[k].name]["status"] for k in ("one", "two", "boom", "stopped")] == [
        "completed",
        "completed",
        "diverged",
        "interrupted",
    ]
    one = rows[made["one"].name]
    summary = json.loads((made["one"] / "summary.json").read_text())
    assert one["val_accuracy"] == summary["val"]["val_accuracy"]
    assert one["test_accuracy"] == summary["test"]["test_accuracy"]
    assert one["params_total"] == summary["params"]["total"] > 0
    assert one["optimizer_state"] == summary["params"]["optimizer_state"]
    assert one["best_epoch"] == summary["best"]["epoch"]
    assert (one["model"], one["weights"], one["trainable"]) == ("scratch_cnn", "none", "all")
    assert (one["image_size"], one["batch_size"], one["augment"]) == (32, 8, "light")
    assert one["stages"] == "2@0.01"
    two = rows[made["two"].name]
    assert two["stages"] == "1@0.02 head → 1@0.001 all"
    assert two["imbalance"] == "weighted_loss"
    assert two["test.recall_weighted"] == 0.123
    assert rows[made["boom"].name]["val_accuracy"] is None
    text = "\n".join(warnings)
    for name in ("notes.txt", "half", "broken", "photos", "odd"):
        assert f"{root / name}:" in text
    assert len(warnings) == 5  # mlflow.db and dotfiles are skipped quietly
    assert "no summary.json" in text and "unreadable summary.json" in text


def test_formats(runs):
    root, made = runs
    n = len(made)
    text, count = leaderboard(root, fmt="csv", warn=lambda m: None)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert count == len(rows) == n
    assert float(rows[0]["val_accuracy"]) == max(
        r["val_accuracy"] for r in collect(root, lambda m: None) if r["val_accuracy"] is not None
    )
    data = json.loads(leaderboard(root, fmt="json", warn=lambda m: None)[0])
    assert len(data) == n and {d["status"] for d in data} >= {"completed", "diverged"}
    md = leaderboard(root, fmt="markdown", warn=lambda m: None)[0].splitlines()
    assert len(md) == n + 2 and set(md[1].replace(" ", "")) == {"|", "-"}
    pipes = {line.replace("\\|", "").count("|") for line in md}
    assert pipes == {len(column_names(collect(root, lambda m: None))) + 1}
    page = leaderboard(root, fmt="html", warn=lambda m: None)[0]
    assert "&lt;b&gt;Ctrl-C&lt;/b&gt; &amp; saved" in page and "<b>Ctrl-C" not in page
    assert page.count("<tr>") == n + 1
    table = leaderboard(root, warn=lambda m: None)[0].splitlines()
    assert table[0].split()[:3] == ["id", "status", "model"] and len(table) == n + 2
    with pytest.raises(ImgclfError, match="unknown format"):
        leaderboard(root, fmt="xml", warn=lambda m: None)


def test_sorting_and_top(runs):
    root, made = runs
    rows = collect(root, lambda m: None)
    ranked = sort_rows(rows, "val_loss")
    losses = [r["val_loss"] for r in ranked if r["val_loss"] is not None]
    assert losses == sorted(losses) and ranked[-1]["val_loss"] is None  # ascending, missing last
    ranked = sort_rows(rows, "val_accuracy")
    accs = [r["val_accuracy"] for r in ranked if r["val_accuracy"] is not None]
    assert accs == sorted(accs, reverse=True) and ranked[-1]["id"] == made["boom"].name
    assert sort_rows(rows, "val_accuracy", "asc")[0]["val_accuracy"] == min(accs)
    assert sort_rows(rows, "params_total", "desc")[0]["params_total"] == max(
        r["params_total"] for r in rows
    )
    with pytest.raises(ImgclfError, match="not a column; choose one of: id, status"):
        sort_rows(rows, "val_acc")
    text, n = leaderboard(root, sort="test.recall_weighted", top=1, fmt="json", warn=print)
    assert n == 1 and json.loads(text)[0]["id"] == made["two"].name


def test_where_filters_safely(runs):
    root, made = runs
    rows = collect(root, lambda m: None)
    cols = column_names(rows)
    keep = parse_where("model == scratch_cnn and status != completed", cols)
    assert {r["id"] for r in rows if keep(r)} == {made["boom"].name, made["stopped"].name}
    keep = parse_where("val_accuracy <= 0.25 and stages = '2@0.01'", cols)
    assert [r["id"] for r in rows if keep(r)] == [made["stopped"].name]
    keep = parse_where('batch_size>=8 AND imbalance == "weighted_loss"', cols)
    assert [r["id"] for r in rows if keep(r)] == [made["two"].name]
    keep = parse_where("model == 3", cols)  # a number never equals a word
    assert not any(keep(r) for r in rows)
    with pytest.raises(ImgclfError, match=r"unknown column 'acc'; choose one of: id, status"):
        parse_where("acc > 0.5", cols)
    for bad in ("__import__('os').system('x')", "val_loss < 1 or 1", "val_loss < 1 and", ""):
        with pytest.raises(ImgclfError, match="--where"):
            parse_where(bad, cols)


def _old_run(made: Path, target: Path) -> Path:
    """A copy of a run as written before summary.json carried `config`."""
    shutil.copytree(made, target)
    summary = json.loads((target / "summary.json").read_text())
    del summary["config"]
    (target / "summary.json").write_text(json.dumps(summary))
    return target


def test_rows_come_from_summary_and_old_runs_from_config_yaml(tmp_path, runs):
    """New runs: the config values are in summary.json, config.yaml is not read. Old runs
    (no `config` in summary.json): the same row from config.yaml."""
    _, made = runs
    for key in ("one", "two"):
        summary = json.loads((made[key] / "summary.json").read_text())
        assert summary["config"]["model"]["name"] == "scratch_cnn"
        new = tmp_path / f"new-{key}"
        shutil.copytree(made[key], new)
        (new / "config.yaml").write_text("{{{ not yaml")  # never read
        old = _old_run(made[key], tmp_path / f"old-{key}")
        expected = read_run(made[key])
        assert {**read_run(new), "id": expected["id"]} == expected
        assert {**read_run(old), "id": expected["id"]} == expected
    row = read_run(tmp_path / "old-one")
    assert (row["model"], row["weights"], row["trainable"]) == ("scratch_cnn", "none", "all")
    assert (row["image_size"], row["batch_size"], row["augment"]) == (32, 8, "light")
    assert (row["stages"], read_run(tmp_path / "old-two")["stages"]) == (
        "2@0.01",
        "1@0.02 head → 1@0.001 all",
    )


def test_a_run_folder_written_before_issue_15_reads_as_before(tmp_path, runs):
    """Issue 15: run folders written before `runs/layout.py` (no `config` in summary.json) are
    still read by every reader: the run folder reader, the predictor (same probabilities as
    the folder's own copy) and the report page (same test accuracy)."""
    import torch

    from imgclf.evaluate.report import write_report
    from imgclf.predict.predictor import Predictor
    from imgclf.runs.layout import RunFolder

    _, made = runs
    old = _old_run(made["one"], tmp_path / "old-one")
    folder = RunFolder(old)
    assert folder.kind == "single" and "config" not in folder.summary()
    manifest = folder.manifest_dir()
    assert manifest == RunFolder(made["one"]).manifest_dir()
    images = sorted(Path(json.loads((old / "data.json").read_text())["root"]).rglob("*.png"))[:4]
    before = Predictor.from_run(made["one"]).predict_paths(images)
    after = Predictor.from_run(old).predict_paths(images)
    assert after.ok == before.ok and torch.equal(after.probs, before.probs)
    accuracy = json.loads((old / "summary.json").read_text())["test"]["test_accuracy"]
    page = write_report(old).read_text(encoding="utf-8")
    assert f"{accuracy:.4f}" in page or f"{accuracy:.3f}" in page or f"{accuracy:.1%}" in page


def test_hand_written_config_falls_back_to_pyyaml(tmp_path, runs):
    _, made = runs
    run = _old_run(made["one"], tmp_path / "runs" / "hand")
    (run / "config.yaml").write_text(
        "model: {name: resnet18, pretrained: hub}\ntrain:\n  batch_size: 4\n"
    )
    (row,) = collect(tmp_path / "runs", print)
    assert (row["model"], row["weights"], row["batch_size"]) == ("resnet18", "hub", 4)
    (run / "config.yaml").write_text("model: [unclosed\n")
    warnings = []
    assert collect(tmp_path / "runs", warnings.append) == []
    assert "unreadable config.yaml" in warnings[0]


def test_a_thousand_old_runs_list_quickly(tmp_path, runs):
    """Old run folders read config.yaml through PyYAML's safe loader: still fast."""
    import time

    _, made = runs
    root = tmp_path / "many"
    root.mkdir()
    old = _old_run(made["one"], tmp_path / "old")
    files = {n: (old / n).read_bytes() for n in ("summary.json", "config.yaml", "model.json")}
    for i in range(300):
        (root / f"run-{i:04d}").mkdir()
        for name, data in files.items():
            (root / f"run-{i:04d}" / name).write_bytes(data)
    start = time.perf_counter()
    assert len(collect(root, print)) == 300
    assert time.perf_counter() - start < 3  # ~0.25 s here (1000 old runs ~0.8 s, new ~0.06 s)


def test_cli_writes_file_and_warns(runs, tmp_path):
    root, made = runs
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = tmp_path / "board.json"
    cmd = [sys.executable, "-m", "imgclf", "leaderboard", "--runs", str(root), "--format", "json"]
    res = subprocess.run(
        [*cmd, "--where", "status == completed", "--sort", "val_loss", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert {d["id"] for d in data} == {made["one"].name, made["two"].name}
    assert "skipped" in res.stderr and "notes.txt" in res.stderr
    bad = subprocess.run([*cmd, "--where", "nope > 1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown column 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_sweep_filter_keeps_only_that_sweeps_trials(runs, tmp_path):
    _, made = runs
    root = tmp_path / "runs"
    for name, tag in (("t0", "heads"), ("t1", "heads"), ("other", "lrs")):
        copy = root / f"20990101-000000-{name}"
        shutil.copytree(made["one"], copy)
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps({**summary, "tags": {"sweep": tag}}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "imgclf", "leaderboard", "--runs", str(root), "-f", "json"]
    res = subprocess.run([*cmd, "--sweep", "heads"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sorted(r["id"] for r in rows) == ["20990101-000000-t0", "20990101-000000-t1"]
    assert {r["sweep"] for r in rows} == {"heads"}


def test_where_or_and_in(runs):
    root, made = runs
    rows = collect(root, lambda m: None)
    cols = column_names(rows)

    def ids(expr):
        keep = parse_where(expr, cols)
        return {r["id"] for r in rows if keep(r)}

    assert ids("status in (diverged, interrupted)") == {made["boom"].name, made["stopped"].name}
    assert ids("status not in ('completed')") == {made["boom"].name, made["stopped"].name}
    assert ids("status == diverged or imbalance == weighted_loss") == {
        made["boom"].name,
        made["two"].name,
    }
    # `and` binds before `or`: (diverged and scratch_cnn) or (val_accuracy <= 0.25)
    assert ids(
        "status == diverged and model == x or val_accuracy <= 0.25 OR batch_size IN [0]"
    ) == {made["stopped"].name}
    assert ids("batch_size in (8, 99)") == {r["id"] for r in rows if r["batch_size"] == 8}
    for bad in ("status in ()", "status in (a", "status == a or"):
        with pytest.raises(ImgclfError, match="--where"):
            parse_where(bad, cols)


def test_default_table_fits_120_columns_ids_are_never_cut_and_data_is_shown(runs, tmp_path):
    root, made = runs
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    long_id = "20260101-000000-a-very-long-experiment-name-scratch_cnn-abcdef"
    (copy / made["one"].name).rename(copy / long_id)
    data = json.loads((copy / made["two"].name / "data.json").read_text())
    data["data_hash"] = "f" * 64  # the same recipe on other data
    (copy / made["two"].name / "data.json").write_text(json.dumps(data))
    rows = by_id(collect(copy, lambda m: None))
    digest = json.loads((made["boom"] / "data.json").read_text())["data_hash"]
    assert (
        rows[made["boom"].name]["data"] == digest[:8] and rows[made["two"].name]["data"] == "f" * 8
    )
    table = leaderboard(root, warn=lambda m: None)[0]  # ids as `imgclf train` names them
    # 120 columns leave room for a model name 8 characters longer than scratch_cnn
    assert max(len(line) for line in table.splitlines()) <= 112, table
    table = leaderboard(copy, warn=lambda m: None)[0]
    head = ["id", "status", "model", "data", "val_accuracy", "test_accuracy"]
    assert table.splitlines()[0].split() == head
    assert long_id in table and "ffffffff" in table and digest[:8] in table
    wide = leaderboard(copy, warn=lambda m: None, wide=True)[0].splitlines()[0].split()
    assert {"val_loss", "params_total", "stages", "data"} <= set(wide)
    for fmt in ("markdown", "html", "csv", "json"):
        assert long_id in leaderboard(copy, fmt=fmt, warn=lambda m: None)[0], fmt
