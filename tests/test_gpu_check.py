"""benchmarks/gpu_check.py (`make gpu-check`) in its CPU smoke mode, so the GPU check cannot rot:
every path runs (or is skipped with its reason), and MLflow, Optuna, FastAPI and onnxruntime are
hidden from it and from the imgclf processes it starts, as on a GPU machine without them."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
HIDDEN = {"mlflow", "optuna", "fastapi", "onnxruntime"}
HIDDEN_ROWS = {"mlflow-mirror": "mlflow", "sweep-optuna": "optuna", "serve-fastapi": "fastapi",
               "export-onnx": "onnxruntime"}  # fmt: skip
PATHS = {
    "standard", "cache-memory-host", "cache-memory-device", "cache-disk-host",
    "bf16-channels-last", "fp32-contiguous", "compile", "kill-resume", "predict", "evaluate",
    "export-onnx", "torchrun-1", "fit", "mlflow-mirror", "sweep-optuna", "serve-fastapi",
    "tp-data", "tp-a", "tp-b", "tp-c", "tp-c-present", "tp-d", "tp-c-model2", "tp-d-model2",
}  # fmt: skip


def test_smoke_runs_every_path_without_the_optional_packages(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "IMGCLF_GPU_CHECK_HIDE": ",".join(sorted(HIDDEN))}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    record = json.loads(out.read_text())
    rows = {r["path"]: r for r in record["rows"]}
    assert set(rows) == PATHS and record["complete"] and not record["failed"]
    assert set(record["setup"]["hidden"]) == HIDDEN
    for path, row in rows.items():
        assert row["status"] in ("pass", "skipped"), (path, row.get("error"))
        assert row["status"] == "pass" or row["detail"], path  # a skip says why
    for path, package in HIDDEN_ROWS.items():
        assert rows[path]["status"] == "skipped", path
        assert f"{package} is not installed" in rows[path]["detail"]
    assert rows["compile"]["status"] == "skipped"  # too slow for a 2-core CPU (it says so)
    skipped = {p for p, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {*HIDDEN_ROWS, "compile"}
    # the printed tables: one row per path, then the throughput figures and the ratios
    assert "| path | what | status | s | detail |" in done.stdout
    assert all(f"| {path} |" in done.stdout for path in PATHS)
    assert "| pipeline | model | workers |" in done.stdout
    assert "b/a 0 workers:" in done.stdout and "c/d test_efficientnet:" in done.stdout
