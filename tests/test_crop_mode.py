"""crop_mode "squash": the whole image resized to a square, chosen by `imgclf fit` for wide or
tall images, and carried from the run's config through model.json to every way a run predicts.
(That the CPU transform, the image cache and the ONNX preprocessing give the same squashed
pixels is tests/test_preprocessing_paths.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from imgclf.config import load_config
from imgclf.data.transforms import eval_transform
from imgclf.geometry import Preprocessing
from imgclf.predict.predictor import load_predictor
from imgclf.workflows import fit_plan

import factory as fx


def _manifest(shapes: list[tuple[int, int]]):
    entries = [
        SimpleNamespace(label="a", width=w, height=h, mode="RGB", path=f"a/{i}.png")
        for i, (w, h) in enumerate(shapes)
    ]
    return SimpleNamespace(
        split_entries=lambda split: entries if split == "train" else [],
        labels=SimpleNamespace(names=["a"]),
    )


def test_the_fit_squashes_when_a_tenth_of_the_images_are_elongated():
    square = fit_plan.profile_manifest(_manifest([(100, 100)] * 9 + [(130, 100)]))
    assert square.elongated == 0.1  # 1.3:1 counts, 1.2:1 and squares do not
    assert fit_plan.crop_mode(square)[0] == "squash"
    mostly = fit_plan.profile_manifest(_manifest([(100, 100)] * 19 + [(120, 100)] * 1))
    assert mostly.elongated == 0.0
    mode, why = fit_plan.crop_mode(mostly)
    assert mode == "center" and "0%" in why
    tall = fit_plan.profile_manifest(_manifest([(100, 150)] * 3 + [(100, 100)]))
    mode, why = fit_plan.crop_mode(tall)
    assert tall.elongated == 0.75 and mode == "squash" and "75%" in why and "cut" in why


def test_a_run_trained_squashed_predicts_squashed(tmp_path):
    from imgclf.workflows.training import train

    data = fx.make_class_folder(tmp_path / "wide", per_class=4, size=(72, 24))
    for cache in ("memory", "none"):  # the cached batch path and the CPU transforms
        cfg = load_config(
            None,
            [
                f"data.root={data}",
                f"runs_dir={tmp_path / 'runs'}",
                f"data.manifest={tmp_path / 'manifest'}",
                *fx.TINY_MODEL,
                "tracking.mlflow=false",
                "train.stages=[{epochs: 1}]",
                "data.crop_mode=squash",
                f"data.cache={cache}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"name=squash-{cache}",
            ],
        )
        run = train(cfg, progress=False, log=lambda *_: None)
        meta = json.loads((run / "model.json").read_text())
        assert meta["preprocessing"]["crop_mode"] == "squash", cache
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        predictor = load_predictor(run)
        assert predictor.preprocessing.crop_mode == "squash"
        image = Image.open(next((data / "cat").iterdir())).convert("RGB")
        pre = Preprocessing.from_dict(meta["preprocessing"])
        expected = eval_transform(pre)(image)
        torch.testing.assert_close(predictor.transform()(image), expected)
        # ... which is not the centre crop of the same model
        centre = eval_transform(Preprocessing(**{**pre.__dict__, "crop_mode": "center"}))(image)
        assert not np.allclose(centre.numpy(), expected.numpy())
