"""`imgclf bench`: the loader table with its recommendation, the three training pipelines in one
run, and predictor throughput — on tiny generated data, through the CLI."""

import json

from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.workflows.training import train
from test_train import TINY, cfg_for

import factory as fx


def invoke(*args):
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_train_runs_the_three_pipelines_and_builds_the_cache_once(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=12, size=(40, 40))
    args = [*TINY, f"data.root={data}", f"data.manifest={tmp_path / 'm'}"]
    out = invoke("bench", "train", *args, "--steps", 3, "--warmup", 1)
    rows = {r["pipeline"]: r for r in out["rows"]}
    assert list(rows) == ["standard", "cached", "synthetic"]
    assert all(r["images_per_s"] > 0 and r["first_step_s"] > 0 for r in rows.values())
    assert rows["cached"]["cache_build_s"] > 0 and rows["standard"]["cache_build_s"] == 0
    assert rows["synthetic"]["of_limit"] == 1.0
    assert out["setup"]["batch_size"] == 8 and out["setup"]["precision"] == "32-true"
    assert out["setup"]["memory_format"] == "channels_last", "the default on the CPU too"
    again = invoke(
        "bench", "train", *args, "train.channels_last=false", "--steps", 2, "--warmup", 0,
        "--pipelines", "cached",
    )  # fmt: skip
    assert again["setup"]["memory_format"] == "contiguous"
    assert [r["pipeline"] for r in again["rows"]] == ["cached"]
    assert again["rows"][0]["cache_build_s"] == 0, "the second run reuses the cache entry"


def test_bench_loader_tries_each_worker_count_and_recommends_one(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=12, size=(40, 40))
    args = [data, *TINY, f"data.manifest={tmp_path / 'm'}"]  # DATA first, as data.root
    out = invoke("bench", "loader", *args, "--workers", "0,1", "--batches", 2)
    assert [r["workers"] for r in out["rows"]] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in out["rows"])
    best = max(out["rows"], key=lambda r: r["images_per_s"])
    assert out["recommended_workers"] in (0, best["workers"])


def test_bench_predict_counts_every_image(tmp_path):
    data = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=6, size=(40, 40))
    run = train(cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]"), progress=False,
                log=lambda *_: None)  # fmt: skip
    out = invoke("bench", "predict", run, data, "--batch-size", 4)
    assert out["images"] == 12 and out["images_per_s"] > 0


def test_the_recommendation_is_the_fewest_workers_within_5_percent_of_the_best():
    from imgclf.workflows.bench import recommend_workers

    rows = [{"workers": w, "images_per_s": r} for w, r in ((0, 100), (2, 191), (4, 200), (8, 198))]
    assert recommend_workers(rows) == 2
    rows[1]["images_per_s"] = 189
    assert recommend_workers(rows) == 4
