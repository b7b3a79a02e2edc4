"""`imgclf predict`: inputs (files, folders, CSV lists, stdin), one row per file with a status,
CSV / JSON Lines output, top-k, and the same probabilities as the run's own predictor."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from imgclf.commands.predict import predict_files
from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.predict.inputs import expand, split_runs
from imgclf.predict.predictor import Predictor, load_predictor
from imgclf.workflows.training import train

import factory as fx


def train_tiny(tmp, data, size=32, seed=0, name="tiny"):
    """A 1-epoch scratch CNN; data=None reuses the manifest of an earlier call."""
    cfg = load_config(
        None,
        [
            f"data.root={data if data is not None else ''}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / 'manifest'}",
            "model.name=scratch_cnn",
            "model.pretrained=none",
            "model.scratch.blocks=2",
            "model.scratch.width=8",
            f"data.image_size={size}",
            "train.batch_size=8",
            "train.stages=[{epochs: 1, lr: 0.01}]",
            "tracking.mlflow=false",
            f"seed={seed}",
            f"name={name}",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=8, size=(40, 40))
    return train_tiny(tmp, data)


@pytest.fixture
def mixed(tmp_path):
    """Good and bad files, plus what a folder walk must skip."""
    d = tmp_path / "mixed"
    fx.write_jpeg(d / "good1.jpg", seed=1)
    fx.write_png(d / "sub" / "good2.png", seed=2)
    fx.write_truncated_jpeg(d / "truncated.jpg")
    fx.write_text_as_jpg(d / "text.jpg")
    fx.write_zero_byte(d / "zero.jpg")
    fx.write_bomb_png(d / "bomb.png")
    (d / ".DS_Store").write_bytes(b"junk")
    (d / "notes.txt").write_text("not an image")
    fx.write_jpeg(d / ".hidden" / "skip.jpg")
    fx.write_jpeg(d / "__MACOSX" / "skip.jpg")
    fx.write_jpeg(d / "._good1.jpg")
    return d


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_mixed_folder_one_row_per_file_with_status(run, mixed, tmp_path):
    out = tmp_path / "out.csv"
    predict_files([str(run), str(mixed)], out=out, top_k=2)
    rows = {os.path.relpath(r["path"], mixed): r for r in read_csv(out)}
    assert sorted(rows) == sorted(
        ["good1.jpg", "sub/good2.png", "truncated.jpg", "text.jpg", "zero.jpg", "bomb.png"]
    )
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {
        "good1.jpg": "ok",
        "sub/good2.png": "ok",
        "truncated.jpg": "error",
        "text.jpg": "error",
        "zero.jpg": "error",
        "bomb.png": "error",
    }
    assert rows["zero.jpg"]["reason"] == "empty file"
    assert rows["text.jpg"]["reason"].startswith("not an image")
    assert rows["truncated.jpg"]["reason"].startswith("truncated or corrupt")
    assert rows["bomb.png"]["reason"].startswith("over pixel cap")
    good = rows["good1.jpg"]
    assert good["predicted"] in ("a", "b", "c") and good["predicted"] == good["top1_label"]
    assert float(good["top1_prob"]) >= float(good["top2_prob"]) > 0
    assert "top3_label" not in good
    assert rows["bomb.png"]["predicted"] == "" and rows["bomb.png"]["top1_prob"] == ""


def test_predictions_equal_the_predictors_probabilities(run, tmp_path):
    data = fx.make_class_folder(tmp_path / "new", classes=("x", "y"), per_class=3, seed=7)
    rows = predict_files([str(run), str(data)], out=tmp_path / "p.csv", probs=True)
    paths = [r["path"] for r in rows]
    want = Predictor.from_run(run).predict_paths(paths, batch_size=4)
    got = torch.tensor([[r[f"p_{n}"] for n in ("a", "b", "c")] for r in rows])
    assert want.ok == list(range(len(paths)))
    assert torch.allclose(got.double(), want.probs.double(), atol=1e-7)
    # the CSV keeps 6 decimals of the same numbers
    written = read_csv(tmp_path / "p.csv")
    assert float(written[0]["p_b"]) == pytest.approx(float(want.probs[0, 1]), abs=5e-7)


def test_jsonl_output_csv_list_and_stdin(run, tmp_path):
    fx.write_jpeg(tmp_path / "imgs" / "one.jpg", seed=3)
    fx.write_png(tmp_path / "imgs" / "two.png", seed=4)
    listing = tmp_path / "list.csv"
    listing.write_text("\ufeffpath,label\nimgs/one.jpg,a\n\nimgs/missing.jpg,b\n", encoding="utf-8")
    stdin = io.StringIO(f"{tmp_path / 'imgs' / 'two.png'}\n\n")
    out = tmp_path / "out.jsonl"
    predict_files([str(run), str(listing), "-"], out=out, top_k=3, stdin=stdin)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [os.path.basename(r["path"]) for r in rows] == ["one.jpg", "missing.jpg", "two.png"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["reason"].startswith("unreadable") and rows[1]["probability"] is None
    probs = [rows[0][f"top{i}_prob"] for i in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-6)
    assert rows[0]["predicted"] == rows[0]["top1_label"]


def test_runs_and_inputs_are_told_apart(run, tmp_path):
    assert split_runs([str(run), str(run), "x.jpg", str(run)]) == (
        [str(run), str(run)],
        ["x.jpg", str(run)],
    )
    with pytest.raises(ImgclfError, match="not a run folder"):
        predict_files([str(tmp_path), "x.jpg"])
    with pytest.raises(ImgclfError, match="no inputs"):
        predict_files([str(run)])
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.jpg\n")
    with pytest.raises(ImgclfError, match="'path' column"):
        expand([str(bad)])
    with pytest.raises(ImgclfError, match="format"):
        predict_files([str(run), "x.jpg"], out=tmp_path / "out.txt")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ImgclfError, match=r"no image files .*1 not an image extension"):
        predict_files([str(run), str(tmp_path / "empty")])


def test_symlink_loop_is_listed_once(tmp_path):
    d = tmp_path / "d"
    fx.write_jpeg(d / "a.jpg")
    os.symlink(d, d / "loop")
    found = expand([str(d)])
    assert found.paths == [str(d / "a.jpg")]


def test_cli_in_a_subprocess_reads_stdin_and_writes_csv(run, tmp_path):
    fx.write_jpeg(tmp_path / "cat.jpg", seed=5)
    fx.write_zero_byte(tmp_path / "empty.jpg")
    r = subprocess.run(
        [sys.executable, "-m", "imgclf", "predict", str(run), "-", "--top-k", "1"],
        input=f"{tmp_path / 'cat.jpg'}\n{tmp_path / 'empty.jpg'}\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [r_["status"] for r_ in rows] == ["ok", "error"]
    assert list(rows[0]) == [
        "path",
        "predicted",
        "probability",
        "status",
        "reason",
        "top1_label",
        "top1_prob",
    ]
    assert "1 predicted, 1 failed (1 empty file)" in r.stderr


def test_load_predictor_opens_a_single_run(run):
    p = load_predictor(run)
    assert isinstance(p, Predictor) and p.labels == ["a", "b", "c"]


def test_the_predictor_runs_in_channels_last_with_the_contiguous_layouts_probabilities(run):
    """The layout training uses is faster to predict in on the CPU too; the probabilities are
    the contiguous model's up to summation order."""
    import torch

    p = Predictor.from_run(run)
    assert p.channels_last
    convs = [m.weight for m in p.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.rand(3, 3, 32, 32)
    got = p.predict_tensor(x)
    p.channels_last = False
    p.model = p.model.to(memory_format=torch.contiguous_format)
    assert torch.allclose(got, p.predict_tensor(x), atol=1e-5)


def test_predict_equals_evaluate_on_the_same_folder(run, tmp_path):
    from imgclf.evaluate.evaluate import evaluate_run

    data = fx.make_class_folder(tmp_path / "new", classes=("a", "c"), per_class=3, seed=11)
    fx.write_truncated_jpeg(data / "a" / "broken.jpg")
    result = evaluate_run(run, data=data, progress=False)
    evaluated = {r["path"]: r for r in read_csv(result.folder / "predictions.csv")}
    rows = predict_files([str(run), str(data)], probs=True)
    predicted = {os.path.relpath(r["path"], data): r for r in rows}
    assert sorted(evaluated) == sorted(predicted)
    for path, e in evaluated.items():
        p = predicted[path]
        assert (p["status"] == "ok") == bool(e["predicted"]), path
        if p["status"] == "ok":
            assert p["predicted"] == e["predicted"]
            for n in ("a", "b", "c"):
                assert p[f"p_{n}"] == pytest.approx(float(e[f"p_{n}"]), abs=5e-7)
    assert predicted["a/broken.jpg"]["reason"].startswith("truncated or corrupt")
