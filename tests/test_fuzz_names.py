"""Fuzzing file and folder names through scan → split → train → predict (docs/RELIABILITY.md
rows 15, 31, 32).

Names are random bytes (often not UTF-8), Unicode in NFC or NFD form, or long (near the 255-byte
limit), next to FIFOs and sockets. Whatever the names, every step ends in a written manifest or
prediction file or in a clear ImgclfError: never another exception, never a hang, never a
modified user file. Training is the expensive step, so one run is trained once on a fixed
hostile folder; the Hypothesis examples then scan, split, read through the training loader and
predict with it.
"""

import contextlib
import hashlib
import itertools
import os
import socket
import stat
import tempfile
import threading
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgclf.commands.predict import predict_files
from imgclf.config import ScanConfig, SplitConfig, load_config
from imgclf.data.loaders import ManifestDataset
from imgclf.data.manifest import read_manifest
from imgclf.data.prepare import split_and_save
from imgclf.data.scan import scan_to
from imgclf.errors import ImgclfError
from imgclf.files import printable
from imgclf.workflows.training import train

import factory as fx

EXTENSIONS = [b".png", b".jpg", b".PNG", b".jpeg", b".txt", b""]
MAX_NAME = 255  # bytes per name on Linux file systems


def _component(raw: bytes) -> bytes:
    """A legal single name: no '/', no NUL, not '.' or '..', at most MAX_NAME bytes."""
    name = raw.replace(b"/", b"_").replace(b"\x00", b"_")[:MAX_NAME] or b"_"
    return b"_" + name[: MAX_NAME - 1] if name in (b".", b"..") else name


unicode_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=24,
)
stems = st.one_of(
    st.binary(min_size=1, max_size=24),  # random bytes: mostly not UTF-8
    st.tuples(unicode_text, st.sampled_from(["NFC", "NFD"])).map(
        lambda t: unicodedata.normalize(t[1], t[0]).encode("utf-8")
    ),
    st.integers(min_value=240, max_value=MAX_NAME).map(lambda n: b"L" * n),  # near the limit
    st.sampled_from([b"caf\xe9", "café".encode(), unicodedata.normalize("NFD", "café").encode()]),
)
KINDS = ["good", "good", "good", "truncated", "zero", "text", "fifo", "socket"]
files = st.lists(st.tuples(stems, st.sampled_from(EXTENSIONS), st.sampled_from(KINDS)), max_size=6)
classes = st.lists(st.tuples(stems, files), min_size=1, max_size=3)


def build(root: Path, spec, sockets: list) -> list[bytes]:
    """Create the class folders and files of `spec` under root; returns the FIFO paths."""
    broot, fifos, seeds = os.fsencode(root), [], itertools.count(1000)
    for stem, members in spec:
        folder = os.path.join(broot, _component(stem))
        os.makedirs(folder, exist_ok=True)
        anchor = os.fsdecode(os.path.join(folder, b"anchor.png"))  # every class has an image
        fx.write_png(anchor, size=(20, 20), seed=next(seeds))
        for stem_f, ext, kind in members:
            path = os.path.join(folder, _component(stem_f[: MAX_NAME - len(ext)] + ext))
            if os.path.lexists(path):
                continue
            if kind == "fifo":
                os.mkfifo(path)
                fifos.append(path)
            elif kind == "socket":
                with contextlib.suppress(OSError):  # AF_UNIX names are limited to ~107 bytes
                    sockets.append(_bind(path))
            else:
                _write(path, kind, next(seeds))
    return fifos


def _write(path: bytes, kind: str, seed: int) -> None:
    text = os.fsdecode(path)
    if kind == "good":
        fx.write_png(text, size=(20, 20), seed=seed)
    elif kind == "truncated":
        fx.write_truncated_jpeg(text, seed=seed)
    elif kind == "zero":
        fx.write_zero_byte(text)
    else:
        fx.write_text_as_jpg(text)


def _bind(path: bytes) -> socket.socket:
    here = os.getcwd()
    os.chdir(os.path.dirname(path))  # AF_UNIX paths are limited to ~107 bytes: bind relative
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(os.path.basename(path))
    except OSError:
        s.close()
        raise
    finally:
        os.chdir(here)
    return s


def fingerprint(root: Path) -> dict[bytes, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            if stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest() + f":{st_.st_mtime_ns}"
            else:
                out[p] = f"{stat.S_IFMT(st_.st_mode)}:{st_.st_mtime_ns}"
    return out


def within(seconds: float, fifos: list[bytes], fn):
    """fn() on a thread; a hang (something opened a FIFO) fails the test instead of blocking."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for fifo in fifos:  # unblock the reader before failing
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("hung: a FIFO was opened")
    if "error" in box:
        raise box["error"]
    return box["value"]


HOSTILE = [
    (
        b"a",
        [(b"bad_\xff", b".png", "good"), (b"L" * 240, b".png", "good"), (b"p", b".jpg", "fifo")],
    ),
    ("é".encode(), [(unicodedata.normalize("NFD", "ü").encode(), b".png", "good")]),
    (b"b", [(b"s", b".png", "socket"), (b"x", b".png", "good"), (b"y", b".png", "good")]),
    (b"caf\xe9", [(b"z", b".png", "good")]),
]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """scan → split → train on a hostile folder (1 epoch, the tiny model): the run is usable."""
    tmp = tmp_path_factory.mktemp("fuzz")
    root, sockets = tmp / "data", []
    fifos = build(root, HOSTILE, sockets)
    for c, name in enumerate((b"a", "é".encode(), b"b")):  # enough per class for 3 splits
        for i in range(4):
            path = os.path.join(os.fsencode(root), name, b"g%d.png" % i)
            fx.write_png(os.fsdecode(path), seed=50 + 10 * c + i)
    before = fingerprint(root)
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / 'manifest'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 1, lr: 0.01}]",
            "tracking.mlflow=false",
            "name=fuzz",
        ],
    )
    try:
        run = within(240, fifos, lambda: train(cfg, progress=False, log=lambda *_: None))
    finally:
        for s in sockets:
            s.close()
    assert fingerprint(root) == before, "training modified the user's folder"
    m = read_manifest(tmp / "manifest")
    skipped = {e.path: e.reason for e in m.entries if e.status == "skipped"}
    assert skipped["a/bad_\\xff.png"].startswith("file name is not valid UTF-8")
    assert skipped["caf\\xe9/"].startswith("file name is not valid UTF-8")
    assert skipped["a/p.jpg"] == "not a regular file: FIFO"
    assert skipped["b/s.png"] == "not a regular file: socket"
    assert m.labels.names == ("a", "b", "é")
    return run


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(spec=classes)
@example(spec=[(b"cat", [(b"bad_\xff", b".png", "good"), (b"pipe", b".png", "fifo")])])
@example(spec=[(b"\xff\xfe", [(b"x", b".png", "good")]), (b"ok", [(b"L" * 251, b".png", "good")])])
# a class named "¹": a digit to str.isdigit but not to int() (the class-order key raised)
@example(spec=[("\u00b9".encode(), [(b"x", b".png", "good")]), (b"c2", [(b"y", b".png", "good")])])
def test_any_names_give_a_manifest_or_a_clear_error(hostile_run, tmp_path, spec):
    """RELIABILITY 15, 31, 32: scan → split → training loader → predict on random names."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        tmp = Path(tmp)
        root, sockets = tmp / "data", []
        try:
            fifos = build(root, spec, sockets)
            before = fingerprint(root)
            within(120, fifos, lambda: pipeline(hostile_run, root, tmp))
            assert fingerprint(root) == before, "a user file was modified"
        finally:
            for s in sockets:
                s.close()


def pipeline(run: Path, root: Path, tmp: Path) -> None:
    m = scan_to(root, tmp / "m", ScanConfig(workers=1), progress=False)  # raises only ImgclfError
    on_disk = read_manifest(tmp / "m")  # always written, and readable back
    assert [e.path for e in on_disk.entries] == [e.path for e in m.entries]
    for e in m.entries:
        e.path.encode("utf-8")  # text, whatever the names on disk
    if m.usable:
        try:
            split, _ = split_and_save(tmp / "m", SplitConfig())
        except ImgclfError:
            split = None
        if split is not None:  # what training reads: every usable row opens by its path
            ds = ManifestDataset(split.root, split.ok_entries, split.labels, lambda im: im.size)
            assert all(isinstance(ds[i], tuple) for i in range(len(ds)))
    try:
        rows = predict_files([str(run), str(root)], out=tmp / "p.csv", workers=0)
    except ImgclfError:
        return  # e.g. no image files at all
    assert (tmp / "p.csv").read_text(encoding="utf-8").count("\n") >= len(rows)
    by_path = {r["path"]: r for r in rows}
    for e in m.entries:  # one rule: what scan took predict takes, what scan skipped it refuses
        row = by_path.get(printable(root / e.path)) if "\\x" not in e.path else None
        if row is None or e.path.endswith("/"):
            continue
        if e.ok:
            assert row["status"] == "ok", (e, row)
        elif e.reason.startswith(("not a regular file", "too small", "truncated", "empty")):
            assert row["status"] == "error", (e, row)
    for r in rows:  # a name that is not UTF-8 is never read, and is shown escaped
        if r["reason"].startswith("file name is not valid UTF-8"):
            assert "\\x" in r["path"] and r["status"] == "error", r
