"""Hostile files and careless use at the file system and the CLI (issue 13): names that are not
UTF-8, FIFOs and sockets, CSV rows leading out of the data root through links, `-o -`, the
minimum side at prediction, the predict summary, dead runs on the leaderboard, the scan
report's notes and torch's unsafe advice. Each docstring names its row of docs/RELIABILITY.md."""

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from imgclf.config import ScanConfig, load_config
from imgclf.data import scan as scan_module
from imgclf.data.images import ImageLoadError, check_image, load_image, probe
from imgclf.data.manifest import read_manifest
from imgclf.data.scan import REPORT_JSON, scan_to
from imgclf.errors import ImgclfError
from imgclf.runs.leaderboard import collect
from imgclf.workflows.training import train

import factory as fx

CFG = ScanConfig(workers=1)
BAD = b"bad_\xff\xfe.png"  # not UTF-8: an old disk's Latin-1 name
BAD_SHOWN = "bad_\\xff\\xfe.png"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def fingerprint(root: Path) -> dict[bytes, str]:
    """Every entry under root by its byte name: file digests, FIFOs and sockets by kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest() + f":{st.st_mtime_ns}"
            else:
                out[p] = f"{stat.S_IFMT(st.st_mode)}:{st.st_mtime_ns}"
    return out


def write_bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_socket(path: Path) -> socket.socket:
    """A Unix socket file at `path` (bound through a short relative name: AF_UNIX paths are
    limited to ~107 bytes)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path.name)
    finally:
        os.chdir(here)
    return s


def release(fifo: Path) -> None:
    """Unblock whatever is stuck opening `fifo` for reading (only after a failure)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def run_cli(args: list[str], cwd: Path, fifos: list[Path], timeout: int = 120):
    """`imgclf ARGS` in a subprocess that must finish; a hang fails instead of blocking."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="backslashreplace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for fifo in fifos:
            release(fifo)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"imgclf {' '.join(args)} hung (a FIFO was opened?)")
    return proc.returncode, out, err


def never_blocks(fn, fifo: Path):
    """fn() on a thread; it must return (or raise) within seconds, never block on `fifo`."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        release(fifo)
        t.join(5)
        pytest.fail("blocked opening a FIFO")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch tiny scratch CNN on 3 classes of 40-px images."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = fx.make_class_folder(tmp / "data", classes=("a", "b", "c"), per_class=8, size=(40, 40))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / 'manifest'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 1, lr: 0.01}]",
            "tracking.mlflow=false",
            "name=hostile",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


# ---------------------------------------------------------------- names that are not UTF-8


def test_scan_skips_names_that_are_not_utf8_and_writes_everything(tmp_path):
    """RELIABILITY 31: file and folder names that are not UTF-8 are skipped with a reason and
    shown escaped; manifest.csv, manifest.json and the report are written; nothing is modified."""
    root = fx.make_class_folder(tmp_path / "data", per_class=3)
    write_bytes_name(root / "cat", BAD, (root / "cat" / "cat_0.png").read_bytes())
    write_bytes_name(root / "dog", b"notes_\xff.txt", b"not an image")  # ignored, not skipped
    class_bad = os.path.join(os.fsencode(root), b"caf\xe9")  # a Latin-1 class folder
    os.mkdir(class_bad)
    write_bytes_name(
        Path(os.fsdecode(class_bad)), b"x.png", (root / "dog" / "dog_0.png").read_bytes()
    )
    before = fingerprint(root)

    m = scan_to(root, tmp_path / "m", CFG, progress=False)

    assert fingerprint(root) == before, "scan modified the user's folder"
    rows = {e.path: e for e in read_manifest(tmp_path / "m").entries}
    assert rows[f"cat/{BAD_SHOWN}"].status == "skipped"
    assert rows[f"cat/{BAD_SHOWN}"].reason.startswith("file name is not valid UTF-8")
    assert rows["caf\\xe9/"].status == "skipped"  # the folder: neither walked nor a class
    assert rows["dog/notes_\\xff.txt"].status == "ignored"
    assert m.usable and m.labels.names == ("cat", "dog", "fish")
    report = json.loads((tmp_path / "m" / REPORT_JSON).read_text(encoding="utf-8"))
    assert sorted(report["skipped_by_reason"]["file name is not valid UTF-8"]) == [
        "caf\\xe9/",
        f"cat/{BAD_SHOWN}",
    ]
    # A rescan reads the manifest it wrote back (the names are plain UTF-8 text now).
    assert scan_to(root, tmp_path / "m", CFG, progress=False).report["files"]["ok"] == 9


def test_names_with_a_carriage_return_keep_every_csv_whole(run, tmp_path):
    """RELIABILITY 31 (found by the fuzz test): a carriage return in a name (macOS "Icon\\r"
    files) split manifest.csv rows, since the csv module does not quote it; such names are
    shown as \\r and skipped (or ignored), at scan and at predict."""
    from imgclf.commands.predict import predict_files

    root = fx.make_class_folder(tmp_path / "data", per_class=3)
    (root / "cat" / "Icon\r").write_bytes(b"")
    shutil.copy(root / "cat" / "cat_0.png", root / "cat" / "photo\r.png")
    m = scan_to(root, tmp_path / "m", CFG, progress=False)
    rows = {e.path: e for e in read_manifest(tmp_path / "m").entries}
    assert len(rows) == len(m.entries) == 11
    assert rows["cat/Icon\\r"].status == "ignored"
    assert rows["cat/photo\\r.png"].reason.startswith("file name holds a carriage return")
    out = tmp_path / "p.csv"
    predict_files([str(run), str(root / "cat")], out=out)
    got = read_rows(out.read_text(encoding="utf-8"))
    assert len(got) == 4
    assert got[str(root / "cat" / "photo\\r.png")]["status"] == "error"


def test_scan_cli_with_a_bad_name_finishes(tmp_path):
    """RELIABILITY 31: the reported crash (`imgclf scan` → UnicodeEncodeError) is gone."""
    root = fx.make_class_folder(tmp_path / "data", per_class=3)
    write_bytes_name(root / "cat", BAD, (root / "cat" / "cat_0.png").read_bytes())
    rc, out, err = run_cli(["scan", "data", "-o", "m", "--no-progress"], tmp_path, [])
    assert rc == 0, err
    assert "file name is not valid UTF-8" in out
    assert (tmp_path / "m" / "manifest.json").is_file()


def test_a_data_root_whose_name_is_not_utf8_is_a_clear_error(tmp_path):
    """RELIABILITY 31: the root itself is stored in the manifest, so it must be text."""
    root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xffata")))
    fx.make_class_folder(root, per_class=2)
    with pytest.raises(
        ImgclfError, match=r"d\\xffata cannot be stored in a manifest: file name is not valid"
    ):
        scan_to(root, tmp_path / "m", CFG, progress=False)


# ---------------------------------------------------------------- FIFOs, sockets


def test_image_loader_never_opens_a_fifo(tmp_path):
    """RELIABILITY 32: the one image loader refuses non-regular files from their stat alone."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for fn in (load_image, probe, check_image):
        result = never_blocks(lambda fn=fn: fn(fifo), fifo)
        err = result.get("error")
        assert isinstance(err, ImageLoadError), result
        assert (err.kind, err.detail) == ("not a regular file", "FIFO")
    sock = make_socket(tmp_path / "sock.png")
    with sock, pytest.raises(ImageLoadError, match=r"not a regular file \(socket\)"):
        load_image(tmp_path / "sock.png")
    with pytest.raises(ImageLoadError, match=r"unreadable \(Is a directory\)"):
        load_image(tmp_path)  # as before: a folder is not a special file


def test_scan_skips_fifos_and_sockets_in_parallel_and_in_process(tmp_path):
    """RELIABILITY 32: scan (with its worker pool) skips FIFOs and sockets, never opens them."""
    root = fx.make_class_folder(tmp_path / "data", per_class=24, size=(16, 16))  # 72: a pool
    fifo = root / "cat" / "pipe.png"
    os.mkfifo(fifo)
    sock = make_socket(root / "dog" / "sock.jpg")
    before = fingerprint(root)
    with sock:
        rc, _, err = run_cli(
            ["scan", "data", "-o", "m", "--no-progress", "data.scan.workers=2"], tmp_path, [fifo]
        )
        assert rc == 0, err
        rows = {e.path: e for e in read_manifest(tmp_path / "m").entries}
        assert rows["cat/pipe.png"].reason == "not a regular file: FIFO"
        assert rows["dog/sock.jpg"].reason == "not a regular file: socket"
        assert sum(e.ok for e in rows.values()) == 72
        m = never_blocks(lambda: scan_to(root, tmp_path / "m1", CFG, progress=False), fifo)
        assert m["value"].report["skipped_by_reason"]["not a regular file"] == [
            "cat/pipe.png",
            "dog/sock.jpg",
        ]
    assert fingerprint(root) == before


def test_a_file_replaced_by_a_fifo_after_the_stat_is_still_not_opened(tmp_path):
    """RELIABILITY 32: the worker re-checks: a FIFO swapped in after discovery never blocks."""
    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    result = never_blocks(lambda: scan_module.check_file((str(fifo), 10**8, 8)), fifo)
    assert result["value"] == {"status": "skipped", "reason": "not a regular file: FIFO"}


def test_scan_pool_workers_die_with_the_command(tmp_path, monkeypatch):
    """RELIABILITY 32: no pool worker outlives its command, even after kill -9 of the command."""
    script = (
        "import os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from imgclf.files import die_with_parent\n"
        "pool = ProcessPoolExecutor(1, initializer=die_with_parent, initargs=(os.getpid(),))\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker), "the pool worker outlived its killed parent"

    # scan's own pool is made that way.
    made = []

    class Spy(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scan_module, "ProcessPoolExecutor", Spy)
    root = fx.make_class_folder(tmp_path / "data", per_class=22, size=(16, 16))
    scan_to(root, tmp_path / "m", ScanConfig(workers=2), progress=False)
    assert made and made[0]["initializer"].__name__ == "die_with_parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie waits for its reaper: it runs nothing


# ---------------------------------------------------------------- CSV rows leaving the root


def test_csv_rows_that_resolve_outside_the_root_are_refused_by_line(tmp_path):
    """RELIABILITY 33: a CSV row naming a symlink (or a path through a linked folder) that
    resolves outside the data root is an error citing the line, as folder mode refuses it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    fx.write_png(root / "a" / "real.png", seed=1)
    fx.write_png(root / "b" / "real.png", seed=2)
    fx.write_png(outside / "x.png", seed=3)
    fx.write_png(outside / "sub" / "y.png", seed=4)
    os.symlink(outside / "x.png", root / "a" / "escape.png")
    os.symlink(outside / "sub", root / "linked")
    os.symlink(root / "b" / "real.png", root / "a" / "inside.png")  # stays inside: fine
    rows = [
        "path,label",
        "a/real.png,a",
        "a/escape.png,a",
        "linked/y.png,b",
        "a/inside.png,b",
        "b/real.png,b",
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")

    m = scan_to(root / "labels.csv", tmp_path / "m", CFG, progress=False)

    errors = "\n".join(m.errors)
    assert "labels.csv:3: a/escape.png resolves through a symlink" in errors
    assert "labels.csv:4: linked/y.png resolves through a symlink" in errors
    assert "outside the data root" in errors and "labels.csv:5" not in errors
    assert not m.usable
    assert {e.path for e in m.entries} == {"a/real.png", "a/inside.png", "b/real.png"}
    allowed = ScanConfig(workers=1, follow_symlinks="all")
    m = scan_to(root / "labels.csv", tmp_path / "m2", allowed, progress=False)
    assert not m.errors and len(m.ok_entries) == 5


def test_csv_row_naming_a_fifo_is_skipped_not_opened(tmp_path):
    """RELIABILITY 32 in CSV mode: a FIFO row is skipped with its reason (not 'not found')."""
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    os.mkfifo(root / "a" / "pipe.png")
    (root / "list.csv").write_text("path,label\na/a_0.png,a\na/pipe.png,a\nb/b_0.png,b\n")
    got = never_blocks(
        lambda: scan_to(root / "list.csv", tmp_path / "m", CFG, progress=False),
        root / "a" / "pipe.png",
    )
    m = got["value"]
    assert not m.errors
    assert {e.path: e.reason for e in m.entries if not e.ok} == {
        "a/pipe.png": "not a regular file: FIFO"
    }


# ---------------------------------------------------------------- predict


def read_rows(text: str) -> dict[str, dict]:
    return {r["path"]: r for r in csv.DictReader(io.StringIO(text))}


def test_predict_reports_bad_names_and_fifos_and_writes_its_output(run, tmp_path):
    """RELIABILITY 31, 32: predict finishes, with a row and a reason for each such file, the
    CSV written, and on stderr how many failed."""
    d = tmp_path / "in"
    fx.write_png(d / "good.png", size=(40, 40), seed=1)
    write_bytes_name(d, BAD, (d / "good.png").read_bytes())
    os.mkfifo(d / "pipe.jpg")
    before = fingerprint(d)
    rc, _, err = run_cli(
        ["predict", str(run), "in", "-o", "out.csv", "--workers", "1"], tmp_path, [d / "pipe.jpg"]
    )
    assert rc == 0, err
    rows = read_rows((tmp_path / "out.csv").read_text(encoding="utf-8"))
    assert rows["in/good.png"]["status"] == "ok"
    assert rows[f"in/{BAD_SHOWN}"]["status"] == "error"
    assert rows[f"in/{BAD_SHOWN}"]["reason"].startswith("file name is not valid UTF-8")
    assert rows["in/pipe.jpg"]["reason"] == "not a regular file (FIFO)"
    assert "1 predicted, 2 failed (" in err and "1 not a regular file" in err
    assert fingerprint(d) == before


def test_predict_reads_names_that_are_not_utf8_from_stdin(run, tmp_path):
    """RELIABILITY 31: a path list on standard input with such a name is not a crash."""
    fx.write_png(tmp_path / "ok.png", size=(40, 40))
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf", "predict", str(run), "-", "--top-k", "1"],
        input=b"ok.png\n" + BAD + b"\n",
        capture_output=True,
        cwd=tmp_path,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(proc.stdout.decode("utf-8"))
    assert rows["ok.png"]["status"] == "ok" and rows[BAD_SHOWN]["status"] == "error"


def test_predict_dash_o_writes_to_stdout(run, tmp_path, capsys):
    """`-o -` is standard output, never a file named '-' (issue 13)."""
    from imgclf.commands.predict import predict_files

    image = fx.write_png(tmp_path / "x.png", size=(40, 40))
    predict_files([str(run), str(image)], out=Path("-"))
    assert read_rows(capsys.readouterr().out)[str(image)]["status"] == "ok"
    predict_files([str(run), str(image)], out=Path("-"), fmt="jsonl")
    assert json.loads(capsys.readouterr().out)["path"] == str(image)
    assert not (tmp_path / "-").exists()


def test_predict_refuses_images_under_scans_minimum_side(run, tmp_path):
    """RELIABILITY 12: one minimum side everywhere: predict refuses what scan refused (the
    run's data.scan.min_side, default 8), and takes what scan took."""
    from imgclf.commands.predict import predict_files

    tiny = fx.write_tiny_png(tmp_path / "tiny.png", size=(3, 3))
    small = fx.write_tiny_png(tmp_path / "small.png", size=(8, 8))
    rows = {
        r["path"]: r
        for r in predict_files([str(run), str(tiny), str(small)], out=tmp_path / "o.csv")
    }
    assert rows[str(tiny)]["status"] == "error"
    assert rows[str(tiny)]["reason"] == "too small (3x3, minimum side 8)"
    assert rows[str(small)]["status"] == "ok"
    # A run whose data allowed 2-px images predicts them too.
    lenient = tmp_path / "lenient"
    shutil.copytree(run, lenient)
    config = (lenient / "config.yaml").read_text()
    assert "min_side: 8" in config
    (lenient / "config.yaml").write_text(config.replace("min_side: 8", "min_side: 2"))
    rows = predict_files([str(lenient), str(tiny)], out=tmp_path / "o2.csv")
    assert rows[0]["status"] == "ok"


def test_predict_says_on_stderr_how_many_failed(run, tmp_path, capsys):
    """RELIABILITY 1–3: predict exits 0 with failed files, and stderr counts them by reason."""
    from imgclf.commands.predict import predict

    fx.write_png(tmp_path / "in" / "good.png", size=(40, 40))
    fx.write_truncated_jpeg(tmp_path / "in" / "cut.jpg")
    fx.write_zero_byte(tmp_path / "in" / "zero.jpg")
    (tmp_path / "in" / "notes.txt").write_text("x")
    predict([str(run), str(tmp_path / "in")], out=tmp_path / "o.csv", progress=False)
    err = capsys.readouterr().err
    assert "skipped inside folders: 1 not an image extension (.txt)" in err
    assert "1 predicted, 2 failed (1 empty file, 1 truncated or corrupt)" in err


# ---------------------------------------------------------------- leaderboard


def test_leaderboard_shows_a_killed_run_as_dead(run, tmp_path):
    """RELIABILITY F1: a run killed with kill -9 is shown `dead`, not `running` forever; the run
    folder is not modified; a live owner still shows `running`."""
    runs = tmp_path / "runs"
    killed, alive, elsewhere = (
        runs / f"2099010{i}-000000-x-scratch_cnn-00000{i}" for i in (1, 2, 3)
    )
    for folder in (killed, alive, elsewhere):
        shutil.copytree(run, folder)
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    # The killed one: its owner took the real lock, then died by SIGKILL.
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom imgclf.runs.record import RunDir\n"
        "with RunDir.open(Path(sys.argv[1])).lock():\n"
        "    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(killed)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert owner.stdout.readline().strip() == "locked"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(1.1)  # the lock file is older than anything started from now on
    (alive / ".lock").write_text(f"pid {os.getpid()} on {platform.node()}")
    (elsewhere / ".lock").write_text(f"pid {owner.pid} on another-host.example")
    before = {f: fingerprint(f) for f in (killed, alive, elsewhere)}

    rows = {r["id"]: r for r in collect(runs, warn=lambda _: None)}

    assert rows[killed.name]["status"] == "dead"
    assert f"pid {owner.pid}" in rows[killed.name]["error"]
    assert "imgclf train --resume" in rows[killed.name]["error"]
    assert rows[alive.name]["status"] == "running"
    assert rows[elsewhere.name]["status"] == "running"  # another host: cannot tell
    assert {f: fingerprint(f) for f in (killed, alive, elsewhere)} == before


def test_a_reused_pid_does_not_keep_a_dead_run_running(run, tmp_path):
    """RELIABILITY F1: the lock names a pid that now belongs to a process started later."""
    folder = tmp_path / "runs" / "20990101-000000-x-scratch_cnn-000009"
    shutil.copytree(run, folder)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    (folder / ".lock").write_text(f"pid {os.getpid()} on {platform.node()}")
    old = time.time() - 10 * 24 * 3600
    os.utime(folder / ".lock", (old, old))  # written long before this process started
    (row,) = collect(tmp_path / "runs", warn=lambda _: None)
    assert row["status"] == "dead"


# ---------------------------------------------------------------- reports and messages


def test_scan_report_keeps_the_numbers_of_normalisation_notes(tmp_path):
    """RELIABILITY 7, 8, 9: the report says "16-bit scaled to 8-bit", not "N-bit to N-bit"."""
    root = tmp_path / "data"
    fx.write_16bit_png(root / "a" / "deep.png")
    fx.write_grayscale_png(root / "a" / "gray.png")
    fx.write_animated_gif(root / "b" / "anim.gif", frames=3)
    fx.write_png(root / "b" / "plain.png")
    m = scan_to(root, tmp_path / "m", CFG, progress=False)
    normalised = m.report["normalised"]
    assert normalised["16-bit scaled to 8-bit"] == 1
    assert normalised["grayscale replicated to 3 channels"] == 2
    assert normalised["first of 3 frames used"] == 1
    assert not any("N" in note.split() or "N-bit" in note for note in normalised)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refused_checkpoint_never_repeats_torchs_unsafe_advice(tmp_path):
    """RELIABILITY F4: the refusal names the file and what was found, and never repeats torch's
    advice that weights_only=False "will likely succeed"."""
    from imgclf.models.pretrained import read_state_dict
    from imgclf.runs.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    zipped, plain = tmp_path / "zipped.pt", tmp_path / "plain.pt"
    torch.save({"format": 1, "model": Exploit(marker)}, zipped)
    plain.write_bytes(pickle.dumps({"format": 1, "model": Exploit(marker)}))
    for path in (zipped, plain):
        for load in (load_checkpoint, read_state_dict):
            with pytest.raises(ImgclfError) as err:
                load(path)
            text = str(err.value)
            assert path.name in text and ("refused" in text or "loaded safely" in text), text
            for advice in ("weights_only=False", "set to `False`", "likely succeed", "trust"):
                assert advice not in text, text
    assert not marker.exists(), "the pickle ran code"
