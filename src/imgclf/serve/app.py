"""The HTTP server: a FastAPI app around one backend, behind the limits of `limits.py`.

Endpoints: POST /predict (multipart file or JSON base64), POST /predict/batch, GET /health,
GET /model, GET / (the upload page), GET /docs (a self-hosted API page) and /openapi.json.
Nothing here imports torch: with an ONNX export the whole serving path runs without it.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from imgclf import __version__
from imgclf.data.images import ImageLoadError, load_image, probe
from imgclf.serve.backend import Backend
from imgclf.serve.fields import parse_json, top_k_value
from imgclf.serve.limits import (
    ACCEPTED_FORMATS,
    TRIM_AFTER_PIXELS,
    BodyLimit,
    Gate,
    HTTPProblem,
    Limits,
    Uploads,
    check_image_bytes,
    check_request_pixels,
    parse_multipart,
    protocol_with_header_timeout,
    release_freed_memory,
)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_TOP_K = 5

# Same-origin only: the page and the docs load nothing from anywhere else (no CDN).
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; "
        b"object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# ImageLoadError kinds that mean "not something we decode" rather than "a bad image".
_MEDIA_KINDS = ("not an image", "unsupported format")

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64 image bytes"},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["image"],
                }
            },
        },
    }
}
_BATCH_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}


def create_app(backend: Backend, limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving ``backend`` under ``limits``."""
    limits = limits or Limits()
    gate = Gate(limits.concurrency, limits.queue)
    uploads = Uploads(limits.max_uploads, limits.read_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        gate.close()

    app = FastAPI(
        title="imgclf",
        version=__version__,
        description=f"Image classifier {backend.name}: labels {', '.join(backend.labels)}",
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN; /docs is ours
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.backend, app.state.limits, app.state.gate = backend, limits, gate
    app.state.uploads = uploads
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_bytes)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_pages(app, backend, limits, gate, uploads)
    _add_predict(app, backend, limits, gate, uploads)
    return app


def _add_pages(
    app: FastAPI, backend: Backend, limits: Limits, gate: Gate, uploads: Uploads
) -> None:
    """GET /, /docs, /health, /model."""
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    docs_html = (STATIC_DIR / "docs.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_html)

    @app.get("/health", summary="Liveness and load")
    async def health() -> dict[str, Any]:
        stats = {**gate.stats(), "receiving": uploads.active}
        return {"status": "ok", "model_id": backend.model_id, **stats}

    @app.get("/model", summary="Labels, preprocessing and version of the served model")
    async def model() -> dict[str, Any]:
        return {
            **backend.describe(),
            "model_id": backend.model_id,
            "labels": backend.labels,
            "preprocessing": backend.preprocessing,
            "imgclf_version": __version__,
            "accepted_formats": list(ACCEPTED_FORMATS),
            "limits": asdict(limits),
        }


def _add_predict(
    app: FastAPI, backend: Backend, limits: Limits, gate: Gate, uploads: Uploads
) -> None:
    """POST /predict and /predict/batch: read (bounded apart), sniff, then admit (or 503) and
    infer on the pool. A slow body never holds an admission ticket (docs/RELIABILITY.md H8)."""

    async def infer(blobs: list[bytes]) -> list:
        with _admitted(gate):
            deadline = time.monotonic() + limits.timeout
            return await gate.run(lambda: _infer(backend, limits, blobs), deadline)

    @app.post("/predict", summary="Classify one image", openapi_extra=_UPLOAD_DOC)
    async def predict(request: Request, top_k: int | None = Query(None, ge=1)) -> dict:
        upload, k = await _read_one(request, uploads, top_k)
        check_image_bytes(upload)
        (row,) = await infer([upload])
        if isinstance(row, HTTPProblem):
            raise row
        return {**_ranked(row[0], backend.labels, k), **row[1], "model_id": backend.model_id}

    @app.post("/predict/batch", summary="Classify several images", openapi_extra=_BATCH_DOC)
    async def predict_batch(request: Request, top_k: int | None = Query(None, ge=1)) -> dict:
        files, k = await _read_many(request, limits, uploads, top_k)
        results: list[dict[str, Any]] = [{"index": i, "name": n} for i, (n, _) in enumerate(files)]
        todo = []
        for i, (_, data) in enumerate(files):
            try:
                check_image_bytes(data)
                todo.append(i)
            except HTTPProblem as p:
                results[i].update(_problem_fields(p))
        rows = await infer([files[i][1] for i in todo]) if todo else []
        for i, row in zip(todo, rows, strict=True):
            if isinstance(row, HTTPProblem):
                results[i].update(_problem_fields(row))
            else:
                results[i].update(status="ok", **_ranked(row[0], backend.labels, k), **row[1])
        return {"results": results, "model_id": backend.model_id}


class SecurityHeaders:
    """Pure ASGI middleware adding the same-origin policy headers to every response."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


@contextmanager
def _admitted(gate: Gate) -> Iterator[None]:
    """Hold an admission ticket of ``gate`` for the duration of a request (503 when full)."""
    gate.admit()
    try:
        yield
    finally:
        gate.leave()


async def _read_one(
    request: Request, uploads: Uploads, top_k: int | None
) -> tuple[bytes, int | None]:
    """The image bytes and top_k of a /predict request (multipart or JSON)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/json")):
        raise HTTPProblem(
            415,
            "unsupported media type",
            'send multipart/form-data with a "file" field, or JSON {"image": "<base64>"}',
        )
    body = await uploads.read(request.stream())
    if ctype.startswith("multipart/form-data"):
        parts = parse_multipart(body, ctype, max_files=1)
        files = [p for p in parts if p.filename is not None or p.name in ("file", "image")]
        if not files:
            raise HTTPProblem(422, "missing file", "send the image in a multipart field named file")
        fields = {p.name: bytes(p.data) for p in parts if p not in files}
        return bytes(files[0].data), top_k or top_k_value(fields.get("top_k"))
    return _read_json(body, top_k)


def _read_json(body: bytes, top_k: int | None) -> tuple[bytes, int | None]:
    payload = parse_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise HTTPProblem(422, "missing image", 'expected {"image": "<base64>", "top_k": k}')
    text = payload["image"]
    if text.startswith("data:") and "," in text:  # a data: URL as browsers make them
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPProblem(422, "invalid base64", str(e)) from None
    return data, top_k or top_k_value(payload.get("top_k"))


async def _read_many(request: Request, limits: Limits, uploads: Uploads, top_k: int | None):
    """(client name, bytes) for each file of a /predict/batch request, and top_k."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPProblem(415, "unsupported media type", "send multipart/form-data files")
    body = await uploads.read(request.stream())
    parts = parse_multipart(body, ctype, max_files=limits.max_files)
    files = [p for p in parts if p.filename is not None]
    if not files:
        raise HTTPProblem(422, "missing files", "send one or more multipart file fields")
    fields = {p.name: bytes(p.data) for p in parts if p.filename is None}
    named = [(display_name(p.filename), bytes(p.data)) for p in files]
    return named, top_k or top_k_value(fields.get("top_k"))


def display_name(filename: str | None) -> str:
    """The last component of a client's file name, for display only (never a path)."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:200]


def _infer(backend: Backend, limits: Limits, blobs: list[bytes]) -> list:
    """On a pool thread: header probes (per-image and per-request pixel caps), then decode and
    prepare each image in turn, then predict. One row per blob: either (probabilities, image
    facts) or the HTTPProblem for that blob."""
    rows: list[Any] = [None] * len(blobs)
    infos = {}
    for i, data in enumerate(blobs):
        try:
            infos[i] = probe(data, max_pixels=limits.max_pixels, min_side=limits.min_side)
        except ImageLoadError as e:
            rows[i] = _load_problem(e)
    check_request_pixels([info.width * info.height for info in infos.values()], limits)
    pre = backend.preprocessing
    size = int(pre["input_size"]) if pre else None  # JPEG draft decoding down to this size
    inputs, where, decoded = [], [], 0
    for i, info in infos.items():
        try:
            image = load_image(
                blobs[i], max_pixels=limits.max_pixels, min_side=limits.min_side, size_hint=size
            )
        except ImageLoadError as e:
            rows[i] = _load_problem(e)
            continue
        facts = {"format": info.format, "width": info.width, "height": info.height}
        rows[i] = {"image": {**facts, "notes": list(image.info.get("imgclf_notes", ()))}}
        # Only the model's input is kept: the decoded image (4 bytes a pixel, hundreds of MB
        # near --max-pixels) is freed before the next is decoded, not held for the batch (H9).
        inputs.append(backend.prepare(image))
        del image
        where.append(i)
        decoded += info.width * info.height
    if decoded >= TRIM_AFTER_PIXELS:
        release_freed_memory()
    if inputs:
        probs = backend.predict_prepared(inputs)
        for i, p in zip(where, probs, strict=True):
            rows[i] = (p, rows[i])
    return rows


def _load_problem(e: ImageLoadError) -> HTTPProblem:
    return HTTPProblem(415 if e.kind.startswith(_MEDIA_KINDS) else 422, e.kind, e.detail)


def _ranked(probs: np.ndarray, labels: list[str], k: int | None) -> dict[str, Any]:
    """Top-1 and the k best classes (ties: the lower class index first, like argmax)."""
    order = np.argsort(-probs, kind="stable")[: min(k or DEFAULT_TOP_K, len(labels))]
    top = [{"label": labels[j], "probability": float(probs[j])} for j in order]
    return {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}


def _problem_fields(p: HTTPProblem) -> dict[str, Any]:
    return {"status": "error", "http_status": p.status, "error": p.error, "detail": p.detail}


def _json_error(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error", "detail"}; a traceback only ever reaches the server log."""

    @app.exception_handler(HTTPProblem)
    async def problem(_request: Request, exc: HTTPProblem) -> JSONResponse:
        return _json_error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from http import HTTPStatus

        phrase = HTTPStatus(exc.status_code).phrase.lower()
        return _json_error(exc.status_code, phrase, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _json_error(422, "invalid request", f"{where}: {first.get('msg', '')}")

    @app.exception_handler(ClientDisconnect)
    async def gone(_request: Request, _exc: ClientDisconnect) -> JSONResponse:
        return _json_error(400, "client disconnected", "")

    @app.exception_handler(Exception)
    async def crashed(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so uvicorn logs the traceback server-side.
        return _json_error(500, "internal error", "the server log has the details")


def make_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    log_level: str = "info",
) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose connections also time out on slow headers."""
    limits = limits or Limits()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_with_header_timeout(limits.header_timeout),
        log_level=log_level,
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)
