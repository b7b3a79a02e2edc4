"""Mirrors of a finished run folder (the source of truth) into MLflow and TensorBoard.

`mirror_run` copies a run into MLflow: the flattened resolved config as params, metrics.csv as
per-epoch metrics (step = epoch), the summary's final metrics, tags, and the small artefacts
(never the resumable checkpoint). The MLflow run is found again by its `imgclf.run_id` tag, so
mirroring twice updates one MLflow run instead of making two. Tracking never stops anything: a
failure is a warning and the run folder stays complete.

The default store is SQLite beside the runs (`<runs_dir>/mlflow.db`, artefacts in
`<runs_dir>/mlartifacts/`). MLflow creates a fresh SQLite store's schema on first connection,
and two processes doing that at once collide (docs/RELIABILITY.md F8), so every use of a SQLite
store here holds an exclusive `flock` on `.<db name>.lock` beside it: schema creation and each
mirror are serialised across processes, and "database is locked" from other writers is retried.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from imgclf.config import TrackingConfig
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_json
from imgclf.progress import Advance, progress_bar
from imgclf.runs.layout import (
    CONFIG_YAML,
    DATA_JSON,
    ENVIRONMENT_JSON,
    EVALUATIONS,
    METRICS_CSV,
    MODEL_JSON,
    MODEL_WEIGHTS,
    PLOTS,
    PREDICTIONS,
    SUMMARY_JSON,
    RunFolder,
)

STORE_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
TRACKING_JSON = "tracking.json"
RUN_ID_TAG = "imgclf.run_id"
ARTIFACT_FILES = (
    MODEL_JSON,
    MODEL_WEIGHTS,
    SUMMARY_JSON,
    METRICS_CSV,
    CONFIG_YAML,
    DATA_JSON,
    ENVIRONMENT_JSON,
    "report.html",
)
ARTIFACT_DIRS = (PLOTS, PREDICTIONS, EVALUATIONS)
# A pruned sweep trial stopped early on purpose: KILLED, as MLflow calls a run stopped by a user.
_STATUS = {
    "completed": "FINISHED",
    "pruned": "KILLED",
    "interrupted": "KILLED",
    "diverged": "FAILED",
}
_NOT_METRICS = {"stage", "stage_name", "epoch", "stage_epoch"}
LOCK_TIMEOUT_S = 600.0
# MLflow's own defaults retry an unreachable server for about 4 minutes; a training that has
# finished should not wait that long to say "tracking failed" (the user's settings win).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_RETRIES = 5

Log = Callable[..., Any]
# What a mirror waits for, shown one after another (importing MLflow alone takes seconds).
MIRROR_STEPS = (
    "MLflow: connecting to the store",
    "MLflow: finding or creating the run",
    "MLflow: logging params and metrics",
    "MLflow: uploading artefacts",
)


# MLflow 3 opens an experiment without this tag on its GenAI pages; ours is a runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _no_step(n: float = 1, description: str | None = None) -> None:
    return None


def store_uri(tracking: TrackingConfig, runs_dir: Path) -> str:
    """`tracking.uri`, or the SQLite store beside the runs."""
    return tracking.uri or f"sqlite:///{Path(runs_dir).resolve() / STORE_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?")[0]))


def mirror_run(
    run_path: Path,
    tracking: TrackingConfig,
    runs_dir: Path,
    log: Log = print,
    progress: bool = False,
) -> str | None:
    """Mirror a finished run folder to MLflow; the MLflow run id, or None (with a warning)."""
    if not tracking.mlflow:
        return None
    run_path = Path(run_path)
    uri = store_uri(tracking, runs_dir)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        record = _read_record(run_path)
        bar = progress_bar(f"MLflow: mirroring {run_path.name}", len(MIRROR_STEPS), progress)
        with bar as step, store_lock(uri), _env_defaults(HTTP_DEFAULTS):
            experiment_id, mlflow_id = _retrying(
                lambda: _mirror(record, uri, tracking.experiment, step)
            )
        atomic_write_json(
            run_path / TRACKING_JSON,
            {
                "mlflow_run_id": mlflow_id,
                "experiment_id": experiment_id,
                "experiment": tracking.experiment,
                "tracking_uri": _redacted(uri),
                "mirrored": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        return mlflow_id
    except Exception as e:  # tracking must never stop training or lose the run folder
        log(
            f"warning: MLflow tracking of {run_path.name} to {_redacted(uri)} failed "
            f"({type(e).__name__}: {_first_line(e)}); the run folder is complete — "
            f"mirror it later with `imgclf mirror {run_path}`"
        )
        return None


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables the user has not set, for the duration of the block."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive inter-process lock for a SQLite store (a no-op for servers)."""
    db = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the retries still apply
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a+b") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{db} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_store(uri: str) -> None:
    """Create the store's schema now (under the lock) so later users only read it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with store_lock(uri):
        _retrying(lambda: _client(uri))


class _Record:
    """What a run folder says, read once before the store is locked."""

    def __init__(self, path: Path) -> None:
        import yaml

        self.path = path
        self.summary = RunFolder(path).summary()
        self.config = yaml.safe_load((path / CONFIG_YAML).read_text(encoding="utf-8")) or {}
        self.id = str(self.summary.get("run_id") or path.name)
        self.rows = _read_csv(path / METRICS_CSV)
        self.start_ms = _start_ms(path)


def _read_record(path: Path) -> _Record:
    record = _Record(path)
    status = record.summary.get("status")
    if status not in _STATUS and status != "failed":
        raise ValueError(f"run status is {status!r}; only finished runs are mirrored")
    return record


def _client(uri: str):
    """A client of its own (no global MLflow state); a fresh store's schema is made quietly."""
    import logging

    from mlflow.tracking import MlflowClient

    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." is noise
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # connects, creating the schema if missing
        return client
    finally:
        logger.setLevel(level)


def _mirror(
    record: _Record, uri: str, experiment: str, step: Advance = _no_step
) -> tuple[str, str]:
    from mlflow.entities import Metric, Param, RunTag

    step(0, MIRROR_STEPS[0])
    client = _client(uri)
    step(1, MIRROR_STEPS[1])
    experiment_id = _experiment(client, uri, experiment)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{_quoted(record.id)}'"
    )
    summary = record.summary
    if found:
        mlflow_id, logged = found[0].info.run_id, found[0].data.params
    else:
        created = client.create_run(
            experiment_id,
            start_time=record.start_ms,
            tags={RUN_ID_TAG: record.id},
            run_name=record.id,
        )
        mlflow_id, logged = created.info.run_id, {}
    params = {k: v for k, v in flatten(record.config).items() if k not in logged}
    tags = {
        RUN_ID_TAG: record.id,
        "imgclf.status": str(summary.get("status")),
        "imgclf.model": str(summary.get("model") or _get(record.config, "model", "name")),
        "imgclf.pretrained": str(summary.get("pretrained")),
        "imgclf.path": str(record.path),
        "imgclf.error": str(summary.get("error") or ""),
    }
    metrics = _metrics(record)
    step(1, MIRROR_STEPS[2])
    _log_batches(
        client,
        mlflow_id,
        [Param(k, v) for k, v in params.items()],
        [Metric(k, v, ts, step) for k, v, ts, step in metrics],
        [RunTag(k, _truncate(v, 8000)) for k, v in tags.items()],
    )
    step(1, MIRROR_STEPS[3])
    for name in ARTIFACT_FILES:
        if (record.path / name).is_file():
            client.log_artifact(mlflow_id, str(record.path / name))
    for name in ARTIFACT_DIRS:
        if (record.path / name).is_dir() and any((record.path / name).iterdir()):
            client.log_artifacts(mlflow_id, str(record.path / name), artifact_path=name)
    end = record.start_ms + int(1000 * float(summary.get("train_seconds") or 0))
    client.set_terminated(mlflow_id, _STATUS.get(summary.get("status"), "FAILED"), end_time=end)
    step(1)
    return experiment_id, mlflow_id


def _experiment(client, uri: str, name: str) -> str:
    """The experiment's id, created on first use (artefacts beside a SQLite store)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(uri)
    location = (db.parent.resolve() / ARTIFACTS_DIR).as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # created meanwhile by another process talking to the same server
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_batches(client, run_id: str, params: list, metrics: list, tags: list) -> None:
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    client.log_batch(run_id, tags=tags)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → `a.b.0.c` keys with string values within MLflow's length limits."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if (isinstance(value, dict) and value) or (isinstance(value, list) and _has_dicts(value)):
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name[:MAX_ENTITY_KEY_LENGTH]] = _truncate(text, MAX_PARAM_VAL_LENGTH)
    return out


def _has_dicts(values: list) -> bool:
    return any(isinstance(v, dict) for v in values)


def _metrics(record: _Record) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step): per epoch, then the summary's final values.

    Timestamps come from the run's own clock (start + cumulative epoch seconds), so mirroring
    again logs identical points, which MLflow keeps once.
    """
    out, elapsed, epoch = [], 0.0, 0
    for row in record.rows:
        try:
            epoch = int(row["epoch"])
            elapsed += float(row.get("seconds") or 0)
        except (KeyError, ValueError):
            continue
        ts = record.start_ms + int(elapsed * 1000)
        out += [(k, v, ts, epoch) for k, v in _numbers(row).items() if k not in _NOT_METRICS]
    s = record.summary
    final_ts = record.start_ms + int(1000 * float(s.get("train_seconds") or elapsed))
    best = (s.get("best") or {}).get("epoch") or epoch
    final = {f"best_{k}": v for k, v in _numbers(s.get("val") or {}).items()}
    final |= _numbers(s.get("test") or {})
    final |= {f"params_{k}": v for k, v in _numbers(s.get("params") or {}).items()}
    final |= _numbers({k: s.get(k) for k in ("model_size_mb", "train_seconds", "images_per_s")})
    if (s.get("best") or {}).get("epoch") is not None:
        final["best_epoch"] = float(s["best"]["epoch"])
    out += [(k, v, final_ts, int(best)) for k, v in final.items()]
    return out


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or v is None or v == "":
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _start_ms(path: Path) -> int:
    """When the run started (environment.json), else when its config was written."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        env = json.loads((path / ENVIRONMENT_JSON).read_text(encoding="utf-8"))
        return int(datetime.strptime(env["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000)
    return int((path / CONFIG_YAML).stat().st_mtime * 1000)


def _retrying(fn: Callable[[], Any]) -> Any:
    """Retry on SQLite's "database is locked" (another writer outside our lock)."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except Exception as e:
            if "database is locked" not in str(e) or attempt == _RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def _get(tree: dict, *keys: str) -> Any:
    for k in keys:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _redacted(uri: str) -> str:
    """The URI without a password (it goes into logs and tracking.json)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def tensorboard_log(
    run_path: Path,
    history_rows: list[dict[str, Any]],
    images: Any = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    log: Log = print,
) -> Path | None:
    """Scalars per epoch, PR curves per class and an image grid into `run_path/tensorboard/`.

    `images`: a (N, 3, H, W) tensor of augmented training samples, normalised with `mean`/`std`
    (de-normalised for display) or, without them, rescaled per image.
    """
    folder = Path(run_path) / "tensorboard"
    try:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(folder)) as writer:
            last = _tb_scalars(writer, history_rows)
            for split in ("val", "test"):
                _tb_pr_curves(writer, Path(run_path) / "predictions" / f"{split}.csv", split, last)
            if images is not None:
                writer.add_image("augmented_train_samples", _grid(images, mean, std), last)
        return folder
    except Exception as e:
        log(f"warning: TensorBoard logging for {Path(run_path).name} failed: {_first_line(e)}")
        return None


def _tb_scalars(writer, rows: list[dict[str, Any]]) -> int:
    """`train_loss` → loss/train, `val_top5` → top5/val, others as they are; the last epoch."""
    last = 0
    for row in rows:
        try:
            last = int(float(row["epoch"]))
        except (KeyError, TypeError, ValueError):
            continue
        for key, value in _numbers(row).items():
            if key in _NOT_METRICS:
                continue
            split, _, name = key.partition("_")
            tag = f"{name}/{split}" if split in ("train", "val") and name else key
            writer.add_scalar(tag, value, last)
    return last


def _tb_pr_curves(writer, predictions_csv: Path, split: str, step: int) -> None:
    import numpy as np

    rows = [r for r in _read_csv(predictions_csv) if r.get("status") == "ok"]
    if not rows:
        return
    for column in (c for c in rows[0] if c.startswith("p_")):
        name = column[2:]
        truth = np.array([r["label"] == name for r in rows])
        probs = np.array([float(r[column]) for r in rows], dtype=np.float32)
        writer.add_pr_curve(f"pr_{split}/{name}", truth, probs, global_step=step)


def _grid(images, mean, std):
    import torch
    from torchvision.utils import make_grid

    x = torch.as_tensor(images).detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        x = x.clamp(0, 1)
    else:
        return make_grid(x, nrow=8, normalize=True, scale_each=True)
    return make_grid(x, nrow=8)


def start_ui(
    runs_dir: Path, uri: str | None = None, port: int = 5000, experiment: str = "imgclf"
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on the store, bound to 127.0.0.1; (process, URL of the runs table)."""
    if uri is None and not Path(runs_dir).is_dir():
        raise ImgclfError(f"runs folder {runs_dir} does not exist; pass --runs DIR (or --uri)")
    uri = uri or store_uri(TrackingConfig(), runs_dir)
    ensure_store(uri)  # create the schema under our lock, never racing a training
    experiment_id = ui_experiment(uri, experiment)
    db = sqlite_path(uri)
    artifacts = (db.parent if db else Path(runs_dir)).resolve() / ARTIFACTS_DIR
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--artifacts-destination",
        str(artifacts),
    ]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
    }
    # Its own session: the server's workers are stopped together, and only by us.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    return proc, ui_url(port, experiment_id)


def ui_url(port: int, experiment_id: str | None) -> str:
    """The experiment's runs table (MLflow 3's `/runs` tab), or the start page without one."""
    base = f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs" if experiment_id else base


def ui_experiment(uri: str, name: str) -> str | None:
    """The id of the experiment `name`, tagged as a model-training one; None if it is absent."""
    with store_lock(uri), _env_defaults(HTTP_DEFAULTS):
        client = _client(uri)
        found = client.get_experiment_by_name(name)
        if found is None:
            return None
        for key, value in EXPERIMENT_TAGS.items():
            if found.tags.get(key) != value:  # experiments made before the tag was set
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id


def stop_ui(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """Terminate the server and every process it started; its exit code."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def run_ui(
    runs_dir: Path,
    uri: str | None = None,
    port: int = 5000,
    log: Log = print,
    experiment: str = "imgclf",
) -> int:
    """`imgclf ui`: serve until Ctrl-C or SIGTERM, then stop the server and its workers."""
    # SIGTERM is caught before the server exists, so no signal can leave it running orphaned.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    proc = None
    try:
        proc, url = start_ui(runs_dir, uri, port, experiment)
        store = _redacted(uri or store_uri(TrackingConfig(), runs_dir))
        log(f"MLflow UI: {url}  (store {store}, server pid {proc.pid}; Ctrl-C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            stop_ui(proc)
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
