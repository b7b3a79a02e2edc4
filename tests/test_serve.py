"""`imgclf serve`: a real uvicorn on a loopback port, driven by httpx through
docs/RELIABILITY.md H1-H10.

Every server here is the real app + uvicorn (with its header deadline) on 127.0.0.1; the
"slow" and "failing" backends are the real ONNX backend with a sleep or a raise in front of it.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import inspect
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.errors import ImgclfError
from imgclf.serve.app import create_app, make_server
from imgclf.serve.backend import OnnxBackend, TorchBackend, open_backend
from imgclf.serve.limits import Limits

import factory as fx

REPO = Path(__file__).resolve().parents[1]
ROUTES = {"/", "/docs", "/openapi.json", "/health", "/model", "/predict", "/predict/batch"}


# ---------------------------------------------------------------- fixtures and helpers


def train_tiny_run(root: Path) -> Path:
    """A 3-class scratch CNN trained for two epochs on 40-px images (a few seconds)."""
    from imgclf.config import load_config
    from imgclf.workflows.training import train

    data = fx.make_class_folder(root / "data", classes=("a", "b", "c"), per_class=10, size=(40, 40))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={root / 'runs'}",
            f"data.manifest={root / 'm'}",
            *fx.TINY_MODEL,
            "train.stages=[{epochs: 2, lr: 0.01}]",
            "tracking.mlflow=false",
        ],
    )
    return train(cfg, progress=False, log=lambda *_: None)


def export_run(run: Path, out: Path | None = None, dynamic_batch: bool = False) -> Path:
    """`imgclf export RUN --format onnx`: <run>/export/ with model.onnx + model.json."""
    from imgclf.predict.export import export_onnx

    return export_onnx(run, out, dynamic_batch=dynamic_batch, log=lambda *_: None).folder


def shared_model(tmp_path_factory) -> Path:
    """A trained tiny run with its exports (batch-1 in export/, dynamic-batch in dyn/) and
    sample images, built once per session and shared by the xdist workers (pytest-xdist's
    documented getbasetemp().parent + lock pattern); returns the folder holding it all."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "serve-model"
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            old = os.getcwd()
            os.chdir(root)  # module fixtures run before conftest's per-test chdir
            try:
                run = train_tiny_run(root)
                export_run(run)
                export_run(run, root / "dyn", dynamic_batch=True)
            finally:
                os.chdir(old)
            fx.write_jpeg(root / "more" / "wide.jpg", size=(90, 50), seed=3)
            fx.write_png(root / "more" / "tall.png", size=(33, 70), seed=4)
            fx.write_exif_rotated_jpeg(root / "more" / "rotated.jpg")
            fx.write_rgba_png(root / "more" / "rgba.png")
            (root / "run").symlink_to(run)
            (root / "done").touch()
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(run folder, export folder (batch 1), sample images, ONNX backend) for this module."""
    root = shared_model(tmp_path_factory)
    run = (root / "run").resolve()
    samples = [
        *sorted((root / "data" / "a").glob("*"))[:2],
        *sorted((root / "data" / "b").glob("*"))[:2],
    ]
    samples += [root / "more" / n for n in ("wide.jpg", "tall.png", "rotated.jpg", "rgba.png")]
    return run, run / "export", samples, OnnxBackend(run / "export")


@contextlib.contextmanager
def running(backend, **limits):
    """A real uvicorn on a free loopback port in a thread; yields its base URL."""
    lim = Limits(**limits)
    server = make_server(create_app(backend, lim), "127.0.0.1", 0, lim, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "server did not shut down"


class SlowBackend:
    """The real backend, but the first ``slow_calls`` inferences first sleep ``seconds``."""

    def __init__(self, inner, seconds: float, slow_calls: int | None = None) -> None:
        self.inner, self.seconds, self.slow_calls = inner, seconds, slow_calls
        self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_prepared(self, inputs):
        with self._lock:
            n, self.calls = self.calls, self.calls + 1
        if self.slow_calls is None or n < self.slow_calls:
            time.sleep(self.seconds)
        return self.inner.predict_prepared(inputs)


class FailingBackend(SlowBackend):
    def predict_prepared(self, inputs):
        raise RuntimeError("boom in /secret/path/model.py line 12")


def upload(url: str, data: bytes, name: str = "x.png", ctype: str = "image/png", **kw):
    return httpx.post(f"{url}/predict", files={"file": (name, data, ctype)}, timeout=10, **kw)


def assert_error(r: httpx.Response, status: int, error: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert "Traceback" not in r.text
    if error:
        assert body["error"] == error, body
    return body


# ---------------------------------------------------------------- predictions


def test_server_top1_equals_imgclf_predict(model, tmp_path):
    """Multipart, JSON base64 and batch answers all equal `imgclf predict` on the same files."""
    from imgclf.commands.predict import predict_files
    from imgclf.predict.predictor import Predictor

    run, _, samples, backend = model
    rows = predict_files([str(run), *map(str, samples)], out=tmp_path / "p.csv")
    assert [r["status"] for r in rows] == ["ok"] * len(samples)
    expected = Predictor.from_run(run).predict_paths(samples).probs.numpy()
    labels = backend.labels
    with running(backend) as url:
        for path, row, probs in zip(samples, rows, expected, strict=True):
            r = upload(url, path.read_bytes(), name=path.name, params={"top_k": 3})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["label"] == row["predicted"], path.name
            assert [t["label"] for t in got["top_k"]] == [labels[i] for i in np.argsort(-probs)]
            got_probs = {t["label"]: t["probability"] for t in got["top_k"]}
            assert max(abs(got_probs[lab] - p) for lab, p in zip(labels, probs, strict=True)) < 1e-4
            js = httpx.post(
                f"{url}/predict",
                json={"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 1},
                timeout=10,
            ).json()
            assert js["label"] == got["label"] and len(js["top_k"]) == 1
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in samples]
        batch = httpx.post(f"{url}/predict/batch", files=files, timeout=10).json()["results"]
    assert [b["label"] for b in batch] == [r["predicted"] for r in rows]
    assert [b["name"] for b in batch] == [p.name for p in samples]
    rotated = next(b for b in batch if b["name"] == "rotated.jpg")
    assert rotated["image"]["width"] == 32 and rotated["image"]["height"] == 64  # upright
    assert any("EXIF orientation 6" in n for n in rotated["image"]["notes"])


def test_every_backend_agrees(model):
    """Batch-1 and dynamic-batch ONNX exports, and the torch backend on the run and on the
    export folder, give the same probabilities (auto picks the run's export)."""
    run, export, samples, backend = model
    dynamic = OnnxBackend(run.parent.parent / "dyn")
    assert backend.fixed_batch == 1 and dynamic.fixed_batch is None
    assert open_backend(run).kind == "onnx"  # auto: the run's export/ folder wins
    torch_run, torch_export = open_backend(run, "torch"), open_backend(export, "torch")
    assert isinstance(torch_run, TorchBackend) and torch_export.model_id == torch_run.model_id
    images = [Image.open(p).convert("RGB") for p in samples]
    want = torch_run.predict(images)
    for other in (backend, dynamic, torch_export):
        np.testing.assert_allclose(other.predict(images), want, atol=1e-4)
    with running(torch_run) as url:
        r = upload(url, samples[0].read_bytes())
        info = httpx.get(f"{url}/model").json()
    assert r.json()["label"] == backend.labels[int(want[0].argmax())]
    assert info["backend"] == "torch" and info["kind"] == "single"


def test_health_model_docs_and_page_are_self_contained(model):
    run, _, _, backend = model
    with running(backend) as url:
        health = httpx.get(f"{url}/health").json()
        info = httpx.get(f"{url}/model").json()
        spec = httpx.get(f"{url}/openapi.json").json()
        pages = {p: httpx.get(f"{url}{p}") for p in ("/", "/docs", "/static/app.js")}
        missing = httpx.get(f"{url}/nope")
        wrong_method = httpx.get(f"{url}/predict")
    assert health["status"] == "ok" and health["model_id"] == backend.model_id
    assert info["labels"] == ["a", "b", "c"] and info["preprocessing"]["input_size"] == 32
    assert info["backend"] == "onnx" and len(info["model_id"]) == 16 and info["imgclf_version"]
    assert (
        info["onnx"]["output"] == "probabilities" and info["onnx"]["parity"]["max_abs_diff"] < 1e-4
    )
    assert "source_run" not in info["onnx"] and str(run.parent) not in json.dumps(info)
    assert {"/predict", "/predict/batch", "/health", "/model"} <= set(spec["paths"])
    for path, r in pages.items():
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert 'type="file"' in pages["/"].text
    # No CDN: nothing the page or the docs load comes from another origin.
    for f in (REPO / "src/imgclf/serve/static").iterdir():
        assert not re.search(r"(src|href)=\"(https?:)?//|https?://", f.read_text()), f.name
    assert_error(missing, 404, "not found")
    assert_error(wrong_method, 405)


def test_request_errors_are_json_never_tracebacks(model):
    _, _, samples, backend = model
    good = samples[0].read_bytes()
    with running(backend) as url:
        assert_error(httpx.post(f"{url}/predict", content=good), 415)  # no content type
        assert_error(httpx.post(f"{url}/predict", json={"image": "%%%"}), 422, "invalid base64")
        assert_error(httpx.post(f"{url}/predict", json={"picture": "x"}), 422, "missing image")
        assert_error(upload(url, good, params={"top_k": 0}), 422, "invalid request")
        r = httpx.post(f"{url}/predict", files={"other": ("", b"")}, data={"top_k": "2"})
        assert_error(r, 422)
        r = httpx.post(f"{url}/predict", files={"file": ("a.png", good)}, data={"top_k": "2"})
        assert len(r.json()["top_k"]) == 2
    with running(backend, max_files=2) as url:
        for n in (3, 10):
            files = [("files", (f"{i}.png", good, "image/png")) for i in range(n)]
            r = httpx.post(f"{url}/predict/batch", files=files)
            assert_error(r, 413)
            assert "at most 2" in r.json()["detail"]
        assert_error(httpx.post(f"{url}/predict/batch", json={"image": "x"}), 415)
    with running(FailingBackend(backend, 0)) as url:
        body = assert_error(upload(url, good), 500, "internal error")
        assert "secret" not in json.dumps(body)


def test_open_backend_errors_name_the_fix(model, tmp_path):
    run, _, _, _ = model
    with pytest.raises(ImgclfError, match="not a folder"):
        open_backend(tmp_path / "missing")
    with pytest.raises(ImgclfError, match=r"has no model\.json"):
        open_backend(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.json").write_text((run / "model.json").read_text())
    with pytest.raises(ImgclfError, match="imgclf export"):
        open_backend(bare, "onnx")
    with pytest.raises(ImgclfError, match="unknown backend"):
        open_backend(run, "tensorflow")


# ---------------------------------------------------------------- H1 size cap


def test_h1_content_length_over_the_cap_is_refused_before_any_body_byte(model):
    _, _, _, backend = model
    with running(backend, max_bytes=100_000) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 50000000\r\n\r\n"  # ... and not one body byte follows
            )
            start = time.monotonic()
            answer = recv_all(s)
        assert time.monotonic() - start < 2
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        assert b"payload too large" in answer
        r = httpx.post(f"{url}/predict", json={"image": "A" * 200_000})
        assert_error(r, 413, "payload too large")


def test_h1_chunked_upload_is_cut_off_while_the_client_still_sends(model):
    """A 50 MB chunked body (no Content-Length) gets 413 after about the cap, not 50 MB."""
    _, _, _, backend = model
    sent = 0

    def body():
        nonlocal sent
        for _ in range(800):  # 800 × 64 KiB = 50 MiB
            sent += 65536
            yield b"\0" * 65536

    with running(backend, max_bytes=1_000_000) as url:
        start = time.monotonic()
        r = httpx.post(
            f"{url}/predict",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b"},
            timeout=10,
        )
        elapsed = time.monotonic() - start
        assert_error(r, 413, "payload too large")
        assert r.headers["connection"] == "close"
        assert sent < 25 * 2**20, f"the client pushed {sent / 2**20:.0f} MiB before the answer"
        assert elapsed < 5
        assert httpx.get(f"{url}/health").status_code == 200


def recv_all(s: socket.socket, limit: float = 5.0) -> bytes:
    """Everything until the server closes the connection (bounded by ``limit`` seconds)."""
    s.settimeout(limit)
    chunks = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- H2 content sniffing


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


NOT_IMAGES = {
    "text": b"just some words, not pixels\n",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>',
    "zip": _zip_bytes(),
    "pdf": b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
    "html": b"<!doctype html><html><body>hi</body></html>",
    "random": bytes(range(256)) * 4,
}


def test_h2_non_images_with_an_image_content_type_are_415(model):
    _, _, samples, backend = model
    with running(backend) as url:
        for kind, data in NOT_IMAGES.items():
            body = assert_error(upload(url, data, name=f"{kind}.png", ctype="image/png"), 415)
            assert body["error"] == "unsupported media type", kind
            r = httpx.post(f"{url}/predict", json={"image": base64.b64encode(data).decode()})
            assert_error(r, 415)
        files = [
            ("files", ("good.png", samples[0].read_bytes(), "image/png")),
            ("files", ("bad.jpg", NOT_IMAGES["pdf"], "image/jpeg")),
        ]
        results = httpx.post(f"{url}/predict/batch", files=files).json()["results"]
    assert results[0]["status"] == "ok" and results[0]["label"] in ("a", "b", "c")
    assert results[1]["status"] == "error" and results[1]["http_status"] == 415
    assert "PDF" in results[1]["detail"]


# ---------------------------------------------------------------- H3 pixel cap


def test_h3_header_declaring_50k_by_50k_is_422_before_decoding(model, tmp_path):
    _, _, _, backend = model
    bomb = fx.write_bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(bomb) < 10_000  # a tiny file that would decode to 7.5 GB
    with running(backend, max_pixels=1_000_000) as url:
        start = time.monotonic()
        body = assert_error(upload(url, bomb), 422, "over pixel cap")
        assert time.monotonic() - start < 2
        assert "2500000000 pixels" in body["detail"]  # Pillow's guard names it first
        wide = fx.write_bomb_png(tmp_path / "wide.png", width=2000, height=1000).read_bytes()
        body = assert_error(upload(url, wide), 422, "over pixel cap")
        assert body["detail"] == "2000x1000 = 2,000,000 pixels, limit 1,000,000"
        truncated = fx.write_truncated_jpeg(tmp_path / "t.jpg").read_bytes()
        assert_error(upload(url, truncated, ctype="image/jpeg"), 422, "truncated or corrupt")
        tiny = fx.write_tiny_png(tmp_path / "tiny.png").read_bytes()
        assert_error(upload(url, tiny), 422, "too small")
        assert httpx.get(f"{url}/health").json()["running"] == 0


# ---------------------------------------------------------------- H4 client file names


def test_h4_client_file_names_are_never_paths(model, tmp_path, monkeypatch):
    _, _, samples, backend = model
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = sorted(p for p in tmp_path.rglob("*"))
    names = ["../../x", "..\\..\\x", "/etc/x", "C:\\Windows\\x.png"]
    with running(backend) as url:
        for name in names:
            r = upload(url, samples[0].read_bytes(), name=name)
            assert r.status_code == 200 and ".." not in r.text and "/etc" not in r.text
        files = [("files", (n, samples[0].read_bytes(), "image/png")) for n in names]
        results = httpx.post(f"{url}/predict/batch", files=files).json()["results"]
    assert [r["name"] for r in results] == ["x", "x", "x", "x.png"]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/etc/x").exists()


# ---------------------------------------------------------------- H5 timeouts


def test_h5_hung_inference_is_504_and_the_server_goes_on(model):
    _, _, samples, backend = model
    slow = SlowBackend(backend, seconds=1.5, slow_calls=1)
    good = samples[0].read_bytes()
    with running(slow, concurrency=2, timeout=0.3) as url:
        start = time.monotonic()
        assert_error(upload(url, good), 504, "inference timeout")
        assert time.monotonic() - start < 1.2  # answered at the timeout, not after the sleep
        assert upload(url, good).status_code == 200  # the other thread serves meanwhile
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["running"]:  # the hung one ends, slot returns
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert upload(url, good).status_code == 200


def test_h5_slow_body_is_408_and_slow_headers_are_cut_off(model):
    _, _, samples, backend = model
    with running(backend, read_timeout=0.5, header_timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as body_drip:
            body_drip.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n"
            )
            start = time.monotonic()
            answer = drip(body_drip, b"{" + b" " * 150)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert 0.4 < time.monotonic() - start < 2.5
        with socket.create_connection(("127.0.0.1", port), timeout=5) as header_drip:
            start = time.monotonic()
            head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 150
            answer = drip(header_drip, head)
            assert answer == b"" and 0.4 < time.monotonic() - start < 2.5  # closed, no request
        assert upload(url, samples[0].read_bytes()).status_code == 200


def drip(s: socket.socket, data: bytes) -> bytes:
    """Send one byte every 20 ms until the server answers or closes; return what it sent."""
    s.settimeout(0.02)
    for byte in data:
        try:
            s.send(bytes([byte]))
            got = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return got + recv_all(s, 1.0) if got else b""
    raise AssertionError("the server kept reading a drip-fed request")


# ---------------------------------------------------------------- H6 bounded queue


def test_h6_burst_gets_503_with_retry_after_and_health_stays_fast(model):
    """Concurrency 1, queue 1, 8 requests at once: 2 served, 6 refused; /health answers while
    an inference runs, so inference is off the event loop."""
    _, _, samples, backend = model
    slow = SlowBackend(backend, seconds=1.0)
    good = samples[0].read_bytes()
    barrier = threading.Barrier(8)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=15) as own:  # made before the barrier: they fire together
            barrier.wait()
            return own.post(f"{url}/predict", files={"file": ("x.png", good, "image/png")})

    with (
        running(slow, concurrency=1, queue=1, timeout=10) as url,
        ThreadPoolExecutor(8) as pool,
        httpx.Client(base_url=url, timeout=5) as client,
    ):
        futures = [pool.submit(one, i) for i in range(8)]
        deadline = time.monotonic() + 5
        while client.get("/health").json()["running"] < 1:  # the first inference has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        health = client.get("/health").json()
        health_s = time.monotonic() - start
        answers = [f.result(timeout=15) for f in futures]
        after = upload(url, good)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200] + [503] * 6, codes
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert_error(r, 503, "busy")
    # Answered during the first inference (a blocked loop would answer after both, running 0).
    assert health["running"] == 1 and health["admitted"] == 2, health
    assert health_s < 0.5, f"/health took {health_s:.2f} s during the burst"
    assert after.status_code == 200


# ---------------------------------------------------------------- H8 idle slow uploads


def open_idle_uploads(port: int, n: int, stack: contextlib.ExitStack) -> list[socket.socket]:
    """``n`` connections that send the headers and the first body bytes of an upload, then go
    quiet (closed by ``stack``)."""
    idle = []
    for _ in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"image": "iVBOR'
        )
        idle.append(s)
    return idle


def wait_for_health(url: str, ok, seconds: float = 5.0) -> dict:
    """Poll /health until ``ok(health)`` (bounded in time)."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if ok(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def test_h8_idle_slow_uploads_do_not_starve_inference(model):
    """RELIABILITY H8: ten clients that open an upload and go quiet (as many as --concurrency
    + --queue) hold no admission ticket: a normal request made meanwhile is served at once."""
    _, _, samples, backend = model
    good = samples[0].read_bytes()
    with running(backend, read_timeout=20) as url, contextlib.ExitStack() as stack:
        port = int(url.rsplit(":", 1)[1])
        open_idle_uploads(port, 10, stack)
        # All ten are in the server, waiting for their bodies (today's code: all ten admitted).
        wait_for_health(url, lambda h: h.get("receiving", h["admitted"]) == 10)
        start = time.monotonic()
        r = upload(url, good)
        assert r.status_code == 200, r.text
        js = {"image": base64.b64encode(good).decode()}
        assert httpx.post(f"{url}/predict", json=js, timeout=10).status_code == 200
        files = [("files", ("a.png", good, "image/png"))] * 3
        batch = httpx.post(f"{url}/predict/batch", files=files, timeout=10)
        assert [x["status"] for x in batch.json()["results"]] == ["ok"] * 3, batch.text
        assert time.monotonic() - start < 5  # served now, not after the idle ones time out
        health = httpx.get(f"{url}/health").json()
        assert health["admitted"] == 0 and health["receiving"] == 10, health


def test_h8_body_reads_are_bounded_apart_and_freed_by_the_read_timeout(model):
    """RELIABILITY H8: at most --max-uploads bodies are received at once (503 + Retry-After
    beyond, naming the option); an idle one gets 408 at --read-timeout and frees its place."""
    _, _, samples, backend = model
    good = samples[0].read_bytes()
    with running(backend, max_uploads=2, read_timeout=1.0) as url, contextlib.ExitStack() as st:
        port = int(url.rsplit(":", 1)[1])
        idle = open_idle_uploads(port, 2, st)
        wait_for_health(url, lambda h: h["receiving"] == 2)
        r = upload(url, good)
        body = assert_error(r, 503, "busy")
        assert "--max-uploads" in body["detail"] and int(r.headers["retry-after"]) >= 1
        for s in idle:  # each is cut off at the read timeout
            assert recv_all(s, 5.0).startswith(b"HTTP/1.1 408")
        wait_for_health(url, lambda h: h["receiving"] == 0)
        assert upload(url, good).status_code == 200


# ---------------------------------------------------------------- H9 pixels per request


def black_png(width: int, height: int) -> bytes:
    """A real, fully decodable black 8-bit grayscale PNG, compressed to almost nothing (a
    7000 × 7000 one is 48 KiB and decodes to 49 MB of pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte 0, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    chunk = fx._png_chunk  # the factory's chunk writer, with its CRC
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class CountingBackend(SlowBackend):
    """The real backend, recording how many decoded images are still alive at each prepare."""

    def __init__(self, inner) -> None:
        super().__init__(inner, seconds=0, slow_calls=0)
        self.alive_at_prepare: list[int] = []
        self._seen: list[weakref.ref] = []

    def prepare(self, image):
        gc.collect()
        self.alive_at_prepare.append(sum(ref() is not None for ref in self._seen))
        self._seen.append(weakref.ref(image))
        return self.inner.prepare(image)


def test_h9_pixels_per_request_are_capped_from_the_headers_before_decoding(model):
    """RELIABILITY H9: a batch of small files that decode to huge images is 413 naming
    --max-request-pixels, from the headers alone (nothing decoded); within the budget each
    decoded image is freed once its model input is made, before the next one is decoded."""
    _, _, _, backend = model
    # The repro, 16 black 7000 × 7000 PNGs (0.7 MiB of body), is over the default.
    assert 16 * 7000 * 7000 > Limits().max_request_pixels >= Limits().max_pixels
    big = black_png(1000, 1000)
    assert len(big) < 2_000
    counting = CountingBackend(backend)
    with running(counting, max_pixels=1_000_000, max_request_pixels=3_000_000) as url:
        files = [("files", (f"{i}.png", big, "image/png")) for i in range(4)]
        start = time.monotonic()
        body = assert_error(httpx.post(f"{url}/predict/batch", files=files), 413, "too many pixels")
        assert time.monotonic() - start < 2
        assert "4,000,000" in body["detail"] and "3,000,000" in body["detail"]
        assert "--max-request-pixels" in body["detail"]
        assert counting.alive_at_prepare == []  # refused before a single decode
        r = httpx.post(f"{url}/predict/batch", files=files[:3], timeout=10)
        assert [x["status"] for x in r.json()["results"]] == ["ok"] * 3, r.text
        assert counting.alive_at_prepare == [0, 0, 0]  # never two decoded images at once
        # One image alone is also held to the request budget (and to --max-pixels first).
        with running(backend, max_request_pixels=999_999) as small:
            assert_error(upload(small, big), 413, "too many pixels")
        assert httpx.get(f"{url}/health").json()["running"] == 0


def rss_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


@contextlib.contextmanager
def serve_subprocess(export: Path, *options: str):
    """`imgclf serve EXPORT` in its own process (its memory is its own); yields (url, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "imgclf", "serve", str(export), "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [*command, "--log-level", "warning", *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "imgclf serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_h9_one_decoded_image_at_a_time_and_memory_returns_after_the_request(model):
    """RELIABILITY H9: three black 7000 × 7000 PNGs (147 M pixels, within the default budget)
    raise the server's peak memory by about one decoded image, not three, and its resident
    size returns afterwards (measured before the fix: +655 MiB peak, +425 MiB after)."""
    _, export, samples, _ = model
    big = black_png(7000, 7000)
    with serve_subprocess(export) as (url, pid):
        assert upload(url, samples[0].read_bytes()).status_code == 200  # warm
        before = rss_mib(pid)["VmRSS"]
        files = [("files", (f"{i}.png", big, "image/png")) for i in range(3)]
        r = httpx.post(f"{url}/predict/batch", files=files, timeout=60)
        assert [x["status"] for x in r.json()["results"]] == ["ok"] * 3, r.text[:300]
        peak = rss_mib(pid)["VmHWM"] - before
        time.sleep(0.5)
        after = rss_mib(pid)["VmRSS"] - before
    # One 49 M-pixel grayscale image: L + RGB (4 bytes per pixel) + resize ≈ 290 MiB.
    assert peak < 450, f"peak +{peak:.0f} MiB"
    assert after < 100, f"+{after:.0f} MiB still held after the request"


def test_h9_request_pixel_budget_is_a_documented_serve_option():
    """RELIABILITY H9: --max-request-pixels (and --max-uploads) are `imgclf serve` options,
    listed in its help and in the README's serving section and the architecture notes."""
    from typer.testing import CliRunner

    from imgclf.cli import app as cli

    help_text = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    readme = (REPO / "README.md").read_text()
    serving = readme[readme.index("## Predict, combine, export, serve") :]
    for option in ("--max-request-pixels", "--max-uploads"):
        assert option in help_text and option in serving, option
    assert "--max-request-pixels" in (REPO / "docs/ARCHITECTURE.md").read_text()


# ---------------------------------------------------------------- H10 hostile JSON


def test_h10_hostile_json_is_4xx_never_5xx(model):
    """RELIABILITY H10: infinite or huge numbers, a million nested arrays, wrong types and bad
    encodings in JSON bodies are 422 with a JSON error, and the server goes on."""
    _, _, samples, backend = model
    image = base64.b64encode(samples[0].read_bytes()).decode()
    head = '{"image": "' + image + '", "top_k": '
    bodies = {
        "Infinity": (head + "Infinity}", "invalid JSON"),
        "-Infinity": (head + "-Infinity}", "invalid JSON"),
        "NaN": (head + "NaN}", "invalid JSON"),
        "1e400": (head + "1e400}", "invalid top_k"),
        "-1e400": (head + "-1e400}", "invalid top_k"),
        "1.5": (head + "1.5}", "invalid top_k"),
        "true": (head + "true}", "invalid top_k"),
        "string": (head + '"2"}', "invalid top_k"),
        "list": (head + "[2]}", "invalid top_k"),
        "5000 digits": (head + "9" * 5000 + "}", "invalid JSON"),
        "deep": ("[" * 1_000_000, "invalid JSON"),
        "deep object": ('{"a":' * 100_000, "invalid JSON"),
        "image number": ('{"image": 1e400}', "missing image"),
        "not utf-8": (b'{"image": "\xff\xfe"}', "invalid JSON"),
        "lone surrogate": ('{"image": "\\ud800"}', "invalid base64"),
    }
    with running(backend) as url:
        for what, (body, error) in bodies.items():
            content = body if isinstance(body, bytes) else body.encode()
            r = httpx.post(
                f"{url}/predict",
                content=content,
                headers={"content-type": "application/json"},
                timeout=10,
            )
            got = assert_error(r, 422)
            assert got["error"] == error, (what, got)
        json_type = {"content-type": "application/json"}
        ok = httpx.post(f"{url}/predict", content=head + "2.0}", headers=json_type, timeout=10)
        assert ok.status_code == 200 and len(ok.json()["top_k"]) == 2, ok.text
        fields = {"top_k": "1e400"}
        r = httpx.post(
            f"{url}/predict", files={"file": ("a.png", samples[0].read_bytes())}, data=fields
        )
        assert_error(r, 422, "invalid top_k")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------- H7 bind address, no loaders


def test_h7_loopback_by_default_and_no_endpoint_loads_anything(model):
    from typer.testing import CliRunner

    from imgclf.cli import app as cli
    from imgclf.commands.serve import serve as serve_command

    _, _, _, backend = model
    params = inspect.signature(serve_command).parameters
    assert params["host"].default == "127.0.0.1"
    for name, value in asdict(Limits()).items():  # the CLI's defaults are the server's
        assert name not in params or params[name].default == value, name
    assert "127.0.0.1" in CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    app = create_app(backend)
    paths = {getattr(r, "path", None) for r in app.routes} - {"/static"}
    assert paths == ROUTES  # upload endpoints take images only: no model, pickle or path


def test_cli_serves_an_export_without_torch(model):
    """`imgclf serve EXPORT` in a fresh interpreter where importing torch fails."""
    _, export, samples, backend = model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard = (
        "import sys; sys.modules['torch'] = None; from imgclf.cli import main; "
        f"sys.argv = ['imgclf', 'serve', {str(export)!r}, '--port', '{port}', "
        "'--log-level', 'warning']; main()"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-c", guard], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "imgclf serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        r = upload(url, samples[1].read_bytes())
        assert r.status_code == 200
        image = Image.open(samples[1]).convert("RGB")
        assert r.json()["label"] == backend.labels[int(backend.predict([image])[0].argmax())]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert "serving" in out and "onnx" in out and "Traceback" not in out


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_the_serving_deps_and_installs_no_torch():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[_norm(name)] = version
    text = (REPO / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.*)$", text.replace("\\\n", " "), flags=re.M)
    installed, no_deps = {}, False
    for command in runs:
        for part in command.split("&&"):
            words = part.split()
            if words[:2] != ["pip", "install"]:
                continue
            args = iter(words[2:])
            for word in args:
                if word in ("-c", "--constraint", "-r"):
                    next(args)
                elif word == "--no-deps":
                    no_deps = True
                elif word == ".":
                    assert no_deps, "imgclf itself must be installed with --no-deps"
                else:
                    name, _, version = word.partition("==")
                    assert version, f"{word} is not pinned"
                    installed[_norm(name)] = version
    serving = "fastapi uvicorn python-multipart onnxruntime numpy pillow pydantic typer rich pyyaml"
    assert set(installed) == {_norm(n) for n in serving.split()}
    for name, version in installed.items():
        assert pins[name] == version, f"{name}=={version} but constraints.txt has {pins[name]}"
    assert not {"torch", "torchvision", "timm", "lightning"} & set(installed)
    assert 'CMD ["imgclf", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "docker build" in text and "docker run" in text


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
