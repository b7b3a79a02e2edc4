"""The demo's recipes on the real digits, cut short: looser accuracy floors than `make demo`.

`make demo` runs the full recipes (test accuracy ≥ 0.95 for both, ≥ 0.975 for the better);
here the same configs train for a fraction of the epochs so the suite stays fast.
"""

import json

import pytest

from imgclf.config import load_config
from imgclf.configs import config_path
from imgclf.data.example import digits_folder
from imgclf.workflows.training import train


@pytest.mark.parametrize(
    ("recipe", "stages", "floor"),
    [
        ("digits_scratch", "[{epochs: 3, lr: 0.004, schedule: onecycle}]", 0.85),
        ("digits_lite0", "[{trainable: head, epochs: 2, lr: 0.01, schedule: cosine}]", 0.80),
    ],
)
def test_short_recipe_reaches_its_floor(tmp_path, recipe, stages, floor):
    overrides = [
        f"data.root={digits_folder()}",
        f"data.manifest={tmp_path / 'manifest'}",
        f"runs_dir={tmp_path / 'runs'}",
        f"train.stages={stages}",
        "tracking.mlflow=false",
    ]
    run = train(load_config(config_path(recipe), overrides), progress=False, log=lambda *_: None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test"]["test_accuracy"] >= floor, summary["test"]
