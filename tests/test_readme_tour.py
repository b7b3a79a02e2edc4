"""README's "A five-minute tour", run as written so README and behaviour cannot drift.

The commands are read from the tour's bash block(s) (the section up to its first `###`
subsection); the run config is the README's own example YAML. Only the data is tiny: a generated
`data/garbage` folder, `/data/cars` and `labels.csv`, and toy sizes appended to `lr-find` and
`train` as key=value overrides. A command that cannot run here is skipped by name, with the
reason printed; any other command that fails fails the test.
"""

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

import factory as fx

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = {"source": "activates .venv; the test runs this interpreter's imgclf directly"}
TOY = [
    "data.image_size=32",
    "train.batch_size=8",
    "tracking.mlflow=false",
    "train.stages.0.epochs=1",
]
CLASSES = ("glass", "paper", "plastic")


def tour_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## A five-minute tour")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return section.split("\n### ", 1)[0]


def tour_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", tour_section(), flags=re.S)
    assert blocks, "README.md: no ```bash block in the tour"
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


def example_config() -> str:
    text = README.read_text(encoding="utf-8")
    after = text[text.index("A run config, for example") :]
    return re.search(r"```yaml\n(.*?)```", after, flags=re.S).group(1)


def make_data(tmp: Path) -> None:
    fx.make_class_folder(tmp / "data" / "garbage", CLASSES, per_class=8, size=(40, 40))
    fx.make_class_folder(tmp / "data" / "photos", ("cat", "dog"), per_class=10, size=(40, 40))
    cars = fx.make_class_folder(tmp / "data" / "cars", ("sedan", "suv"), per_class=4)
    with open(tmp / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([p.relative_to(cars).as_posix(), p.parent.name] for p in cars.rglob("*.png"))
    (tmp / "classes.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    (tmp / "run.yaml").write_text(example_config())


def concrete(argv: list[str], tmp: Path, last_run: str | None) -> list[str]:
    """The tour's placeholders made real; toy sizes for the commands that train."""
    out = [a.replace("/data/cars", str(tmp / "data" / "cars")) for a in argv]
    if "runs/<id>" in out:
        assert last_run, "the tour resumes a run before training one"
        out = [last_run if a == "runs/<id>" else a for a in out]
    elif out[1] == "fit":  # a budget the test can wait for, a scratch CNN, no MLflow
        out = [a for a in out if a not in ("--time", "10m")]
        out += ["--time", "30s", "--models", "scratch_small", "--no-mlflow"]
    elif out[1] in ("train", "lr-find"):
        stages = len(yaml.safe_load(example_config())["train"]["stages"])
        uses_file = out[2] == "run.yaml"
        # Later stages get 2 epochs: the example's fine-tuning stage warms up for 1.
        out += TOY + ([f"train.stages.{i}.epochs=2" for i in range(1, stages)] if uses_file else [])
        if "--epochs" in out:  # the command's own --epochs stays as written
            out.remove("train.stages.0.epochs=1")
    return out


def test_the_readme_tour_runs_as_written(tmp_path):
    make_data(tmp_path)
    env = {**os.environ, "COLUMNS": "200"}
    ran, last_run = [], None
    for argv in tour_commands():
        if argv[0] in SKIP:
            print(f"skipped: {shlex.join(argv)} ({SKIP[argv[0]]})")
            continue
        assert argv[0] == "imgclf", f"README tour: unknown command {shlex.join(argv)}"
        cmd = concrete(argv, tmp_path, last_run)
        full = [sys.executable, "-m", "imgclf", *cmd[1:]]
        if cmd[1] in ("scan", "train", "fit"):  # progress bars off; nothing else changes
            full.append("--no-progress")
        r = subprocess.run(full, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"README tour: `{shlex.join(argv)}` failed:\n{r.stdout}{r.stderr}"
        if m := re.search(r"run folder: (\S+)", r.stdout):
            last_run = m.group(1)
        ran.append(cmd[1])
    assert {"fit", "scan", "split", "config", "models", "lr-find", "train"} <= set(ran)
    assert last_run is not None
