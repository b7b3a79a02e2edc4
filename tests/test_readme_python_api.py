"""The README's Python examples, run (or validated) as written there, so they cannot drift."""

import re
from pathlib import Path

import yaml

from imgclf.sweep.spec import validate_sweep

README = Path(__file__).parents[1] / "README.md"


def _block(after_heading: str, lang: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after_heading) :]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S)[1]


def test_the_python_training_example_runs_as_written(capsys):
    code = _block("## Training from Python", "python")
    exec(compile(code, "README.md: Training from Python", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    status, accuracy = out[-2].split()
    assert status == "completed" and 0.0 <= float(accuracy) <= 1.0
    assert out[-1].startswith("[") and out[-1].count("digit_") == 4
    (run,) = [p for p in Path("runs").iterdir() if (p / "summary.json").is_file()]
    assert (run / "predictions" / "test.csv").is_file()


def test_the_sweep_file_example_is_a_valid_sweep():
    spec = validate_sweep(yaml.safe_load(_block("### The sweep file", "yaml")), "README.md")
    assert spec.method == "random" and spec.trials == 6
    assert spec.parameters["train.stages.0.lr"].log
    assert spec.pruner.type == "median"
